"""The latent segmentation baseline of the study (its "seed baseline"): segmentation read from
the latent code of a trained paired VAE (:mod:`lib.synth.vae`), the study's ``latent`` condition.

A small image-only encoder regresses the frozen VAE's posterior mean of (image, true mask), and
a decoder predicts the mask from that (detached) code; see :func:`train_latent_segmenter`.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lib.common.env import autocast, grad_scaler
from lib.seg.train import loss_fn
from lib.synth.generative import ImageScaling, check_pairs, epoch_indices
from lib.synth.vae import (
    PairVAE,
    _backward_step,
    _ConvDecoder,
    _ConvEncoder,
    _device_of,
    _encode_means,
)


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
        cfg = vae.cfg
        self.scaling = ImageScaling(cfg.in_channels)
        self.scaling.load_state_dict(vae.scaling.state_dict())
        self.encoder = _ConvEncoder(cfg.in_channels, cfg.image_size, base_channels, cfg.latent_dim)
        self.decoder = LatentSegDecoder(cfg.latent_dim, cfg.image_size, cfg.num_classes, base_channels)
        self.history: list[dict] = []

    def latent(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, S, S) in z-score space -> latent estimate (B, latent_dim)."""
        return self.encoder(self.scaling(images)).float()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, S, S) -> mask logits (B, K, S, S)."""
        return self.decoder(self.latent(images).detach())


def train_latent_segmenter(
    vae: PairVAE,
    images: np.ndarray,
    masks: np.ndarray,
    *,
    epochs: int = 20,
    steps: int | None = None,
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
        vae: trained PairVAE or PairVAEGAN (frozen, not modified).
        images: float32 (N, C, H, W) z-scored; masks: uint8 (N, H, W).
        steps: optimiser steps in all (the last epoch is cut short); None: ``epochs`` full epochs.

    Returns:
        The segmenter (eval mode) with ``history`` rows {epoch, latent_mse, dice_ce, seconds}.
    """
    vae.require_trained()
    check_pairs(images, masks, vae.cfg.image_size, vae.cfg.in_channels, vae.cfg.num_classes)
    device = torch.device(device)
    vae.to(device).eval()
    targets = _encode_means(vae, images, masks).cpu()
    torch.manual_seed(seed)
    seg = LatentSegmenter(vae).to(device)
    optimizer = torch.optim.AdamW(seg.parameters(), lr=lr)
    x_all, m_all = torch.from_numpy(np.ascontiguousarray(images, np.float32)), torch.from_numpy(masks)
    has_fg = masks.reshape(len(masks), -1).any(axis=1)
    scaler = grad_scaler(device)
    criterion = loss_fn(vae.cfg.num_classes, softmax=True)  # the segmenters' Dice + cross-entropy
    per_epoch = math.ceil(len(images) / batch_size)
    total = steps if steps is not None else epochs * per_epoch
    for epoch in tqdm(range(math.ceil(total / per_epoch)), desc="latent seg", disable=not progress):
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        idx = epoch_indices(has_fg, foreground_fraction, gen)[: (total - epoch * per_epoch) * batch_size]
        seg.history.append(
            _seg_epoch(seg, optimizer, scaler, criterion, x_all, m_all, targets, idx, batch_size, device, epoch)
        )
    return seg.eval()


def _seg_epoch(
    seg: LatentSegmenter,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    criterion: nn.Module,
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
            seg_loss = criterion(seg.decoder(z.detach()), m)
        _backward_step(latent_mse + seg_loss, optimizer, scaler)
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
def predict_latent_segmenter(seg: LatentSegmenter, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Images float32 (N, C, H, W) z-scored -> predicted masks uint8 (N, H, W)."""
    device = _device_of(seg)
    seg.eval()
    x = torch.from_numpy(np.asarray(images, np.float32))
    out = [seg(x[s : s + batch_size].to(device)).argmax(1).cpu() for s in range(0, len(x), batch_size)]
    if not out:
        return np.zeros((0, *images.shape[2:]), np.uint8)
    return torch.cat(out).numpy().astype(np.uint8)
