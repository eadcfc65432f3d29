"""Mask-conditioned image generator with an adversarial loss: a SPADE VAE-GAN.

Given a label mask, it draws a realistic image whose anatomy follows the mask; the image
style (contrast, texture, surrounding anatomy) comes from a latent code ``z``, encoded from
a real image in training and drawn from N(0, I) when sampling, so one mask gives many
images. With a shape model (:mod:`lib.synth.shapes`) supplying new masks, this separates shape
from appearance, as Skandarani et al. (MIDL 2020) did for cardiac MRI.

Building blocks from MONAI: ``SPADENet`` (Park et al., CVPR 2019: spatially-adaptive
normalisation modulates every decoder block by the mask, so small structures are not
washed out), ``PatchDiscriminator`` (pix2pix, Isola et al. 2017) conditioned on the mask,
``PatchAdversarialLoss`` (least squares). Generator loss::

    adv_weight * LSGAN + feature_match_weight * L1(D features fake, real)
    + l1_weight * L1(image) + kl_weight * KL(q(z | image) || N(0, I))

The L1 and feature-matching terms (pix2pixHD, Wang et al. 2018) keep training stable on a
few hundred slices and a CPU budget; the perceptual VGG loss of SPADE is left out because
its pretrained weights cannot be fetched offline. Without the pixel L1 (``l1_weight=0``, as
in SPADE) nothing ties the style code to the image: on the heart MRI training slices at
128 px, 30 minutes on 2 CPU cores in fp32 gave samples that all share one layout (MS-SSIM
diversity far above real slices') and are smoother than with L1 (diary, 2026-12-01).
Trained by the shared trainer (:func:`lib.synth.generative.train_generator`); ``check_epoch``
stops a run whose discriminator wins.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import PatchDiscriminator, SPADENet
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
class SPADEGANConfig(GeneratorConfig):
    """Architecture and loss settings of :class:`SPADEGAN` (training-run fields: ``GeneratorConfig``)."""

    channels: tuple[int, ...] = (16, 32, 64, 128)  # encoder widths, full resolution first; decoder mirrors them
    z_dim: int = 32  # style code
    spade_channels: int = 32  # hidden width of each SPADE normalisation
    disc_channels: int = 32
    disc_layers: int = 3
    adv_weight: float = 1.0
    feature_match_weight: float = 10.0
    l1_weight: float = 10.0  # pixel L1 to the image the style code was encoded from (0: off; see the module docstring)
    kl_weight: float = 0.05
    disc_lr: float = 2e-4
    collapse_d_loss: float = 0.01  # the discriminator "wins" below this least-squares loss...
    collapse_patience: int = 10  # ...for this many epochs in a row
    epochs: int = 100
    batch_size: int = 16
    lr: float = 2e-4
    ema_decay: float | None = 0.999


class SPADEGAN(Generative):
    """SPADE generator (mask + style code -> image) with a mask-conditioned patch discriminator."""

    KIND = "spade_gan"
    CONFIG = SPADEGANConfig

    def __init__(self, cfg: SPADEGANConfig) -> None:
        super().__init__(cfg)
        if cfg.image_size % 2 ** len(cfg.channels):
            raise ValueError(f"image_size {cfg.image_size} must be divisible by 2**{len(cfg.channels)}")
        self.scaling = ImageScaling(cfg.in_channels)
        self.net = SPADENet(spatial_dims=2, in_channels=cfg.in_channels, out_channels=cfg.in_channels,
                            label_nc=cfg.num_classes, input_shape=(cfg.image_size, cfg.image_size),
                            channels=list(cfg.channels), z_dim=cfg.z_dim, is_vae=True,
                            spade_intermediate_channels=cfg.spade_channels, last_act="TANH")
        self.disc = PatchDiscriminator(spatial_dims=2, channels=cfg.disc_channels,
                                       in_channels=cfg.in_channels + cfg.num_classes, num_layers_d=cfg.disc_layers,
                                       norm="INSTANCE")
        self.adversarial = PatchAdversarialLoss(criterion="least_squares")

    def fit_data(self, images: np.ndarray, masks: np.ndarray) -> None:
        self.scaling.fit(images, seed=self.cfg.seed)

    def make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"g": torch.optim.Adam(self.net.parameters(), lr=self.cfg.lr, betas=(0.5, 0.999)),
                "d": torch.optim.Adam(self.disc.parameters(), lr=self.cfg.disc_lr, betas=(0.5, 0.999))}

    def ema_module(self) -> nn.Module:
        return self.net

    def train_step(self, images: torch.Tensor, masks: torch.Tensor, step: Step) -> dict[str, torch.Tensor]:
        cfg, device = self.cfg, images.device
        x, seg = self.scaling(images), one_hot(masks, cfg.num_classes)
        with autocast(device):
            fake, mu, logvar = self.net(seg, x)
        fake = fake.float()
        # discriminator: real pairs against generated ones
        self.disc.requires_grad_(True)
        with autocast(device):
            real_out = self.disc(torch.cat([x, seg], 1))
            fake_out = self.disc(torch.cat([fake.detach(), seg], 1))
        d_loss = 0.5 * (self.adversarial(real_out[-1].float(), True, True)
                        + self.adversarial(fake_out[-1].float(), False, True))
        step.optimizers["d"].zero_grad(set_to_none=True)
        step.scaler.scale(d_loss).backward()
        step.scaler.step(step.optimizers["d"])
        # generator: fool the discriminator, match its features, reconstruct, keep z Gaussian
        self.disc.requires_grad_(False)
        with autocast(device):
            fake_out = self.disc(torch.cat([fake, seg], 1))
        adv = self.adversarial(fake_out[-1].float(), True, False)
        feature_match = torch.stack([F.l1_loss(f.float(), r.detach().float())
                                     for f, r in zip(fake_out[:-1], real_out[:-1])]).mean()
        l1 = F.l1_loss(fake, x)
        kl = -0.5 * torch.mean(1 + logvar.float() - mu.float() ** 2 - logvar.float().exp())
        loss = cfg.adv_weight * adv + cfg.feature_match_weight * feature_match + cfg.l1_weight * l1 + cfg.kl_weight * kl
        step.optimizers["g"].zero_grad(set_to_none=True)
        step.scaler.scale(loss).backward()
        step.scaler.step(step.optimizers["g"])
        step.scaler.update()
        return {"loss": loss, "d_loss": d_loss, "adv": adv, "feature_match": feature_match, "l1": l1, "kl": kl}

    def check_epoch(self, row: dict[str, float], history: list[dict[str, Any]]) -> None:
        """Stop when the discriminator wins and the generator has stopped learning: the
        discriminator's loss below ``collapse_d_loss`` in each of the last ``collapse_patience``
        epochs (this one included) while none of the image terms the generator optimises
        (feature matching, and L1 when ``l1_weight`` > 0) came down over them. A discriminator
        that wins while the generator still improves is left alone (least-squares losses keep
        the generator's gradients alive)."""
        cfg, n = self.cfg, self.cfg.collapse_patience
        recent = [*history, row][-n:]
        terms = ["feature_match"] + ["l1"] * (cfg.l1_weight > 0)
        stalled = all(row[k] >= recent[0][k] for k in terms)
        if len(recent) == n and all(r["d_loss"] < cfg.collapse_d_loss for r in recent) and stalled:
            went = ", ".join(f"{k.replace('_', ' ')} from {recent[0][k]:.3f} to {row[k]:.3f}" for k in terms)
            raise TrainingCollapsed(
                f"spade_gan: the discriminator wins (its loss below {cfg.collapse_d_loss} for {n} epochs while "
                f"{went}) at epoch {row['epoch']}; training stopped, the checkpoint keeps epoch {row['epoch'] - 1}. "
                "Lower disc_lr or raise feature_match_weight.")


def train_gan(images: np.ndarray, masks: np.ndarray, cfg: SPADEGANConfig, *, device: str | torch.device = "cpu",
              out_dir: str | os.PathLike | None = None, keep_train_state: bool = True,
              progress: bool = True) -> tuple[SPADEGAN, list[dict]]:
    """Train (or resume) a :class:`SPADEGAN`; see :func:`lib.synth.generative.train_generator`."""
    return train_generator(SPADEGAN, images, masks, cfg, device=device, out_dir=out_dir,
                           keep_train_state=keep_train_state, progress=progress)


def load_gan(path: str | os.PathLike, device: str | torch.device = "cpu"
             ) -> tuple[SPADEGAN, SPADEGANConfig, list[dict]]:
    """Load ``(model, cfg, history)``; see :func:`lib.synth.generative.load_generator`."""
    return load_generator(SPADEGAN, path, device)


@torch.no_grad()
def generate_images(model: SPADEGAN, masks: np.ndarray, *, seed: int = 0, device: str | torch.device = "cpu",
                    batch_size: int = 32) -> np.ndarray:
    """Images for the given masks, one style code ``z ~ N(0, I)`` each (drawn on the CPU, so a
    seed gives the same images on every device).

    Args:
        masks: uint8 (N, H, W) class ids.

    Returns:
        float32 (N, C, H, W) images in z-score space.
    """
    model.require_trained()
    model.to(device).eval()
    z_all = torch.randn(len(masks), model.cfg.z_dim, generator=torch.Generator().manual_seed(seed))
    out = []
    for start in range(0, len(masks), batch_size):
        seg = one_hot(torch.from_numpy(np.asarray(masks[start:start + batch_size])).to(device), model.cfg.num_classes)
        with autocast(torch.device(device)):
            fake = model.net.decode(seg, z_all[start:start + batch_size].to(device))
        out.append(model.scaling.inverse(fake).cpu().numpy())
    s, c = model.cfg.image_size, model.cfg.in_channels
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, c, s, s), np.float32)
