"""Paired image/mask variational autoencoders for synthetic 2D training data: a VAE and a VAE-GAN.

``PairVAE`` models the joint distribution of an image slice and its label mask: the
encoder sees the image channels concatenated with the one-hot mask, a dense bottleneck
gives a ``latent_dim`` Gaussian code, and the decoder has two heads (image and mask
logits). Sampling ``z ~ N(0, I)`` and decoding gives new (image, mask) pairs.

Loss (per pixel, so the learning rate does not depend on the image size)::

    loss = sum_c MSE(image) + mask_weight * CE(mask) + beta_e * KL / (H * W)

With ``beta = mask_weight = 1`` this is the negative ELBO divided by ``H * W``
(Gaussian image likelihood with variance 1/2 in the scaled space, categorical mask).
``beta_e`` ramps linearly from 0 (first epoch) to ``beta`` over ``kl_warmup_epochs``.

The pixel-wise likelihood makes VAE images blurry. ``PairVAEGAN`` is the same VAE with
the fix of Larsen et al. (2016, "Autoencoding beyond pixels using a learned similarity
metric"): a discriminator (MONAI's ``PatchDiscriminator``) judges real pairs against
reconstructions and prior samples, and the VAE also learns to fool it and to match its
intermediate features on real pairs (see :class:`PairVAEGAN`).

Images are z-scored per volume; :class:`lib.synth.generative.ImageScaling` maps the training
set's 0.5-99.5 percentile range onto [-1, 1] (the range of the ``tanh`` image head).
Both models are trained by :func:`lib.synth.generative.train_generator` (foreground
oversampling, per-epoch seeding, resuming, time budget, NaN guard, checkpoint
``<out_dir>/<KIND>.pt``); with the default ``foreground_fraction`` samples over-represent
foreground slices relative to the data, which a synthetic-training-data pipeline wants.

The latent segmentation baseline of the study, read from a trained VAE's latent code, is
:mod:`lib.study.latent`.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import PatchDiscriminator
from torch import nn

from lib.common.env import autocast
from lib.synth.generative import (
    Generative,
    GeneratorConfig,
    ImageScaling,
    Step,
    TrainingCollapsed,
    load_generator,
    one_hot,
    train_generator,
)


@dataclass
class VAEConfig(GeneratorConfig):
    """Hyper-parameters of a ``PairVAE`` (the training-run fields come from ``GeneratorConfig``)."""

    latent_dim: int = 64
    base_channels: int = 32
    beta: float = 1.0
    kl_warmup_epochs: int = 10
    mask_weight: float = 1.0


@dataclass
class VAEGANConfig(VAEConfig):
    """A ``VAEConfig`` plus the discriminator and adversarial terms of a ``PairVAEGAN``."""

    adv_weight: float = 0.05  # least-squares adversarial loss, against the per-pixel reconstruction terms
    feature_match_weight: float = 0.5  # L1 between discriminator features of real and reconstructed pairs
    disc_lr: float = 2e-4
    disc_channels: int = 32
    disc_layers: int = 3  # needs image_size >= 4 * 2**disc_layers
    collapse_d_loss: float = 0.02  # the discriminator "wins" below this loss (0.25 when it cannot tell)...
    collapse_patience: int = 3  # ...for this many epochs in a row, the generator's adversarial loss not falling


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


class VAEOutput(NamedTuple):
    """``forward`` result; ``image_scaled`` is in the model's [-1, 1] space."""

    image_scaled: torch.Tensor  # (B, C, H, W)
    mask_logits: torch.Tensor  # (B, K, H, W)
    mu: torch.Tensor  # (B, latent_dim)
    logvar: torch.Tensor  # (B, latent_dim)


def vae_loss(
    out: VAEOutput, target: torch.Tensor, masks: torch.Tensor, beta: float, mask_weight: float
) -> dict[str, torch.Tensor]:
    """Loss terms of a forward pass: target images (B, C, H, W) in the scaled space, masks (B, H, W) int.

    Returns:
        Scalars ``loss`` (the weighted sum in the module docstring), ``recon_image``
        (channel-summed MSE per pixel, scaled space), ``recon_mask`` (CE per pixel) and
        ``kl`` (nats per sample).
    """
    recon_image = (out.image_scaled.float() - target).pow(2).sum(1).mean()
    recon_mask = F.cross_entropy(out.mask_logits.float(), masks.long())
    kl = (-0.5 * (1 + out.logvar - out.mu.pow(2) - out.logvar.exp()).sum(1)).mean()
    n_pix = target.shape[-1] * target.shape[-2]
    loss = recon_image + mask_weight * recon_mask + beta * kl / n_pix
    return {"loss": loss, "recon_image": recon_image, "recon_mask": recon_mask, "kl": kl}


