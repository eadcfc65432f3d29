"""Mask-conditioned denoising diffusion model for paired synthetic image/mask slices.

Why this model
--------------
A VAE decoder averages over the modes it cannot tell apart, so its samples are blurry.
A denoising diffusion model samples one mode instead of their mean and, conditioned
on a segmentation mask, gives sharp images whose anatomy follows the mask. This module
follows the recipe that the literature reports works for *paired* medical image + mask
synthesis with little data:

* "Anatomically-Controllable Medical Image Generation with Segmentation-Guided
  Diffusion Models" (Konz et al., 2024): a DDPM/DDIM U-Net denoiser gets the mask
  concatenated to the noisy image as extra input channels, so every generated image
  agrees with a given mask by construction.
* "Conditional Diffusion Models for Semantic 3D Brain MRI Synthesis" (Med-DDPM,
  Dorjsembe et al., 2024): the same input-concatenation conditioning, used to create
  image/label pairs for training segmentation networks. (SPADE, "Semantic Image
  Synthesis with Spatially-Adaptive Normalization", Park et al., 2019, injects the mask
  at every resolution instead; with 2-3 levels and the mask available at the input
  the plain concatenation is enough and cheaper.)
* Cosine noise schedule ("Improved Denoising Diffusion Probabilistic Models", Nichol &
  Dhariwal, 2021), v-prediction ("Progressive Distillation for Fast Sampling of
  Diffusion Models", Salimans & Ho, 2022), which stays well-conditioned when sampling
  with few steps, and deterministic DDIM sampling with ``eta = 0`` ("Denoising
  Diffusion Implicit Models", Song et al., 2021) with ``sample_steps`` (default 50).
* Min-SNR-5 loss weighting ("Efficient Diffusion Training via Min-SNR Weighting
  Strategy", Hang et al., 2023) for faster convergence, which matters with small
  compute budgets; an exponential moving average (EMA) of the weights is what is
  sampled and saved.

New masks come from a *mask source* stored in the generator: the foreground masks of
the training set (the "mask bank") deformed by a random affine transform (rotation,
isotropic scale, translation) and a smooth random displacement field (bicubic
interpolation of a coarse Gaussian grid). A share ``empty_fraction`` of the masks are
empty, matching the share of training slices without foreground. The image is then
generated for the mask, so image-mask agreement holds by construction.

Foreground oversampling: slices with foreground are drawn with replacement so that they
make up ``foreground_fraction`` of each epoch (in expectation) whenever the data hold
fewer (most heart slices have no left atrium). This spends the training budget on the
anatomy; it does not bias sampling, whose foreground share is set by the mask source.

Images are z-scored per volume (roughly [-3, 4]). The model stores a per-channel clip
range (0.5-99.5 percentiles of the training set) mapped onto [-1, 1]; DDIM clips its
x0 estimate to that range and outputs are mapped back to z-score space.

Limits
------
* A CPU demo (64x64, a few minutes of training) gives recognisable but not
  photo-realistic images; diffusion models need many optimisation steps. Quality
  grows with ``epochs`` and ``image_size`` on a GPU.
* With little data a diffusion model can memorise training slices; check with
  ``lib.synth_quality.memorisation_distance``.
* The mask source only deforms training masks: it produces no new topologies and, in
  2D, no 3D consistency between slices. Intensities beyond the clip range are lost.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lib.atomic import atomic_path
from lib.env import autocast
from lib.generative import config_from_dict, epoch_indices, read_checkpoint

CHECKPOINT_KIND = "mask_ddpm"
CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "diffusion.pt"
# Fields that may change between a run and its resumption (they do not affect training).
_RESUMABLE_FIELDS = frozenset({"epochs", "time_budget_min", "sample_steps"})
_CLIP_PERCENTILES = (0.5, 99.5)


@dataclass
class DiffusionConfig:
    """Hyper-parameters of a ``MaskDDPM``, its training run and its mask source.

    The defaults suit 64x64 slices (lowest U-Net resolution 16x16). For 128-256 add
    levels, e.g. ``channel_mults=(1, 2, 2, 4)``, so the bottleneck stays near 16x16.
    ``epochs``, ``time_budget_min`` and ``sample_steps`` may change when resuming.
    """

    image_size: int = 64
    in_channels: int = 1
    num_classes: int = 2
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2)
    attention: bool = True  # self-attention at the lowest resolution
    timesteps: int = 1000
    sample_steps: int = 50
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    min_snr_gamma: float | None = 5.0  # Min-SNR loss weighting (Hang et al., 2023); None: off
    foreground_fraction: float | None = 0.5
    seed: int = 0
    time_budget_min: float | None = None
    # mask source: random affine + smooth elastic deformation of bank masks
    max_rotation_deg: float = 15.0
    scale_range: float = 0.1  # scale drawn from [1 - r, 1 + r]
    max_shift: float = 0.08  # fraction of the image size
    elastic_amplitude: float = 0.04  # displacement std, fraction of the half image size
    elastic_grid: int = 4  # control points per side of the displacement field

    def __post_init__(self) -> None:
        self.channel_mults = tuple(int(m) for m in self.channel_mults)
        factor = 2 ** (len(self.channel_mults) - 1)
        if not self.channel_mults or self.image_size % factor:
            raise ValueError(
                f"image_size {self.image_size} must be divisible by {factor} "
                f"for channel_mults {self.channel_mults}"
            )
        if not 1 <= self.sample_steps <= self.timesteps:
            raise ValueError(f"sample_steps must be in [1, timesteps], got {self.sample_steps}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON- and checkpoint-safe)."""
        d = dataclasses.asdict(self)
        d["channel_mults"] = list(self.channel_mults)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DiffusionConfig:
        """Inverse of ``to_dict``; unknown keys raise ValueError."""
        return config_from_dict(cls, d)


