"""Mask sources of synthetic pairs: ``"new"`` shapes from the statistical shape model
(:mod:`lib.synth.shapes`) or ``"deformed"`` real training masks (random affine + smooth elastic
warps, :func:`deform_masks`; the diffusion model's own mask source uses it too).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from lib.synth.generative import one_hot
from lib.synth.shapes import ShapeModel

MASK_SOURCES = ("new", "deformed")


def draw_masks(source: str, n: int, seed: int, *, shape_model: ShapeModel | None = None,
               train_masks: np.ndarray | None = None, num_classes: int = 2) -> np.ndarray:
    """``n`` masks (uint8 (n, H, W)) from a mask source.

    Args:
        source: "new" (sampled from ``shape_model``) or "deformed" (``train_masks`` drawn with
            replacement, then randomly deformed).
    """
    if source == "new":
        if shape_model is None:
            raise ValueError('mask source "new" needs a fitted shape model')
        return shape_model.sample(n, seed=seed)
    if source == "deformed":
        if train_masks is None or not len(train_masks):
            raise ValueError('mask source "deformed" needs the real training masks')
        picks = np.random.default_rng(seed).integers(0, len(train_masks), n)
        return deform_masks(np.asarray(train_masks)[picks], num_classes, seed=seed)
    raise ValueError(f"unknown mask source {source!r}; choose one of {MASK_SOURCES}")


def deform_masks(masks: np.ndarray, num_classes: int, *, seed: int = 0, max_rotation_deg: float = 15.0,
                 scale_range: float = 0.1, max_shift: float = 0.08, elastic_amplitude: float = 0.04,
                 elastic_grid: int = 4, batch_size: int = 64) -> np.ndarray:
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
    theta = np.stack([np.stack([cos, -sin, shift[:, 0]], 1), np.stack([sin, cos, shift[:, 1]], 1)], 1)
    coarse = rng.normal(0.0, elastic_amplitude, (n, 2, elastic_grid, elastic_grid))
    out = np.empty_like(masks, dtype=np.uint8)
    for s in range(0, n, batch_size):
        sl = slice(s, s + batch_size)
        m = torch.from_numpy(np.ascontiguousarray(masks[sl])).long()
        grid = F.affine_grid(torch.from_numpy(theta[sl]).float(), [len(m), 1, h, w], align_corners=False)
        disp = F.interpolate(torch.from_numpy(coarse[sl]).float(), size=(h, w), mode="bicubic", align_corners=True)
        fg = F.grid_sample(one_hot(m, num_classes)[:, 1:], grid + disp.permute(0, 2, 3, 1), mode="bilinear",
                           padding_mode="zeros", align_corners=False)
        probs = torch.cat([1 - fg.sum(1, keepdim=True), fg], dim=1)
        out[sl] = probs.argmax(1).numpy().astype(np.uint8)
    lost = (out > 0).sum(axis=(1, 2)) < 0.5 * (masks > 0).sum(axis=(1, 2))
    out[lost] = masks[lost]
    return out
