"""Mask-conditioned denoising diffusion model for paired synthetic image/mask slices.

Why this model
--------------
A VAE decoder averages over the modes it cannot tell apart, so its samples are blurry.
A denoising diffusion model samples one mode instead of their mean and, conditioned
on a segmentation mask, gives sharp images whose anatomy follows the mask. This module
follows the recipe that the literature reports works for *paired* medical image + mask
synthesis with little data:

* "Anatomically-Controllable Medical Image Generation with Segmentation-Guided
  Diffusion Models" (Konz et al., 2024): a DDPM/DDIM U-Net denoiser gets the one-hot
  mask concatenated to the noisy image as extra input channels, so every generated
  image agrees with a given mask by construction. (Med-DDPM, Dorjsembe et al., 2024,
  conditions the same way to create image/label pairs for segmentation training.)
* Cosine noise schedule (Nichol & Dhariwal, 2021), which ends at (almost) zero signal,
  so sampling starts from the noise level training saw; v-prediction (Salimans & Ho,
  2022), well conditioned at both ends of the schedule, where predicting the noise
  is not; Min-SNR-5 loss weighting (Hang et al., 2023), which stops the nearly
  noise-free steps from dominating and speeds up convergence on small budgets.
* Deterministic DDIM sampling with ``eta = 0`` (Song et al., 2021) over ``sample_steps``
  evenly spaced steps that start at the last (pure-noise) training step ("trailing"
  spacing, Lin et al., 2024), with the x0 estimate clipped to the training range at
  every step; the output is the final clipped x0 estimate. Or (``sampler="dpmpp_2m"``)
  DPM-Solver++(2M) (Lu et al., 2022), a second-order multistep solver of the same
  probability-flow ODE that needs fewer model evaluations for the same error
  (:func:`_dpmpp_2m`).
* An exponential moving average (EMA) of the denoiser's weights is what is sampled
  and saved.

Building blocks from MONAI: ``DiffusionModelUNet`` (the denoiser; its middle block
always has self-attention, ``attention`` adds it at the lowest level too; it needs the
``einops`` package) and ``DDIMScheduler`` (noise schedule, ``add_noise``,
``get_velocity`` for training, ``step`` for sampling). ``DDPMScheduler`` is not used:
training needs only the schedule that both share, and its ancestral sampler takes
every one of the ``timesteps`` steps. MONAI's ``DDIMScheduler.set_timesteps`` spaces the
steps by ``linspace`` while its ``step`` jumps back by ``timesteps // sample_steps``, so
the two disagree (100 timesteps in 4 steps: the sample reaches noise level 74 but the
model is next asked about level 66); :func:`_set_trailing_timesteps` makes them agree.
Training, EMA, checkpoints and resuming are the shared trainer's
(:func:`lib.synth.generative.train_generator`).

New masks come from a *mask source* stored in the generator: the foreground masks of
the training set (the "mask bank") deformed by a random affine transform (rotation,
isotropic scale, translation) and a smooth random displacement field (bicubic
interpolation of a coarse Gaussian grid). A share ``empty_fraction`` of the masks are
empty, matching the share of training slices without foreground. The image is then
generated for the mask, so image-mask agreement holds by construction.

Foreground oversampling (``foreground_fraction``) spends the training budget on the
anatomy; it does not bias sampling, whose foreground share is set by the mask source.
Images are z-scored per volume; the model maps the training set's 0.5-99.5 percentile
range per channel onto [-1, 1] (:class:`lib.synth.generative.ImageScaling`) and back.

Limits
------
* A CPU demo (64x64, a few minutes of training, a few hundred optimiser steps) gives
  blurry, noisy textures rather than photo-realistic images; diffusion models need many
  thousand steps. Quality grows with ``epochs``, ``base_channels`` and ``image_size`` on a GPU.
* With little data a diffusion model can memorise training slices; check with
  ``lib.synth.quality.memorisation_distance``.
* The mask source only deforms training masks: it produces no new topologies and, in
  2D, no 3D consistency between slices. Intensities beyond the clip range are lost.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, NoiseSchedules
from torch import nn
from tqdm.auto import tqdm

from lib.common.env import autocast
from lib.synth.generative import (
    Generative,
    GeneratorConfig,
    ImageScaling,
    Step,
    load_generator,
    one_hot,
    train_generator,
)
from lib.synth.masks import deform_masks

SAMPLERS = {"ddim": "DDIM", "dpmpp_2m": "DPM-Solver++(2M)"}  # DiffusionConfig.sampler -> name shown while sampling


@dataclass
class DiffusionConfig(GeneratorConfig):
    """Hyper-parameters of a :class:`MaskDDPM`, its training run and its mask source.

    The defaults suit 64x64 slices on a CPU (lowest U-Net resolution 16x16). For 128-256
    add levels, e.g. ``channel_mults=(1, 2, 2, 4)``, so the bottleneck stays near 16x16;
    on a GPU widen (``base_channels`` 64), use ``res_blocks=2`` and ``attention=True``.
    ``epochs``, ``time_budget_min``, ``sample_steps`` and ``sampler`` may change when resuming.
    """

    base_channels: int = 32  # U-Net width at full resolution; level i has base_channels * channel_mults[i]
    channel_mults: tuple[int, ...] = (1, 2, 2)
    res_blocks: int = 1  # residual blocks per level on the way down (MONAI adds one on the way up)
    attention: bool = False  # self-attention at the lowest level as well as in the middle block
    timesteps: int = 1000
    schedule: str = "cosine"  # a MONAI noise schedule: "cosine", "scaled_linear_beta", ...
    sample_steps: int = 50  # denoising steps (model evaluations) of the sampler
    sampler: str = "ddim"  # "ddim" (deterministic DDIM) or "dpmpp_2m" (DPM-Solver++(2M): fewer steps, same error)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float | None = 0.995  # EMA of the denoiser for sampling; keep 1 / (1 - decay) well below the steps run
    min_snr_gamma: float | None = 5.0  # Min-SNR loss weighting (Hang et al., 2023); None: off
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
            raise ValueError(f"image_size {self.image_size} must be divisible by {factor} "
                             f"for channel_mults {self.channel_mults}")
        if not 1 <= self.sample_steps <= self.timesteps:
            raise ValueError(f"sample_steps must be in [1, timesteps], got {self.sample_steps}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {list(SAMPLERS)}")
        if self.schedule not in NoiseSchedules:
            raise ValueError(f"unknown noise schedule {self.schedule!r}; choose one of {NoiseSchedules.names}")


class MaskDDPM(Generative):
    """Denoiser (MONAI ``DiffusionModelUNet``) + noise schedule (MONAI ``DDIMScheduler``) +
    intensity scaling + mask source of one generator.

    Attributes:
        mask_bank: uint8 (M, H, W) foreground masks of the training set.
        empty_fraction: share of training slices without foreground.
    Both are set by :meth:`fit_data` and saved in the state dict (as extra state).
    """

    KIND = "mask_ddpm"
    CONFIG = DiffusionConfig

    def __init__(self, cfg: DiffusionConfig) -> None:
        super().__init__(cfg)
        chans = tuple(cfg.base_channels * m for m in cfg.channel_mults)
        self.scaling = ImageScaling(cfg.in_channels)
        self.net = DiffusionModelUNet(
            spatial_dims=2, in_channels=cfg.in_channels + cfg.num_classes, out_channels=cfg.in_channels,
            num_res_blocks=cfg.res_blocks, channels=chans,
            attention_levels=(False,) * (len(chans) - 1) + (cfg.attention,),
            norm_num_groups=math.gcd(8, *chans), num_head_channels=chans, use_flash_attention=True)
        self.scheduler = DDIMScheduler(num_train_timesteps=cfg.timesteps, schedule=cfg.schedule,
                                       prediction_type="v_prediction", clip_sample=True)
        self.mask_bank = np.zeros((0, cfg.image_size, cfg.image_size), np.uint8)
        self.empty_fraction = 0.0

    def fit_data(self, images: np.ndarray, masks: np.ndarray) -> None:
        """Clip range from the images; mask bank and empty share from the masks."""
        self.scaling.fit(images, seed=self.cfg.seed)
        has_fg = masks.reshape(len(masks), -1).any(axis=1)
        self.mask_bank = np.ascontiguousarray(masks[has_fg], dtype=np.uint8)
        self.empty_fraction = 1.0 - float(has_fg.mean())

    def get_extra_state(self) -> dict[str, torch.Tensor]:
        """The mask source, saved with the weights (its size varies with the data)."""
        return {"mask_bank": torch.from_numpy(self.mask_bank),
                "empty_fraction": torch.tensor(self.empty_fraction, dtype=torch.float64)}

    def set_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the mask source; ValueError if its masks do not fit ``cfg.image_size``."""
        bank = state["mask_bank"].cpu().numpy().astype(np.uint8)
        s = self.cfg.image_size
        if bank.ndim != 3 or bank.shape[1:] != (s, s):
            raise ValueError(f"mask bank of shape {bank.shape} does not fit image_size {s}")
        self.mask_bank, self.empty_fraction = bank, float(state["empty_fraction"])

    def make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"net": torch.optim.AdamW(self.net.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)}

    def ema_module(self) -> nn.Module:
        return self.net

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """v-prediction (B, C, H, W) for noisy images, integer timesteps (B,) and one-hot masks (B, K, H, W)."""
        return self.net(torch.cat([x_t, cond.to(x_t.dtype)], dim=1), t)

    def train_step(self, images: torch.Tensor, masks: torch.Tensor, step: Step) -> dict[str, torch.Tensor]:
        """One optimiser step on the (Min-SNR weighted) MSE of the v-prediction at uniform timesteps."""
        cfg, sched = self.cfg, self.scheduler
        x0 = self.scaling(images)
        t = torch.randint(0, cfg.timesteps, (len(x0),), device=x0.device, generator=step.noise)
        noise = torch.randn(x0.shape, device=x0.device, generator=step.noise)
        x_t = sched.add_noise(x0, noise, t)
        with autocast(x0.device):
            pred = self(x_t, t, one_hot(masks, cfg.num_classes))
        per_sample = (pred.float() - sched.get_velocity(x0, noise, t)).pow(2).mean(dim=(1, 2, 3))
        if cfg.min_snr_gamma is not None:
            # for v-prediction the Min-SNR weight is min(SNR, gamma) / (SNR + 1)
            alpha_bar = sched.alphas_cumprod[t]
            snr = alpha_bar / (1 - alpha_bar)
            per_sample = per_sample * snr.clamp(max=cfg.min_snr_gamma) / (snr + 1)
        loss = per_sample.mean()
        optimizer = step.optimizers["net"]
        optimizer.zero_grad(set_to_none=True)
        step.scaler.scale(loss).backward()
        step.scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(self.net.parameters(), cfg.grad_clip)
        step.scaler.step(optimizer)
        step.scaler.update()
        return {"loss": loss}