# ---------------------------------------------------------------------- denoiser


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, channels), channels)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps ``t`` (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class _ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, t_dim: int) -> None:
        super().__init__()
        self.norm1 = _norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(t_dim, c_out)
        self.norm2 = _norm(c_out)
        self.conv2 = _zero(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(t_emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class _Attention(nn.Module):
    """Single-head spatial self-attention with a residual connection."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        a = F.scaled_dot_product_attention(q, k, v)
        return x + self.out(a.transpose(-1, -2).reshape(b, c, h, w))


class Denoiser(nn.Module):
    """U-Net predicting v from a noisy image, its timestep and a one-hot mask.

    Input: ``x_t`` (B, C, H, W), ``t`` (B,) int, ``cond`` (B, K, H, W) one-hot mask,
    concatenated as C + K input channels. Output: (B, C, H, W).
    One residual block per level on the way down and up, strided-conv downsampling,
    nearest + conv upsampling, GroupNorm + SiLU, time embedding added in every block.
    """

    def __init__(self, cfg: DiffusionConfig) -> None:
        super().__init__()
        base = cfg.base_channels
        chans = [base * m for m in cfg.channel_mults]
        t_dim = 4 * base
        self.base = base
        self.time_mlp = nn.Sequential(nn.Linear(base, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.conv_in = nn.Conv2d(cfg.in_channels + cfg.num_classes, base, 3, padding=1)
        last = len(chans) - 1
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        ch = base
        for i, c in enumerate(chans):
            self.down.append(_ResBlock(ch, c, t_dim))
            self.downsample.append(
                nn.Conv2d(c, c, 3, stride=2, padding=1) if i < last else nn.Identity()
            )
            ch = c
        self.mid1 = _ResBlock(ch, ch, t_dim)
        self.attn = _Attention(ch) if cfg.attention else nn.Identity()
        self.mid2 = _ResBlock(ch, ch, t_dim)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i in reversed(range(len(chans))):
            self.up.append(_ResBlock(ch + chans[i], chans[i], t_dim))
            self.upsample.append(
                nn.Sequential(
                    nn.Upsample(scale_factor=2, mode="nearest"),
                    nn.Conv2d(chans[i], chans[i], 3, padding=1),
                )
                if i > 0
                else nn.Identity()
            )
            ch = chans[i]
        self.out = nn.Sequential(
            _norm(ch), nn.SiLU(), _zero(nn.Conv2d(ch, cfg.in_channels, 3, padding=1))
        )

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        t_emb = F.silu(self.time_mlp(timestep_embedding(t, self.base)))
        h = self.conv_in(torch.cat([x_t, cond.to(x_t.dtype)], dim=1))
        skips = []
        for block, down in zip(self.down, self.downsample):
            h = block(h, t_emb)
            skips.append(h)
            h = down(h)
        h = self.mid2(self.attn(self.mid1(h, t_emb)), t_emb)
        for block, up in zip(self.up, self.upsample):
            h = up(block(torch.cat([h, skips.pop()], dim=1), t_emb))
        return self.out(h)


def cosine_alpha_bar(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """Cumulative signal fraction alpha_bar[t], t = 0..T-1 (Nichol & Dhariwal cosine)."""
    f = np.cos((np.arange(timesteps + 1) / timesteps + s) / (1 + s) * np.pi / 2) ** 2
    betas = np.clip(1 - f[1:] / f[:-1], 0.0, 0.999)
    return torch.from_numpy(np.cumprod(1 - betas)).float()


class MaskDDPM(nn.Module):
    """Denoiser + noise schedule + intensity scaling + mask source of one generator.

    Attributes:
        cfg: the ``DiffusionConfig``.
        mask_bank: uint8 (M, H, W) foreground masks of the training set.
        empty_fraction: share of training slices without foreground.
        trained_epochs: epochs trained (0 = untrained; sampling raises).
        history: per-epoch training rows.
    """

    def __init__(
        self,
        cfg: DiffusionConfig,
        mask_bank: np.ndarray | None = None,
        empty_fraction: float = 0.0,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.net = Denoiser(cfg)
        self.register_buffer("alpha_bar", cosine_alpha_bar(cfg.timesteps))
        self.register_buffer("clip_lo", -torch.ones(cfg.in_channels))
        self.register_buffer("clip_hi", torch.ones(cfg.in_channels))
        s = cfg.image_size
        self.mask_bank = (
            np.zeros((0, s, s), np.uint8) if mask_bank is None else mask_bank.astype(np.uint8)
        )
        self.empty_fraction = float(empty_fraction)
        self.trained_epochs = 0
        self.history: list[dict] = []

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """v-prediction (B, C, H, W) for noisy images, timesteps and one-hot masks."""
        return self.net(x_t, t, cond)

    def set_clip_range(self, images: np.ndarray) -> None:
        """Per-channel clip range from the 0.5-99.5 percentiles of (N, C, H, W) images."""
        lo, hi = np.percentile(images, _CLIP_PERCENTILES, axis=(0, 2, 3))
        hi = np.maximum(hi, lo + 1e-3)
        self.clip_lo.copy_(torch.from_numpy(lo))
        self.clip_hi.copy_(torch.from_numpy(hi))

    def to_model_space(self, images: torch.Tensor) -> torch.Tensor:
        """z-score space (B, C, H, W) -> clipped [-1, 1]."""
        lo, hi = self.clip_lo[:, None, None], self.clip_hi[:, None, None]
        return ((images - lo) / (hi - lo) * 2 - 1).clamp(-1, 1)

    def from_model_space(self, x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] (B, C, H, W) -> z-score space."""
        lo, hi = self.clip_lo[:, None, None], self.clip_hi[:, None, None]
        return (x + 1) / 2 * (hi - lo) + lo


def _one_hot(masks: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, H, W) int -> (B, K, H, W) float."""
    return F.one_hot(masks.long(), num_classes).permute(0, 3, 1, 2).float()


def diffusion_loss(
    model: MaskDDPM, x0: torch.Tensor, cond: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """MSE of the v-prediction at uniformly drawn timesteps.

    With ``cfg.min_snr_gamma`` each sample is weighted by min(SNR, gamma) / (SNR + 1)
    ("Efficient Diffusion Training via Min-SNR Weighting Strategy", Hang et al., 2023),
    which stops the nearly noise-free steps from dominating and speeds up convergence.

    Args:
        x0: clean images in model space (B, C, H, W).
        cond: one-hot masks (B, K, H, W).
        generator: on ``x0``'s device, for timesteps and noise.
    """
    b = x0.shape[0]
    t = torch.randint(0, model.cfg.timesteps, (b,), device=x0.device, generator=generator)
    noise = torch.randn(x0.shape, device=x0.device, generator=generator)
    ab = model.alpha_bar[t].view(b, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    v = ab.sqrt() * noise - (1 - ab).sqrt() * x0
    with autocast(x0.device):
        pred = model(x_t, t, cond)
    per_sample = (pred.float() - v).pow(2).mean(dim=(1, 2, 3))
    gamma = model.cfg.min_snr_gamma
    if gamma is not None:
        snr = ab.flatten() / (1 - ab.flatten())
        per_sample = per_sample * snr.clamp(max=gamma) / (snr + 1)
    return per_sample.mean()


# ---------------------------------------------------------------------- checkpoints


def _checkpoint(
    model: MaskDDPM, cfg: DiffusionConfig, history: list[dict], **extra: Any
) -> dict[str, Any]:
    return {
        "kind": CHECKPOINT_KIND,
        "version": CHECKPOINT_VERSION,
        "config": cfg.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "history": list(history),
        "epoch": model.trained_epochs,
        "mask_bank": torch.from_numpy(np.ascontiguousarray(model.mask_bank)),
        "empty_fraction": model.empty_fraction,
        **extra,
    }


def _write(path: str | os.PathLike, ckpt: dict[str, Any]) -> Path:
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(ckpt, tmp)
    return Path(path)


def save_diffusion(
    path: str | os.PathLike, model: MaskDDPM, cfg: DiffusionConfig, history: list[dict]
) -> Path:
    """Atomically write a checkpoint with the model's (EMA) weights and mask bank."""
    return _write(path, _checkpoint(model, cfg, history))



def _model_from_checkpoint(ckpt: dict[str, Any], path: str | os.PathLike) -> MaskDDPM:
    try:
        cfg = DiffusionConfig.from_dict(ckpt["config"])
        model = MaskDDPM(cfg, ckpt["mask_bank"].numpy(), ckpt["empty_fraction"])
        model.load_state_dict(ckpt["state_dict"])
    except (KeyError, RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: inconsistent MaskDDPM checkpoint ({err})") from err
    model.trained_epochs = int(ckpt["epoch"])
    model.history = list(ckpt["history"])
    return model


def load_diffusion(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[MaskDDPM, DiffusionConfig, list[dict]]:
    """Load ``(model, cfg, history)`` from a ``save_diffusion`` checkpoint (eval mode)."""
    model = _model_from_checkpoint(read_checkpoint(path, CHECKPOINT_KIND, CHECKPOINT_VERSION, "MaskDDPM"), path)
    return model.to(device).eval(), model.cfg, list(model.history)


# ---------------------------------------------------------------------- training


def _check_data(images: np.ndarray, masks: np.ndarray, cfg: DiffusionConfig) -> None:
    s, c = cfg.image_size, cfg.in_channels
    if images.ndim != 4 or images.shape[1:] != (c, s, s) or len(images) == 0:
        raise ValueError(f"images must have shape (N>0, {c}, {s}, {s}), got {images.shape}")
    if masks.shape != (images.shape[0], s, s):
        raise ValueError(f"masks must have shape (N, H, W) matching images, got {masks.shape}")
    if masks.min() < 0 or masks.max() >= cfg.num_classes:
        raise ValueError(
            f"mask values must be in [0, {cfg.num_classes - 1}], got [{masks.min()}, {masks.max()}]"
        )
    if not np.isfinite(images).all():
        raise ValueError("images contain NaN or inf")


def _fingerprint(images: np.ndarray, masks: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(str((images.shape, masks.shape)).encode())
    h.update(memoryview(np.ascontiguousarray(images, dtype=np.float32)).cast("B"))
    h.update(memoryview(np.ascontiguousarray(masks, dtype=np.uint8)).cast("B"))
    return h.hexdigest()




@torch.no_grad()
def _ema_update(ema: MaskDDPM, model: MaskDDPM, decay: float) -> None:
    for e, p in zip(ema.net.parameters(), model.net.parameters()):
        e.lerp_(p, 1 - decay)


def _resume(
    ckpt_path: Path,
    cfg: DiffusionConfig,
    fingerprint: str,
    model: MaskDDPM,
    ema: MaskDDPM,
    optimizer: torch.optim.Optimizer,
) -> tuple[list[dict], int]:
    """Restore model, EMA and optimizer from a matching checkpoint; (history, step)."""
    ckpt = read_checkpoint(ckpt_path, CHECKPOINT_KIND, CHECKPOINT_VERSION, "MaskDDPM")
    saved = DiffusionConfig.from_dict(ckpt["config"]).to_dict()
    diff = {
        k: (saved[k], v)
        for k, v in cfg.to_dict().items()
        if k not in _RESUMABLE_FIELDS and saved[k] != v
    }
    if diff:
        raise ValueError(
            f"{ckpt_path} was trained with a different config (field: (saved, requested)) {diff}; "
            "use another out_dir or delete the checkpoint to start over"
        )
    if ckpt.get("data_fingerprint") != fingerprint:
        raise ValueError(f"{ckpt_path} was trained on different images/masks")
    state = ckpt["train_state"]
    ema.load_state_dict(ckpt["state_dict"])
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    ema.trained_epochs = model.trained_epochs = int(ckpt["epoch"])
    return list(ckpt["history"]), int(state["step"])


def _budget_spent(cfg: DiffusionConfig, t_start: float, session_rows: list[dict]) -> bool:
    """True if another epoch (of the mean length so far) would overrun the time budget."""
    if cfg.time_budget_min is None or not session_rows:
        return False
    mean_epoch = sum(r["seconds"] for r in session_rows) / len(session_rows)
    return time.monotonic() - t_start + mean_epoch > 60 * cfg.time_budget_min


def _train_epoch(
    model: MaskDDPM,
    ema: MaskDDPM,
    optimizer: torch.optim.Optimizer,
    data: tuple[torch.Tensor, torch.Tensor, np.ndarray],
    epoch: int,
    step: int,
) -> tuple[float, int]:
    """One epoch; returns (mean loss, global step). RuntimeError on a non-finite loss."""
    cfg = model.cfg
    x, y, has_fg = data
    device = x.device
    seed = cfg.seed * 1_000_003 + epoch
    idx = epoch_indices(has_fg, cfg.foreground_fraction, torch.Generator().manual_seed(seed))
    noise_gen = torch.Generator(device).manual_seed(seed + 1)
    model.train()
    total, n_batches = 0.0, 0
    for start in range(0, len(idx), cfg.batch_size):
        b = idx[start : start + cfg.batch_size].to(device)
        loss = diffusion_loss(model, x[b], _one_hot(y[b], cfg.num_classes), noise_gen)
        if not torch.isfinite(loss):
            raise RuntimeError(
                f"non-finite diffusion loss ({loss.item()}) in epoch {epoch}; "
                "the last checkpoint (previous epoch) is left intact"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.net.parameters(), cfg.grad_clip)
        optimizer.step()
        step += 1
        _ema_update(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
        total += loss.item()
        n_batches += 1
    return total / n_batches, step


def _build(images: np.ndarray, masks: np.ndarray, cfg: DiffusionConfig) -> MaskDDPM:
    """Fresh model with the clip range and mask bank of the training data."""
    has_fg = masks.reshape(len(masks), -1).any(axis=1)
    model = MaskDDPM(cfg, masks[has_fg], empty_fraction=1.0 - float(has_fg.mean()))
    model.set_clip_range(images)
    return model


def train_diffusion(
    images: np.ndarray,
    masks: np.ndarray,
    cfg: DiffusionConfig,
    *,
    device: str | torch.device = "cpu",
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> tuple[MaskDDPM, list[dict]]:
    """Train a mask-conditioned DDPM on paired slices.

    Args:
        images: float32 (N, C, H, W), z-scored.
        masks: uint8 (N, H, W), class ids 0..K-1.
        cfg: hyper-parameters; ``cfg.seed`` makes runs deterministic on one device.
        device: torch device; mixed precision where :func:`lib.env.amp_dtype` gives one.
        out_dir: if given, ``diffusion.pt`` is written atomically after every epoch and
            training resumes from it (same config apart from epochs, time budget and
            sample steps, same data; ValueError otherwise).
        progress: show a tqdm bar over epochs.

    Returns:
        The EMA model (eval mode) and the history, one row per epoch with keys
        epoch, loss, seconds. At least one epoch runs per call even if the time
        budget is smaller.

    Raises:
        RuntimeError: on a NaN/inf loss, naming the epoch.
    """
    _check_data(images, masks, cfg)
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    model = _build(images, masks, cfg).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    fingerprint = _fingerprint(images, masks)
    ckpt_path = Path(out_dir) / CHECKPOINT_NAME if out_dir is not None else None
    history, step = [], 0
    if ckpt_path is not None and ckpt_path.exists():
        history, step = _resume(ckpt_path, cfg, fingerprint, model, ema, optimizer)
    x = model.to_model_space(torch.from_numpy(np.asarray(images, np.float32)).to(device))
    y = torch.from_numpy(np.asarray(masks, np.uint8)).to(device)
    data = (x, y, masks.reshape(len(masks), -1).any(axis=1))
    t_start, first = time.monotonic(), len(history)
    bar = tqdm(range(first + 1, cfg.epochs + 1), desc="diffusion", disable=not progress)
    for epoch in bar:
        if _budget_spent(cfg, t_start, history[first:]):
            bar.write(f"time budget of {cfg.time_budget_min} min spent after epoch {epoch - 1}")
            break
        tic = time.monotonic()
        loss, step = _train_epoch(model, ema, optimizer, data, epoch, step)
        history.append({"epoch": epoch, "loss": loss, "seconds": time.monotonic() - tic})
        ema.trained_epochs = model.trained_epochs = epoch
        if ckpt_path is not None:
            train_state = {
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(),
                "step": step,
            }
            ckpt = _checkpoint(ema, cfg, history, train_state=train_state)
            _write(ckpt_path, {**ckpt, "data_fingerprint": fingerprint})
        bar.set_postfix(loss=f"{loss:.4f}")
    ema.history = list(history)
    return ema.eval(), history


# ---------------------------------------------------------------------- sampling


def _require_trained(model: MaskDDPM) -> None:
    if getattr(model, "trained_epochs", 0) <= 0:
        raise RuntimeError(
            "the MaskDDPM is untrained (trained_epochs == 0); train it or load a checkpoint first"
        )


def deform_masks(
    masks: np.ndarray,
    num_classes: int,
    *,
    seed: int = 0,
    max_rotation_deg: float = 15.0,
    scale_range: float = 0.1,
    max_shift: float = 0.08,
    elastic_amplitude: float = 0.04,
    elastic_grid: int = 4,
    batch_size: int = 64,
) -> np.ndarray:
    """Random affine + smooth elastic deformation of label masks.

    Each class's indicator is warped bilinearly and the label is the argmax (background
    outside the image). A deformed mask that lost more than half of its foreground
    (moved out of the image) is replaced by its source.

    Args:
        masks: uint8 (n, H, W).
        num_classes: K.
        seed: random seed (parameters are drawn on the CPU with numpy).

    Returns:
        uint8 (n, H, W).
    """
    n, h, w = masks.shape
    rng = np.random.default_rng(seed)
    angle = np.deg2rad(rng.uniform(-max_rotation_deg, max_rotation_deg, n))
    inv_scale = 1.0 / rng.uniform(1 - scale_range, 1 + scale_range, n)
    shift = rng.uniform(-max_shift, max_shift, (n, 2)) * 2  # normalised coords span 2
    cos, sin = np.cos(angle) * inv_scale, np.sin(angle) * inv_scale
    theta = np.stack(
        [np.stack([cos, -sin, shift[:, 0]], 1), np.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    coarse = rng.normal(0.0, elastic_amplitude, (n, 2, elastic_grid, elastic_grid))
    out = np.empty_like(masks, dtype=np.uint8)
    for s in range(0, n, batch_size):
        sl = slice(s, s + batch_size)
        m = torch.from_numpy(np.ascontiguousarray(masks[sl])).long()
        grid = F.affine_grid(
            torch.from_numpy(theta[sl]).float(), [len(m), 1, h, w], align_corners=False
        )
        disp = F.interpolate(
            torch.from_numpy(coarse[sl]).float(), size=(h, w), mode="bicubic", align_corners=True
        )
        fg = F.grid_sample(
            _one_hot(m, num_classes)[:, 1:],
            grid + disp.permute(0, 2, 3, 1),
            mode="bilinear",
            padding_mode="zeros",
            align_corners=False,
        )
        probs = torch.cat([1 - fg.sum(1, keepdim=True), fg], dim=1)
        out[sl] = probs.argmax(1).numpy().astype(np.uint8)
    lost = (out > 0).sum(axis=(1, 2)) < 0.5 * (masks > 0).sum(axis=(1, 2))
    out[lost] = masks[lost]
    return out


def sample_masks(model: MaskDDPM, n: int, *, seed: int = 0) -> np.ndarray:
    """New masks from the model's mask source: uint8 (n, H, W).

    A share ``model.empty_fraction`` are empty; the rest are randomly chosen bank masks
    deformed with ``deform_masks`` using the deformation settings in ``model.cfg``.
    """
    _require_trained(model)
    cfg = model.cfg
    rng = np.random.default_rng(seed)
    s = cfg.image_size
    out = np.zeros((n, s, s), np.uint8)
    if len(model.mask_bank) == 0:
        return out
    full = rng.random(n) >= model.empty_fraction
    src = rng.integers(0, len(model.mask_bank), n)[full]
    out[full] = deform_masks(
        model.mask_bank[src],
        cfg.num_classes,
        seed=int(rng.integers(2**31)),
        max_rotation_deg=cfg.max_rotation_deg,
        scale_range=cfg.scale_range,
        max_shift=cfg.max_shift,
        elastic_amplitude=cfg.elastic_amplitude,
        elastic_grid=cfg.elastic_grid,
    )
    return out


@torch.no_grad()
def _ddim(model: MaskDDPM, cond: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from noise ``x`` to model-space images."""
    cfg = model.cfg
    ts = torch.linspace(cfg.timesteps - 1, 0, cfg.sample_steps).round().long().tolist()
    for i, t in enumerate(ts):
        ab = model.alpha_bar[t]
        ab_prev = model.alpha_bar[ts[i + 1]] if i + 1 < len(ts) else torch.ones_like(ab)
        with autocast(x.device):
            v = model(x, torch.full((len(x),), t, device=x.device), cond).float()
        x0 = (ab.sqrt() * x - (1 - ab).sqrt() * v).clamp(-1, 1)
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
        x = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
    return x


def generate_images(
    model: MaskDDPM,
    masks: np.ndarray,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
) -> np.ndarray:
    """Images for given masks by DDIM sampling (noise drawn on the CPU, so seeds agree
    across devices and batch sizes).

    Args:
        masks: uint8 (n, H, W) class ids.

    Returns:
        float32 (n, C, H, W) in z-score space.
    """
    _require_trained(model)
    cfg = model.cfg
    s, c = cfg.image_size, cfg.in_channels
    if masks.ndim != 3 or masks.shape[1:] != (s, s):
        raise ValueError(f"masks must have shape (n, {s}, {s}), got {masks.shape}")
    if masks.size and masks.max() >= cfg.num_classes:
        raise ValueError(f"mask values must be < {cfg.num_classes}, got {masks.max()}")
    model.to(device).eval()
    noise = torch.randn((len(masks), c, s, s), generator=torch.Generator().manual_seed(seed))
    out = [np.zeros((0, c, s, s), np.float32)]
    for start in range(0, len(masks), batch_size):
        m = torch.from_numpy(np.ascontiguousarray(masks[start : start + batch_size])).to(device)
        x = _ddim(model, _one_hot(m, cfg.num_classes), noise[start : start + batch_size].to(device))
        out.append(model.from_model_space(x).float().cpu().numpy())
    return np.concatenate(out)


def sample_pairs(
    model: MaskDDPM,
    n: int,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """New (image, mask) pairs: masks from the mask source, images generated for them.

    Returns:
        images float32 (n, C, H, W) in z-score space, masks uint8 (n, H, W).
    """
    mask_seed, image_seed = np.random.SeedSequence(seed).generate_state(2)
    masks = sample_masks(model, n, seed=int(mask_seed))
    images = generate_images(
        model, masks, seed=int(image_seed), device=device, batch_size=batch_size
    )
    return images, masks