def _backward_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    """Gradients of ``loss`` and one (scaled) step of ``optimizer``; the caller updates the scaler."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)


class PairVAE(Generative):
    """Convolutional VAE over (image, one-hot mask) pairs with a dense latent.

    Attributes:
        trained_epochs: epochs of training behind the weights (0 = untrained).
    """

    KIND = "pair_vae"
    VERSION = 2  # 1: the stand-alone trainer's vae.pt
    CONFIG = VAEConfig

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__(cfg)
        self.scaling = ImageScaling(cfg.in_channels)
        self.encoder = _ConvEncoder(
            cfg.in_channels + cfg.num_classes, cfg.image_size, cfg.base_channels, 2 * cfg.latent_dim
        )
        self.decoder = _ConvDecoder(cfg.latent_dim, cfg.image_size, cfg.base_channels)
        self.image_head = nn.Conv2d(cfg.base_channels, cfg.in_channels, 3, padding=1)
        self.mask_head = nn.Conv2d(cfg.base_channels, cfg.num_classes, 3, padding=1)

    def fit_data(self, images: np.ndarray, masks: np.ndarray) -> None:
        """Fit the intensity scaling to the training images."""
        self.scaling.fit(images, seed=self.cfg.seed)

    def vae_parameters(self) -> Iterator[nn.Parameter]:
        """Encoder and decoder weights (what the "g" optimiser trains)."""
        modules = (self.encoder, self.decoder, self.image_head, self.mask_head)
        return itertools.chain.from_iterable(m.parameters() for m in modules)

    def make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"g": torch.optim.AdamW(self.vae_parameters(), lr=self.cfg.lr)}

    def beta_at(self, epoch: int) -> float:
        """KL weight in 1-based ``epoch``: linear from 0 (epoch 1) to ``beta`` over the warm-up."""
        cfg = self.cfg
        return cfg.beta * min(1.0, (epoch - 1) / cfg.kl_warmup_epochs) if cfg.kl_warmup_epochs > 0 else cfg.beta

    def encode(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) in z-score space, masks (B, H, W) int -> mu, logvar (B, latent_dim)."""
        onehot = one_hot(masks, self.cfg.num_classes).to(images.dtype)
        h = self.encoder(torch.cat([self.scaling(images), onehot], dim=1))
        mu, logvar = h.float().chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def decode_scaled(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (B, latent_dim) -> image in [-1, 1] (B, C, H, W), mask logits (B, K, H, W)."""
        h = self.decoder(z)
        return torch.tanh(self.image_head(h)), self.mask_head(h)

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (B, latent_dim) -> image in z-score space (B, C, H, W), mask logits (B, K, H, W)."""
        image, logits = self.decode_scaled(z)
        return self.scaling.inverse(image), logits.float()

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> VAEOutput:
        """Encode, sample z with the reparameterisation trick (mean in eval mode), decode."""
        mu, logvar = self.encode(images, masks)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        image, logits = self.decode_scaled(z)
        return VAEOutput(image, logits, mu, logvar)

    def vae_terms(self, images: torch.Tensor, masks: torch.Tensor, epoch: int
                  ) -> tuple[VAEOutput, dict[str, torch.Tensor | float]]:
        """Forward pass and :func:`vae_loss` terms (plus the epoch's ``beta``) for a batch."""
        beta = self.beta_at(epoch)
        with autocast(images.device):
            out = self(images, masks)
        return out, vae_loss(out, self.scaling(images), masks, beta, self.cfg.mask_weight) | {"beta": beta}

    def train_step(self, images: torch.Tensor, masks: torch.Tensor, step: Step) -> dict[str, torch.Tensor | float]:
        """One AdamW step on the :func:`vae_loss` of the batch."""
        _, terms = self.vae_terms(images, masks, step.epoch)
        _backward_step(terms["loss"], step.optimizers["g"], step.scaler)
        step.scaler.update()
        return terms


def _hard_one_hot(logits: torch.Tensor) -> torch.Tensor:
    """One-hot argmax of (B, K, H, W) logits with the softmax's gradient (straight-through)."""
    probs = logits.float().softmax(1)
    return one_hot(probs.argmax(1), probs.shape[1]) + probs - probs.detach()


class PairVAEGAN(PairVAE):
    """A ``PairVAE`` trained against a patch discriminator (VAE-GAN, Larsen et al. 2016).

    The discriminator sees (image, mask) pairs: the image in the scaled space with the
    one-hot mask; generated masks are hard one-hot too (straight-through gradient of the
    softmax), so it cannot tell them by their soft probabilities. Per batch, first the
    discriminator step, least squares (LSGAN, Mao et al. 2017)::

        d_loss = 1/2 (D(real) - 1)^2 + 1/4 D(recon)^2 + 1/4 D(prior)^2

    on real pairs, reconstructions and samples decoded from ``z ~ N(0, I)``; then the
    generator step::

        loss = vae_loss + adv_weight * g_adv + feature_match_weight * feature_match
        g_adv = 1/2 (D(recon) - 1)^2 + 1/2 (D(prior) - 1)^2
        feature_match = mean over D's hidden layers of L1(features(recon), features(real))

    Feature matching is the learned similarity of Larsen et al. (their Dis_l), on every
    hidden layer as in pix2pixHD. :meth:`check_epoch` stops a run whose discriminator wins.
    """

    KIND = "pair_vae_gan"
    CONFIG = VAEGANConfig

    def __init__(self, cfg: VAEGANConfig) -> None:
        super().__init__(cfg)
        if cfg.image_size < 4 * 2**cfg.disc_layers:
            raise ValueError(f"disc_layers={cfg.disc_layers} is too deep for image_size {cfg.image_size}: "
                             f"use at most {int(math.log2(cfg.image_size // 4))}")
        self.disc = PatchDiscriminator(spatial_dims=2, channels=cfg.disc_channels,
                                       in_channels=cfg.in_channels + cfg.num_classes,
                                       num_layers_d=cfg.disc_layers, norm="INSTANCE")
        self.adversarial = PatchAdversarialLoss(criterion="least_squares", no_activation_leastsq=True)

    def make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        d = torch.optim.Adam(self.disc.parameters(), lr=self.cfg.disc_lr, betas=(0.5, 0.999))
        return super().make_optimizers() | {"d": d}

    def _judge(self, real: torch.Tensor, recon: torch.Tensor, prior: torch.Tensor
               ) -> list[tuple[torch.Tensor, ...]]:
        """Discriminator features, layer by layer (output last), each split into (real, recon, prior).

        One pass over the three batches: instance normalisation keeps the samples independent.
        """
        with autocast(real.device):
            outs = self.disc(torch.cat([real, recon, prior]))
        return [o.float().split(len(real)) for o in outs]

    def train_step(self, images: torch.Tensor, masks: torch.Tensor, step: Step) -> dict[str, torch.Tensor | float]:
        """One discriminator step, then one generator (VAE) step; see the class docstring."""
        out, terms = self.vae_terms(images, masks, step.epoch)
        z = torch.randn(len(images), self.cfg.latent_dim, generator=step.noise, device=images.device)
        with autocast(images.device):
            prior_image, prior_logits = self.decode_scaled(z)
        real = torch.cat([self.scaling(images), one_hot(masks, self.cfg.num_classes)], 1)
        recon = torch.cat([out.image_scaled.float(), _hard_one_hot(out.mask_logits)], 1)
        prior = torch.cat([prior_image.float(), _hard_one_hot(prior_logits)], 1)

        self.disc.requires_grad_(True)
        d_real, d_recon, d_prior = self._judge(real, recon.detach(), prior.detach())[-1]
        d_loss = (0.5 * self.adversarial(d_real, True, True)
                  + 0.25 * (self.adversarial(d_recon, False, True) + self.adversarial(d_prior, False, True)))
        _backward_step(d_loss, step.optimizers["d"], step.scaler)

        self.disc.requires_grad_(False)
        *hidden, (_, d_recon, d_prior) = self._judge(real, recon, prior)
        g_adv = 0.5 * (self.adversarial(d_recon, True, False) + self.adversarial(d_prior, True, False))
        feature_match = torch.stack([F.l1_loss(f_recon, f_real.detach()) for f_real, f_recon, _ in hidden]).mean()
        loss = terms["loss"] + self.cfg.adv_weight * g_adv + self.cfg.feature_match_weight * feature_match
        _backward_step(loss, step.optimizers["g"], step.scaler)
        step.scaler.update()
        return terms | {"loss": loss, "vae_loss": terms["loss"], "g_adv": g_adv, "feature_match": feature_match,
                        "d_loss": d_loss}

    def check_epoch(self, row: dict[str, float], history: list[dict[str, Any]]) -> None:
        """Stop when the discriminator wins: its loss below ``collapse_d_loss`` in each of the last
        ``collapse_patience`` epochs (this one included) while the generator's adversarial loss has
        not come down over them (the generator is not catching up; more epochs only sharpen the
        discriminator, whose gradients then stop helping the VAE)."""
        cfg, n = self.cfg, self.cfg.collapse_patience
        recent = [*history, row][-n:]
        if (len(recent) == n and all(r["d_loss"] < cfg.collapse_d_loss for r in recent)
                and row["g_adv"] >= recent[0]["g_adv"]):
            raise TrainingCollapsed(
                f"{self.KIND}: the discriminator wins (d_loss < {cfg.collapse_d_loss} for {n} epochs while "
                f"g_adv went from {recent[0]['g_adv']:.3f} to {row['g_adv']:.3f}) at epoch {row['epoch']}; "
                f"training stopped, the checkpoint keeps epoch {row['epoch'] - 1}. Lower disc_lr or "
                "adv_weight, or use fewer disc_layers.")


CHECKPOINT_NAME = f"{PairVAE.KIND}.pt"  # in train_vae's out_dir
GAN_CHECKPOINT_NAME = f"{PairVAEGAN.KIND}.pt"


# ------------------------------------------------------------------ train and load


def train_vae(
    images: np.ndarray,
    masks: np.ndarray,
    cfg: VAEConfig,
    *,
    device: str | torch.device = "cpu",
    out_dir: str | os.PathLike | None = None,
    keep_train_state: bool = True,
    progress: bool = True,
) -> tuple[PairVAE, list[dict]]:
    """Train (or resume) a ``PairVAE``, or a ``PairVAEGAN`` for a ``VAEGANConfig``.

    A thin wrapper over :func:`lib.synth.generative.train_generator` (see it for the arguments,
    the checkpoint ``<out_dir>/pair_vae.pt`` or ``pair_vae_gan.pt`` and the errors). History
    rows hold the epoch, the mean loss terms of :meth:`PairVAE.train_step` (or
    :meth:`PairVAEGAN.train_step`), ``beta`` and ``seconds``.
    """
    cls = PairVAEGAN if isinstance(cfg, VAEGANConfig) else PairVAE
    return train_generator(cls, images, masks, cfg, device=device, out_dir=out_dir, keep_train_state=keep_train_state,
                           progress=progress)


def _checkpoint_class(path: str | os.PathLike) -> type[PairVAE]:
    """The class named by a checkpoint's kind (``PairVAE`` for any other kind or an unreadable
    file: :func:`lib.synth.generative.load_generator` then says what is wrong)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # torch raises many types for missing or corrupt files
        return PairVAE
    return PairVAEGAN if isinstance(ckpt, dict) and ckpt.get("kind") == PairVAEGAN.KIND else PairVAE


def load_vae(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[PairVAE, VAEConfig, list[dict]]:
    """Load ``(model, cfg, history)`` of a ``PairVAE`` or ``PairVAEGAN`` checkpoint (by its kind).

    See :func:`lib.synth.generative.load_generator` for the errors; the model is in eval mode.
    """
    return load_generator(_checkpoint_class(path), path, device)


# -------------------------------------------------------------------------- sampling


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to_numpy(images: torch.Tensor, logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    return images.float().cpu().numpy().astype(np.float32), logits.argmax(1).cpu().numpy().astype(np.uint8)


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

    Raises:
        RuntimeError: the model is untrained.
    """
    model.require_trained()
    model.to(device).eval()
    z_all = torch.randn(n, model.cfg.latent_dim, generator=torch.Generator().manual_seed(seed))
    pairs = [_to_numpy(*model.decode(z_all[s:s + batch_size].to(device))) for s in range(0, n, batch_size)]
    if not pairs:
        s, c = model.cfg.image_size, model.cfg.in_channels
        return np.zeros((0, c, s, s), np.float32), np.zeros((0, s, s), np.uint8)
    return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])


@torch.no_grad()
def _encode_means(model: PairVAE, images: np.ndarray, masks: np.ndarray, batch_size: int = 64) -> torch.Tensor:
    """Posterior means (N, latent_dim) on the model's device."""
    device = _device_of(model)
    model.eval()
    x, m = torch.from_numpy(np.asarray(images, np.float32)), torch.from_numpy(np.asarray(masks)).long()
    return torch.cat([model.encode(x[s:s + batch_size].to(device), m[s:s + batch_size].to(device))[0]
                      for s in range(0, len(x), batch_size)])


@torch.no_grad()
def reconstruct(model: PairVAE, images: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
