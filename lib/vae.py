"""Paired image/mask variational autoencoder for synthetic 2D training data.

``PairVAE`` models the joint distribution of an image slice and its label mask: the
encoder sees the image channels concatenated with the one-hot mask, a dense bottleneck
gives a ``latent_dim`` Gaussian code, and the decoder has two heads (image and mask
logits). Sampling ``z ~ N(0, I)`` and decoding gives new (image, mask) pairs.

Loss (per pixel, so the learning rate does not depend on the image size)::

    loss = sum_c MSE(image) + mask_weight * CE(mask) + beta_e * KL / (H * W)

With ``beta = mask_weight = 1`` this is the negative ELBO divided by ``H * W``
(Gaussian image likelihood with variance 1/2 in the scaled space, categorical mask).
``beta_e`` ramps linearly from 0 to ``beta`` over ``kl_warmup_epochs``.

Images are z-scored per volume (roughly [-3, 4]). The model stores a per-channel
clip range (0.5-99.5 percentiles of the training set) and maps it onto [-1, 1]; the
image head ends in ``tanh`` and outputs are mapped back to z-score space.

Foreground oversampling: slices with foreground are drawn with replacement so that
they make up ``foreground_fraction`` of each epoch (in expectation) whenever the data
hold fewer. Otherwise the mask head can learn "always background" on heart data,
where most slices have no left atrium. As a consequence, samples over-represent
foreground slices relative to the data, which is what a synthetic-training-data
pipeline wants; set ``foreground_fraction=None`` to model the data distribution as is.

The latent segmentation baseline (``train_latent_segmenter``) is described there.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lib.atomic import atomic_path
from lib.env import autocast, grad_scaler
from lib.generative import config_from_dict, epoch_indices, read_checkpoint

CHECKPOINT_KIND = "pair_vae"
CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "vae.pt"
# Fields that may change between a run and its resumption.
_RESUMABLE_FIELDS = frozenset({"epochs", "time_budget_min"})


@dataclass
class VAEConfig:
    """Hyper-parameters of a ``PairVAE`` and its training run."""

    image_size: int = 64
    in_channels: int = 1
    num_classes: int = 2
    latent_dim: int = 64
    base_channels: int = 32
    beta: float = 1.0
    kl_warmup_epochs: int = 10
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    time_budget_min: float | None = None
    mask_weight: float = 1.0
    foreground_fraction: float | None = 0.5

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON- and checkpoint-safe)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VAEConfig:
        """Inverse of ``to_dict``; missing keys take defaults, unknown keys raise."""
        return config_from_dict(cls, data)


# --------------------------------------------------------------------------- model


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(8 if channels % 8 == 0 else 1, channels)


def _conv_block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), _norm(c_out), nn.SiLU()
    )


def _level_channels(image_size: int, base_channels: int) -> list[int]:
    """Channels from full resolution down to the 4x4 bottleneck (one entry per level)."""
    if image_size < 8 or image_size & (image_size - 1):
        raise ValueError(f"image_size must be a power of two >= 8, got {image_size}")
    n_down = int(math.log2(image_size // 4))
    return [base_channels * min(2**i, 8) for i in range(n_down + 1)]


class _ConvEncoder(nn.Module):
    """(B, c_in, S, S) -> (B, out_features) via strided convs and a dense layer."""

    def __init__(self, c_in: int, image_size: int, base_channels: int, out_features: int):
        super().__init__()
        chans = _level_channels(image_size, base_channels)
        layers = [_conv_block(c_in, chans[0])]
        for a, b in itertools.pairwise(chans):
            layers += [_conv_block(a, b, stride=2), _conv_block(b, b)]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(chans[-1] * 16, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


class _ConvDecoder(nn.Module):
    """(B, latent_dim) -> (B, base_channels, S, S) features via upsampling convs."""

    def __init__(self, latent_dim: int, image_size: int, base_channels: int):
        super().__init__()
        chans = _level_channels(image_size, base_channels)[::-1]
        self.top_channels = chans[0]
        self.fc = nn.Linear(latent_dim, chans[0] * 16)
        layers: list[nn.Module] = [_norm(chans[0]), nn.SiLU()]
        for a, b in itertools.pairwise(chans):
            layers += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                _conv_block(a, b),
                _conv_block(b, b),
            ]
        self.features = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.features(self.fc(z).view(-1, self.top_channels, 4, 4))


class _ImageScaling(nn.Module):
    """Per-channel affine map of a clip range onto [-1, 1], stored as buffers."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("center", torch.zeros(channels))
        self.register_buffer("half_range", torch.ones(channels))

    def fit(self, images: np.ndarray, max_pixels: int = 1_000_000, seed: int = 0) -> None:
        """Set the clip range to the 0.5/99.5 percentiles of ``images`` (N, C, H, W).

        At most ``max_pixels`` pixels per channel are used (a random subset of slices).
        """
        n, c, h, w = images.shape
        n_keep = min(n, max(1, max_pixels // (h * w)))
        keep = np.sort(np.random.default_rng(seed).choice(n, n_keep, replace=False))
        flat = images[keep].transpose(1, 0, 2, 3).reshape(c, -1)
        lo, hi = np.percentile(flat, [0.5, 99.5], axis=1)
        self.center.copy_(torch.from_numpy((hi + lo) / 2))
        self.half_range.copy_(torch.from_numpy(np.maximum((hi - lo) / 2, 1e-3)))

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """z-score space (B, C, H, W) -> clipped [-1, 1]."""
        c, h = self.center.view(1, -1, 1, 1), self.half_range.view(1, -1, 1, 1)
        return ((x - c) / h).clamp(-1, 1)

    def unscale(self, y: torch.Tensor) -> torch.Tensor:
        """[-1, 1] (B, C, H, W) -> z-score space."""
        return y * self.half_range.view(1, -1, 1, 1) + self.center.view(1, -1, 1, 1)


class VAEOutput(NamedTuple):
    """``forward`` result; ``image_scaled`` is in the model's [-1, 1] space."""

    image_scaled: torch.Tensor  # (B, C, H, W)
    mask_logits: torch.Tensor  # (B, K, H, W)
    mu: torch.Tensor  # (B, latent_dim)
    logvar: torch.Tensor  # (B, latent_dim)


class PairVAE(nn.Module):
    """Convolutional VAE over (image, one-hot mask) pairs with a dense latent.

    Attributes:
        trained_epochs: epochs of training behind the weights (0 = untrained).
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        num_classes: int,
        latent_dim: int = 64,
        base_channels: int = 32,
    ):
        super().__init__()
        self.image_size = image_size
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.latent_dim = latent_dim
        self.base_channels = base_channels
        self.trained_epochs = 0
        self.scaling = _ImageScaling(in_channels)
        self.encoder = _ConvEncoder(
            in_channels + num_classes, image_size, base_channels, 2 * latent_dim
        )
        self.decoder = _ConvDecoder(latent_dim, image_size, base_channels)
        self.image_head = nn.Conv2d(base_channels, in_channels, 3, padding=1)
        self.mask_head = nn.Conv2d(base_channels, num_classes, 3, padding=1)

    @classmethod
    def from_config(cls, cfg: VAEConfig) -> PairVAE:
        """Build an untrained model with the architecture in ``cfg``."""
        return cls(
            cfg.image_size, cfg.in_channels, cfg.num_classes, cfg.latent_dim, cfg.base_channels
        )

    def encode(
        self, images: torch.Tensor, masks: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) in z-score space, masks (B, H, W) int -> mu, logvar (B, latent_dim)."""
        onehot = F.one_hot(masks.long(), self.num_classes).permute(0, 3, 1, 2).to(images.dtype)
        h = self.encoder(torch.cat([self.scaling.scale(images), onehot], dim=1))
        mu, logvar = h.float().chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def decode_scaled(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (B, latent_dim) -> image in [-1, 1] (B, C, H, W), mask logits (B, K, H, W)."""
        h = self.decoder(z)
        return torch.tanh(self.image_head(h)), self.mask_head(h)

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (B, latent_dim) -> image in z-score space (B, C, H, W), mask logits (B, K, H, W)."""
        image, logits = self.decode_scaled(z)
        return self.scaling.unscale(image.float()), logits.float()

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> VAEOutput:
        """Encode, sample z with the reparameterisation trick (mean in eval mode), decode."""
        mu, logvar = self.encode(images, masks)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        image, logits = self.decode_scaled(z)
        return VAEOutput(image, logits, mu, logvar)


def vae_loss(
    model: PairVAE, images: torch.Tensor, masks: torch.Tensor, beta: float, mask_weight: float
) -> dict[str, torch.Tensor]:
    """Loss terms for a batch: images (B, C, H, W) z-score, masks (B, H, W) int.

    Returns:
        Scalars ``loss``, ``recon_image`` (channel-summed MSE per pixel, scaled space),
        ``recon_mask`` (CE per pixel) and ``kl`` (nats per sample).
    """
    out = model(images, masks)
    target = model.scaling.scale(images)
    recon_image = (out.image_scaled.float() - target).pow(2).sum(1).mean()
    recon_mask = F.cross_entropy(out.mask_logits.float(), masks.long())
    kl = (-0.5 * (1 + out.logvar - out.mu.pow(2) - out.logvar.exp()).sum(1)).mean()
    n_pix = images.shape[-1] * images.shape[-2]
    loss = recon_image + mask_weight * recon_mask + beta * kl / n_pix
    return {"loss": loss, "recon_image": recon_image, "recon_mask": recon_mask, "kl": kl}


# ----------------------------------------------------------------------- checkpoints


def save_vae(
    path: str | os.PathLike,
    model: PairVAE,
    cfg: VAEConfig,
    history: list[dict],
    optimizer: torch.optim.Optimizer | None = None,
) -> Path:
    """Atomically write a checkpoint (with optimizer state when given, for resuming)."""
    ckpt = {
        "kind": CHECKPOINT_KIND,
        "version": CHECKPOINT_VERSION,
        "config": cfg.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "history": list(history),
        "epoch": model.trained_epochs,
    }
    if optimizer is not None:
        ckpt["optimizer"] = optimizer.state_dict()
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(ckpt, tmp)
    return Path(path)



def _model_from_checkpoint(
    ckpt: dict[str, Any], cfg: VAEConfig, device: str | torch.device
) -> PairVAE:
    model = PairVAE.from_config(cfg)
    model.load_state_dict(ckpt["state_dict"])
    model.trained_epochs = int(ckpt["epoch"])
    return model.to(device).eval()


def load_vae(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[PairVAE, VAEConfig, list[dict]]:
    """Load ``(model, cfg, history)`` from a ``save_vae`` checkpoint; model is in eval mode."""
    ckpt = read_checkpoint(path, CHECKPOINT_KIND, CHECKPOINT_VERSION, "PairVAE")
    cfg = VAEConfig.from_dict(ckpt["config"])
    return _model_from_checkpoint(ckpt, cfg, device), cfg, list(ckpt["history"])


# -------------------------------------------------------------------------- training


def _check_data(
    images: np.ndarray, masks: np.ndarray, image_size: int, channels: int, classes: int
) -> None:
    expected = (channels, image_size, image_size)
    if images.ndim != 4 or images.shape[1:] != expected:
        raise ValueError(
            f"images must have shape (N, {channels}, {image_size}, {image_size}), got {images.shape}"
        )
    if masks.shape != (images.shape[0], image_size, image_size):
        raise ValueError(f"masks must have shape (N, H, W) matching images, got {masks.shape}")
    if masks.size and (masks.min() < 0 or masks.max() >= classes):
        raise ValueError(
            f"mask values must be in [0, {classes - 1}], got [{masks.min()}, {masks.max()}]"
        )



def _batches(
    images: torch.Tensor,
    masks: torch.Tensor,
    idx: torch.Tensor,
    batch_size: int,
    device: torch.device,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, len(idx), batch_size):
        b = idx[start : start + batch_size]
        yield images[b].to(device, non_blocking=True), masks[b].to(device, non_blocking=True).long()




def _beta_at(cfg: VAEConfig, epoch: int) -> float:
    """KL weight for 0-based ``epoch``: linear from 0 to ``cfg.beta`` over the warm-up."""
    if cfg.kl_warmup_epochs <= 0:
        return cfg.beta
    return cfg.beta * min(1.0, epoch / cfg.kl_warmup_epochs)


def _resume_state(
    ckpt_path: Path, cfg: VAEConfig, device: torch.device
) -> tuple[PairVAE, dict | None, list[dict]] | None:
    """(model, optimizer state, history) from an existing checkpoint with a matching config."""
    if not ckpt_path.exists():
        return None
    ckpt = read_checkpoint(ckpt_path, CHECKPOINT_KIND, CHECKPOINT_VERSION, "PairVAE")
    saved = VAEConfig.from_dict(ckpt["config"]).to_dict()
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
    model = _model_from_checkpoint(ckpt, cfg, device)
    return model, ckpt.get("optimizer"), list(ckpt["history"])


def train_vae(
    images: np.ndarray,
    masks: np.ndarray,
    cfg: VAEConfig,
    *,
    device: str | torch.device = "cpu",
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> tuple[PairVAE, list[dict]]:
    """Train a ``PairVAE`` on slices, resuming from ``out_dir/vae.pt`` when present.

    Args:
        images: float32 (N, C, H, W), z-scored.
        masks: uint8 (N, H, W) with class ids in [0, num_classes).
        cfg: architecture and training settings; ``epochs`` is the total target.
        device: torch device; mixed precision where :func:`lib.env.amp_dtype` gives one.
        out_dir: if given, ``vae.pt`` is written atomically after every epoch and an
            existing one (same config apart from ``epochs``/``time_budget_min``) is resumed.
        progress: show a tqdm bar over epochs.

    Returns:
        The model (eval mode) and one history row per epoch trained so far.

    Raises:
        ValueError: bad data shapes, or a checkpoint with a different config.
        RuntimeError: the loss became NaN/inf (the last checkpoint is left as it was).
    """
    _check_data(images, masks, cfg.image_size, cfg.in_channels, cfg.num_classes)
    device = torch.device(device)
    ckpt_path = Path(out_dir) / CHECKPOINT_NAME if out_dir is not None else None
    resumed = _resume_state(ckpt_path, cfg, device) if ckpt_path is not None else None
    if resumed is None:
        torch.manual_seed(cfg.seed)
        model = PairVAE.from_config(cfg)
        model.scaling.fit(images, seed=cfg.seed)
        model.to(device)
        opt_state, history = None, []
    else:
        model, opt_state, history = resumed
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    if opt_state is not None:
        optimizer.load_state_dict(opt_state)
    _fit(model, optimizer, images, masks, cfg, history, device, ckpt_path, progress)
    return model.eval(), history


def _fit(
    model: PairVAE,
    optimizer: torch.optim.Optimizer,
    images: np.ndarray,
    masks: np.ndarray,
    cfg: VAEConfig,
    history: list[dict],
    device: torch.device,
    ckpt_path: Path | None,
    progress: bool,
) -> None:
    """Epoch loop from ``model.trained_epochs`` to ``cfg.epochs``; appends to ``history``."""
    x_all, m_all = (
        torch.from_numpy(np.ascontiguousarray(images, np.float32)),
        torch.from_numpy(masks),
    )
    has_fg = masks.reshape(len(masks), -1).any(axis=1)
    scaler = grad_scaler(device)
    budget_s = cfg.time_budget_min * 60 if cfg.time_budget_min is not None else math.inf
    t_start = time.monotonic()
    bar = tqdm(
        range(model.trained_epochs, cfg.epochs),
        desc="VAE",
        disable=not progress,
        initial=model.trained_epochs,
        total=cfg.epochs,
    )
    for n_done, epoch in enumerate(bar, start=1):
        row = _train_epoch(model, optimizer, scaler, x_all, m_all, has_fg, cfg, epoch, device)
        model.trained_epochs = epoch + 1
        history.append(row)
        if ckpt_path is not None:
            save_vae(ckpt_path, model, cfg, history, optimizer)
        bar.set_postfix(loss=f"{row['loss']:.4f}", kl=f"{row['kl']:.1f}", beta=f"{row['beta']:.2f}")
        elapsed = time.monotonic() - t_start
        if epoch + 1 < cfg.epochs and elapsed * (n_done + 1) / n_done > budget_s:
            tqdm.write(
                f"VAE: stopping after epoch {epoch + 1}, another would exceed the "
                f"time budget of {cfg.time_budget_min} min"
            )
            break
    bar.close()


def _train_epoch(
    model: PairVAE,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    x_all: torch.Tensor,
    m_all: torch.Tensor,
    has_fg: np.ndarray,
    cfg: VAEConfig,
    epoch: int,
    device: torch.device,
) -> dict:
    """One epoch (0-based ``epoch``); seeded by (seed, epoch) so resuming is reproducible."""
    torch.manual_seed(cfg.seed * 100_003 + epoch)
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    idx = epoch_indices(has_fg, cfg.foreground_fraction, gen)
    beta = _beta_at(cfg, epoch)
    model.train()
    t0 = time.monotonic()
    sums = dict.fromkeys(("loss", "recon_image", "recon_mask", "kl"), 0.0)
    n_batches = 0
    for x, m in _batches(x_all, m_all, idx, cfg.batch_size, device):
        with autocast(device):
            terms = vae_loss(model, x, m, beta, cfg.mask_weight)
        loss = terms["loss"]
        if not torch.isfinite(loss):
            raise RuntimeError(
                f"VAE training diverged at epoch {epoch + 1} (batch {n_batches + 1}): loss is "
                f"{loss.item()}; try a lower lr (now {cfg.lr}). The last checkpoint, if any, is unchanged."
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        for k, v in terms.items():
            sums[k] += v.item()
        n_batches += 1
    row = {"epoch": epoch + 1, **{k: v / max(n_batches, 1) for k, v in sums.items()}}
    return {**row, "beta": beta, "seconds": time.monotonic() - t0}


# -------------------------------------------------------------------------- sampling


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _require_trained(model: PairVAE) -> None:
    if getattr(model, "trained_epochs", 0) <= 0:
        raise RuntimeError(
            "the PairVAE is untrained (trained_epochs == 0); train it or load a checkpoint first"
        )


def _to_numpy(images: torch.Tensor, logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    return images.float().cpu().numpy().astype(np.float32), logits.argmax(1).cpu().numpy().astype(
        np.uint8
    )


@torch.no_grad()
def sample_pairs(
    model: PairVAE,
    n: int,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``n`` latents drawn from N(0, I) (on the CPU, so seeds agree across devices).

    Returns:
        images float32 (n, C, H, W) in z-score space, masks uint8 (n, H, W).
    """
    _require_trained(model)
    model.to(device).eval()
    z_all = torch.randn(n, model.latent_dim, generator=torch.Generator().manual_seed(seed))
    imgs, msks = [], []
    for start in range(0, n, batch_size):
        image, logits = model.decode(z_all[start : start + batch_size].to(device))
        i, m = _to_numpy(image, logits)
        imgs.append(i)
        msks.append(m)
    s, c = model.image_size, model.in_channels
    if not imgs:
        return np.zeros((0, c, s, s), np.float32), np.zeros((0, s, s), np.uint8)
    return np.concatenate(imgs), np.concatenate(msks)


@torch.no_grad()
def _encode_means(
    model: PairVAE, images: np.ndarray, masks: np.ndarray, batch_size: int = 64
) -> torch.Tensor:
    """Posterior means (N, latent_dim) on the model's device."""
    device = _device_of(model)
    model.eval()
    x, m = torch.from_numpy(np.asarray(images, np.float32)), torch.from_numpy(np.asarray(masks))
    mus = [
        model.encode(xb, mb)[0]
        for xb, mb in _batches(x, m, torch.arange(len(x)), batch_size, device)
    ]
    return torch.cat(mus)


@torch.no_grad()
def reconstruct(
    model: PairVAE, images: np.ndarray, masks: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Decode the posterior mean of each pair: (N, C, H, W), (N, H, W) -> same shapes."""
    mu = _encode_means(model, images, masks)
    return _to_numpy(*model.decode(mu))


@torch.no_grad()
def interpolate(
    model: PairVAE,
    pair_a: tuple[np.ndarray, np.ndarray],
    pair_b: tuple[np.ndarray, np.ndarray],
    steps: int = 8,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``steps`` points on the line between the posterior means of two pairs.

    Args:
        pair_a, pair_b: (image (C, H, W), mask (H, W)).

    Returns:
        images float32 (steps, C, H, W), masks uint8 (steps, H, W); endpoints included.
    """
    images = np.stack([pair_a[0], pair_b[0]])
    masks = np.stack([pair_a[1], pair_b[1]])
    mu = _encode_means(model, images, masks)
    t = torch.linspace(0, 1, steps, device=mu.device).unsqueeze(1)
    return _to_numpy(*model.decode((1 - t) * mu[0] + t * mu[1]))


# ------------------------------------------------------ latent segmentation baseline


class LatentSegDecoder(nn.Module):
    """Latent code (B, latent_dim) -> mask logits (B, K, S, S)."""

    def __init__(self, latent_dim: int, image_size: int, num_classes: int, base_channels: int = 16):
        super().__init__()
        self.decoder = _ConvDecoder(latent_dim, image_size, base_channels)
        self.head = nn.Conv2d(base_channels, num_classes, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(self.decoder(z))


class LatentSegmenter(nn.Module):
    """Image-only segmentation through the frozen VAE's latent space.

    ``encoder`` maps an image (B, C, S, S) to an estimate of the VAE posterior mean of
    (image, true mask); ``decoder`` reads mask logits from that (detached) code.
    """

    def __init__(self, vae: PairVAE, base_channels: int = 16):
        super().__init__()
        self.scaling = _ImageScaling(vae.in_channels)
        self.scaling.load_state_dict(vae.scaling.state_dict())
        self.encoder = _ConvEncoder(vae.in_channels, vae.image_size, base_channels, vae.latent_dim)
        self.decoder = LatentSegDecoder(
            vae.latent_dim, vae.image_size, vae.num_classes, base_channels
        )
        self.history: list[dict] = []

    def latent(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, S, S) in z-score space -> latent estimate (B, latent_dim)."""
        return self.encoder(self.scaling.scale(images)).float()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, S, S) -> mask logits (B, K, S, S)."""
        return self.decoder(self.latent(images).detach())


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Cross-entropy plus soft Dice loss (batch-wise, all classes); logits (B, K, H, W)."""
    logits = logits.float()
    probs = logits.softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).float()
    inter = (probs * onehot).sum((0, 2, 3))
    denom = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    dice = (2 * inter + eps) / (denom + eps)
    return F.cross_entropy(logits, target) + (1 - dice).mean()


def train_latent_segmenter(
    vae: PairVAE,
    images: np.ndarray,
    masks: np.ndarray,
    *,
    epochs: int = 20,
    lr: float = 1e-3,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    foreground_fraction: float | None = 0.5,
    progress: bool = True,
) -> LatentSegmenter:
    """Train the "seed baseline": segmentation read from the VAE's latent code.

    The PairVAE encoder needs the mask, which is unknown at test time. Feeding an
    all-zero mask would be out of distribution (the encoder then encodes "no
    foreground"), so instead a small image-only encoder regresses the frozen VAE's
    posterior mean of (image, true mask) (MSE), and a decoder is trained with Dice+CE
    to predict the mask from that code, detached so segmentation gradients never shape
    the latent. Everything the decoder knows thus passes through the VAE latent.

    Args:
        vae: trained PairVAE (frozen, not modified).
        images: float32 (N, C, H, W) z-scored; masks: uint8 (N, H, W).

    Returns:
        The segmenter (eval mode) with ``history`` rows {epoch, latent_mse, dice_ce, seconds}.
    """
    _require_trained(vae)
    _check_data(images, masks, vae.image_size, vae.in_channels, vae.num_classes)
    device = torch.device(device)
    vae.to(device).eval()
    targets = _encode_means(vae, images, masks).cpu()
    torch.manual_seed(seed)
    seg = LatentSegmenter(vae).to(device)
    optimizer = torch.optim.AdamW(seg.parameters(), lr=lr)
    x_all, m_all = (
        torch.from_numpy(np.ascontiguousarray(images, np.float32)),
        torch.from_numpy(masks),
    )
    has_fg = masks.reshape(len(masks), -1).any(axis=1)
    scaler = grad_scaler(device)
    for epoch in tqdm(range(epochs), desc="latent seg", disable=not progress):
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        idx = epoch_indices(has_fg, foreground_fraction, gen)
        seg.history.append(
            _seg_epoch(
                seg, optimizer, scaler, x_all, m_all, targets, idx, batch_size, device, epoch
            )
        )
    return seg.eval()


def _seg_epoch(
    seg: LatentSegmenter,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    x_all: torch.Tensor,
    m_all: torch.Tensor,
    targets: torch.Tensor,
    idx: torch.Tensor,
    batch_size: int,
    device: torch.device,
    epoch: int,
) -> dict:
    seg.train()
    t0 = time.monotonic()
    sums, n = [0.0, 0.0], 0
    for start in range(0, len(idx), batch_size):
        b = idx[start : start + batch_size]
        x, m, target = x_all[b].to(device), m_all[b].to(device).long(), targets[b].to(device)
        with autocast(device):
            z = seg.latent(x)
            latent_mse = F.mse_loss(z, target)
            seg_loss = dice_ce_loss(seg.decoder(z.detach()), m)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(latent_mse + seg_loss).backward()
        scaler.step(optimizer)
        scaler.update()
        sums[0] += latent_mse.item()
        sums[1] += seg_loss.item()
        n += 1
    n = max(n, 1)
    return {
        "epoch": epoch + 1,
        "latent_mse": sums[0] / n,
        "dice_ce": sums[1] / n,
        "seconds": time.monotonic() - t0,
    }


@torch.no_grad()
def predict_latent_segmenter(
    seg: LatentSegmenter, images: np.ndarray, batch_size: int = 64
) -> np.ndarray:
    """Images float32 (N, C, H, W) z-scored -> predicted masks uint8 (N, H, W)."""
    device = _device_of(seg)
    seg.eval()
    x = torch.from_numpy(np.asarray(images, np.float32))
    out = [
        seg(x[s : s + batch_size].to(device)).argmax(1).cpu() for s in range(0, len(x), batch_size)
    ]
    if not out:
        return np.zeros((0, *images.shape[2:]), np.uint8)
    return torch.cat(out).numpy().astype(np.uint8)