CHECKPOINT_NAME = f"{MaskDDPM.KIND}.pt"  # what train_diffusion writes in its out_dir


def train_diffusion(images: np.ndarray, masks: np.ndarray, cfg: DiffusionConfig, *, device: str | torch.device = "cpu",
                    out_dir: str | os.PathLike | None = None, keep_train_state: bool = True,
                    progress: bool = True) -> tuple[MaskDDPM, list[dict]]:
    """Train (or resume from ``<out_dir>/mask_ddpm.pt``) a :class:`MaskDDPM` on paired slices;
    see :func:`lib.synth.generative.train_generator`. History rows: epoch, loss, seconds."""
    return train_generator(MaskDDPM, images, masks, cfg, device=device, out_dir=out_dir,
                           keep_train_state=keep_train_state, progress=progress)


def load_diffusion(path: str | os.PathLike, device: str | torch.device = "cpu"
                   ) -> tuple[MaskDDPM, DiffusionConfig, list[dict]]:
    """Load ``(model, cfg, history)``; see :func:`lib.synth.generative.load_generator`."""
    return load_generator(MaskDDPM, path, device)


# ---------------------------------------------------------------------- sampling


def sample_masks(model: MaskDDPM, n: int, *, seed: int = 0) -> np.ndarray:
    """New masks from the model's mask source: uint8 (n, H, W).

    A share ``model.empty_fraction`` are empty; the rest are randomly chosen bank masks
    deformed with :func:`lib.synth.masks.deform_masks` using the deformation settings in
    ``model.cfg``.
    """
    model.require_trained()
    cfg = model.cfg
    rng = np.random.default_rng(seed)
    out = np.zeros((n, cfg.image_size, cfg.image_size), np.uint8)
    if len(model.mask_bank) == 0:
        return out
    full = rng.random(n) >= model.empty_fraction
    src = rng.integers(0, len(model.mask_bank), n)[full]
    out[full] = deform_masks(model.mask_bank[src], cfg.num_classes, seed=int(rng.integers(2**31)),
                             max_rotation_deg=cfg.max_rotation_deg, scale_range=cfg.scale_range,
                             max_shift=cfg.max_shift, elastic_amplitude=cfg.elastic_amplitude,
                             elastic_grid=cfg.elastic_grid)
    return out


