"""Batched data augmentation on tensors, applied to image and mask together.

Augmentations run on whole batches on the training device (one ``grid_sample`` per
batch for flips, rotation, scaling and elastic deformation together), so the GPU is
never waiting for a per-sample CPU pipeline and the CPU path stays vectorised.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugmentConfig:
    """Augmentation strengths; ``p`` is the probability per sample of each family."""

    flip: bool = True
    rotate_deg: float = 15.0
    scale: tuple[float, float] = (0.85, 1.15)
    translate: float = 0.1  # largest shift, as a share of the image side
    elastic_alpha: float = 0.03
    elastic_grid: int = 4
    brightness: float = 0.1
    contrast: tuple[float, float] = (0.8, 1.25)
    gamma: tuple[float, float] = (0.8, 1.25)
    noise_std: float = 0.05
    p: float = 0.5
    mirror_swap: tuple[tuple[int, int], ...] = ()  # label pairs exchanged in mirrored samples (left/right organs)

    def to_dict(self) -> dict:
        return asdict(self)


_SIDE = re.compile(r"(?:^|[^a-z])(left|right|l|r)(?:$|[^a-z])|(left|right)")


def lateral_pairs(labels: Mapping[int, str]) -> tuple[tuple[int, int], ...]:
    """Label pairs that are mirror images of each other: names that differ only by left/right
    (``LeftParotid``/``RightParotid``, ``kidney_L``/``kidney_R``). A mirrored slice shows the
    left organ where and as the right one would be, so flips must exchange these labels."""
    found: dict[str, dict[str, int]] = {}
    for label, name in labels.items():
        low = name.lower()
        match = _SIDE.search(low)
        if match is None:
            continue
        side = (match.group(1) or match.group(2))[0]
        rest = (low[:match.start()] + "|" + low[match.end():]).strip(" _-|")
        found.setdefault(rest, {})[side] = int(label)
    return tuple(sorted((d["l"], d["r"]) for d in found.values() if set(d) == {"l", "r"}))


def swap_table(pairs: Sequence[tuple[int, int]], classes: int) -> torch.Tensor:
    """Index table mapping each class to its mirror partner (itself when it has none)."""
    table = torch.arange(classes)
    for a, b in pairs:
        table[a], table[b] = b, a
    return table


def _apply(mask_p: torch.Tensor, value: torch.Tensor, identity: float) -> torch.Tensor:
    """``value`` where the Bernoulli draw says so, else ``identity``."""
    return torch.where(mask_p, value, torch.full_like(value, identity))


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=g, device="cpu").to(device) * (hi - lo) + lo


def spatial_grid(n: int, size: tuple[int, int], cfg: AugmentConfig, g: torch.Generator,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random sampling grid (N, H, W, 2) combining flip, rotation, scale and elastic warp, and
    which samples it mirrors (one flip: a reflection; two flips are a rotation)."""
    draw = lambda: torch.rand(n, generator=g).to(device) < cfg.p  # noqa: E731
    angle = _apply(draw(), _uniform(n, -cfg.rotate_deg, cfg.rotate_deg, g, device), 0.0) * math.pi / 180
    scale = _apply(draw(), _uniform(n, *cfg.scale, g, device), 1.0)
    flip_x = _apply(draw(), torch.full((n,), -1.0, device=device), 1.0) if cfg.flip else torch.ones(n, device=device)
    flip_y = _apply(draw(), torch.full((n,), -1.0, device=device), 1.0) if cfg.flip else torch.ones(n, device=device)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 1] = cos * flip_x, -sin * flip_y
    theta[:, 1, 0], theta[:, 1, 1] = sin * flip_x, cos * flip_y
    if cfg.translate > 0:  # grid coordinates span [-1, 1]: a shift of t image sides is 2t
        shift = _uniform(2 * n, -2 * cfg.translate, 2 * cfg.translate, g, device).view(n, 2)
        theta[:, :, 2] = shift * draw().float()[:, None]
    grid = F.affine_grid(theta, (n, 1, *size), align_corners=False)
    if cfg.elastic_alpha > 0:
        coarse = torch.randn(n, 2, cfg.elastic_grid, cfg.elastic_grid, generator=g).to(device) * cfg.elastic_alpha
        coarse = coarse * draw().float()[:, None, None, None]
        field = F.interpolate(coarse, size=size, mode="bicubic", align_corners=False)
        grid = grid + field.permute(0, 2, 3, 1)
    return grid, flip_x * flip_y < 0


def intensity(images: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Brightness, contrast, gamma and Gaussian noise on z-scored images (N, C, H, W)."""
    n, device = images.shape[0], images.device
    draw = lambda: (torch.rand(n, generator=g).to(device) < cfg.p)[:, None, None, None]  # noqa: E731
    shape = (n, 1, 1, 1)
    contrast = _apply(draw(), _uniform(n, *cfg.contrast, g, device).view(shape), 1.0)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    out = (images - mean) * contrast + mean
    out = out + _apply(draw(), _uniform(n, -cfg.brightness, cfg.brightness, g, device).view(shape), 0.0)
    gamma = _apply(draw(), _uniform(n, *cfg.gamma, g, device).view(shape), 1.0)
    lo = out.amin(dim=(1, 2, 3), keepdim=True)
    span = (out.amax(dim=(1, 2, 3), keepdim=True) - lo).clamp_min(1e-6)
    out = ((out - lo) / span).pow(gamma) * span + lo
    noise = torch.randn(out.shape, generator=g).to(device) * cfg.noise_std
    return out + noise * draw().float()


def augment_batch(
    images: torch.Tensor, masks: torch.Tensor, cfg: AugmentConfig, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch: the same spatial warp for image and mask, intensity on the image.

    Args:
        images: float (N, C, H, W).
        masks: integer (N, H, W).
        g: CPU generator, for reproducible draws whatever the device.

    Returns:
        Augmented images (N, C, H, W) and masks (N, H, W) of the input dtypes.
    """
    grid, mirrored = spatial_grid(images.shape[0], images.shape[-2:], cfg, g, images.device)
    images = F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="border", align_corners=False)
    masks = F.grid_sample(masks[:, None].float(), grid.float(), mode="nearest", padding_mode="zeros", align_corners=False)
    masks = masks[:, 0].to(torch.long)
    if cfg.mirror_swap:
        table = swap_table(cfg.mirror_swap, int(max(max(p) for p in cfg.mirror_swap)) + 1).to(masks.device)
        swapped = table[masks.clamp_max(len(table) - 1)]
        masks = torch.where(mirrored[:, None, None] & (masks < len(table)), swapped, masks)
    return intensity(images, cfg, g), masks