def _set_trailing_timesteps(scheduler: DDIMScheduler, steps: int) -> None:
    """``steps`` timesteps T-1, T-1-k, ... with k = T // steps, the jump ``scheduler.step`` makes."""
    scheduler.set_timesteps(steps)
    stride = scheduler.num_train_timesteps // steps
    scheduler.timesteps = torch.arange(scheduler.num_train_timesteps - 1, -1, -stride)[:steps]


@torch.no_grad()
def _ddim(model: MaskDDPM, cond: torch.Tensor, x: torch.Tensor, steps: int, bar: tqdm | None = None) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) in ``steps`` steps from noise ``x``; returns the last clipped x0
    estimate (model space). ``bar`` advances by one per denoising step."""
    scheduler = model.scheduler
    _set_trailing_timesteps(scheduler, steps)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(x.device)  # a plain attribute: .to() does not move it
    x0 = x
    for t in scheduler.timesteps.tolist():
        with autocast(x.device):
            v = model(x, torch.full((len(x),), t, device=x.device), cond).float()
        x, x0 = scheduler.step(v, t, x)
        if bar is not None:
            bar.update()
    return x0


def _dpm_timesteps(timesteps: int, steps: int) -> list[int]:
    """``steps`` distinct timesteps from T-1 down to 0, quadratic in time: t_i = (T-1) (1 - i/(steps-1))^2
    (DDIM's "quadratic" spacing), rounded, then raised where needed to keep them distinct.

    Why not DDIM's trailing grid: it stops at t = T/steps (49 of 1000 for 20 steps), and the x0
    estimate there, a posterior mean at noise level sigma ~ 0.09, blurs whatever detail is
    fainter than that; a uniform grid that ends at t = 0 instead makes its last step so long in
    log-SNR (lambda 2.4 -> 5.0 of the cosine schedule) that the second-order extrapolation
    overshoots. The quadratic grid ends at t = 0 in short steps (..., 25, 11, 3, 0 for 20 steps).
    """
    frac = 1 - np.arange(steps) / max(steps - 1, 1)
    ts = np.rint((timesteps - 1) * frac**2).astype(int)
    for i in range(steps - 2, -1, -1):
        ts[i] = max(ts[i], ts[i + 1] + 1)
    return ts.tolist()


@torch.no_grad()
def _dpmpp_2m(model: MaskDDPM, cond: torch.Tensor, x: torch.Tensor, steps: int, bar: tqdm | None = None
              ) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al., 2022, Algorithm 2, data prediction; as diffusers'
    ``DPMSolverMultistepScheduler`` with ``solver_type="midpoint"``) in ``steps`` model evaluations
    from noise ``x`` at the timesteps of :func:`_dpm_timesteps`; returns the clipped x0 estimate at
    t = 0 (model space). ``bar`` advances by one per model evaluation.

    With alpha_t = sqrt(alphas_cumprod[t]), sigma_t = sqrt(1 - alphas_cumprod[t]), lambda_t =
    log(alpha_t / sigma_t) and the clipped data prediction D_t = clip(alpha_t x_t - sigma_t v), a
    step from t_{i-1} to t_i (h_i = lambda_{t_i} - lambda_{t_{i-1}}) is

        x_{t_i} = sigma_{t_i} / sigma_{t_{i-1}} x_{t_{i-1}} - alpha_{t_i} (exp(-h_i) - 1) D,

    first order (the first step, and the last for fewer than 15 steps, as diffusers'
    ``lower_order_final``): D = D_{t_{i-1}}, a DDIM step (MONAI's DDIM takes the noise from the
    unclipped x0, so the two differ only where x0 is clipped); second order otherwise:
    D = D_{t_{i-1}} + (D_{t_{i-1}} - D_{t_{i-2}}) / (2 r), r = h_{i-1} / h_i. The x0 estimate at the
    last timestep is the output: a first-order step to sigma = 0.
    """
    a = model.scheduler.alphas_cumprod.double().cpu()
    alpha, sigma = a.sqrt(), (1 - a).sqrt()
    lam = torch.log(alpha) - torch.log(sigma)
    lo, hi = model.scheduler.clip_sample_values if model.scheduler.clip_sample else (-math.inf, math.inf)
    ts = _dpm_timesteps(len(a), steps)
    d = d_prev = h_prev = None
    for i, t in enumerate(ts):
        with autocast(x.device):
            v = model(x, torch.full((len(x),), t, device=x.device), cond).float()
        d = (float(alpha[t]) * x - float(sigma[t]) * v).clamp(lo, hi)
        if bar is not None:
            bar.update()
        if i == len(ts) - 1:
            break
        s = ts[i + 1]
        h = float(lam[s] - lam[t])
        first_order = d_prev is None or (i == len(ts) - 2 and len(ts) < 15)
        dd = d if first_order else d + (d - d_prev) * (h / (2 * h_prev))
        x = float(sigma[s] / sigma[t]) * x - float(alpha[s] * math.expm1(-h)) * dd
        d_prev, h_prev = d, h
    return d


_SAMPLE = {"ddim": _ddim, "dpmpp_2m": _dpmpp_2m}


def generate_images(model: MaskDDPM, masks: np.ndarray, *, seed: int = 0, device: str | torch.device = "cpu",
                    batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """Images for given masks with ``model.cfg.sampler`` in ``model.cfg.sample_steps`` steps (noise
    drawn on the CPU, so seeds agree across devices and batch sizes); ``progress``: a bar over the
    denoising steps of all batches.

    Args:
        masks: uint8 (n, H, W) class ids.

    Returns:
        float32 (n, C, H, W) in z-score space.
    """
    model.require_trained()
    cfg = model.cfg
    s, c = cfg.image_size, cfg.in_channels
    if masks.ndim != 3 or masks.shape[1:] != (s, s):
        raise ValueError(f"masks must have shape (n, {s}, {s}), got {masks.shape}")
    if masks.size and masks.max() >= cfg.num_classes:
        raise ValueError(f"mask values must be < {cfg.num_classes}, got {masks.max()}")
    sample = _SAMPLE[cfg.sampler]
    device = torch.device(device)
    model.to(device).eval()
    noise = torch.randn((len(masks), c, s, s), generator=torch.Generator().manual_seed(seed))
    out = [np.zeros((0, c, s, s), np.float32)]
    starts = range(0, len(masks), batch_size)
    with tqdm(total=len(starts) * cfg.sample_steps, desc=f"{SAMPLERS[cfg.sampler]} sampling, {len(masks)} images",
              unit="step", disable=not progress, mininterval=5) as bar:
        for start in starts:
            m = torch.from_numpy(np.ascontiguousarray(masks[start:start + batch_size])).to(device)
            x0 = sample(model, one_hot(m, cfg.num_classes), noise[start:start + batch_size].to(device),
                        cfg.sample_steps, bar)
            out.append(model.scaling.inverse(x0).cpu().numpy())
    return np.concatenate(out)


def sample_pairs(model: MaskDDPM, n: int, *, seed: int = 0, device: str | torch.device = "cpu",
                 batch_size: int = 64, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """New (image, mask) pairs: masks from the mask source, images generated for them.

    Returns:
        images float32 (n, C, H, W) in z-score space, masks uint8 (n, H, W).
    """
    mask_seed, image_seed = np.random.SeedSequence(seed).generate_state(2)
    masks = sample_masks(model, n, seed=int(mask_seed))
    images = generate_images(model, masks, seed=int(image_seed), device=device, batch_size=batch_size,
                             progress=progress)
    return images, masks
