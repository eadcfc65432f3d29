"""Slices -> probabilities -> label volume in the original image geometry -> NIfTI."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lib.atomic import atomic_path
from lib.env import autocast
from lib.models import probabilities
from lib.postprocess import flip_tta, keep_largest_component
from lib.slices import CaseMeta


@torch.inference_mode()
def predict_probs(
    model: nn.Module,
    images: np.ndarray,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    amp: bool = True,
    tta: bool = False,
) -> torch.Tensor:
    """Class probabilities for a stack of slices.

    Args:
        images: (N, C, H, W) normalised slices (float16 or float32).
        amp: mixed precision where :func:`lib.env.amp_dtype` gives a dtype for ``device``.
        tta: average over horizontal, vertical and both flips.

    Returns:
        float32 (N, K, H, W) on the CPU, K = number of classes.
    """
    device = torch.device(device)
    model.eval()

    def run(x: torch.Tensor) -> torch.Tensor:
        with autocast(device, amp):
            return probabilities(model(x))

    out = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.asarray(images[start:start + batch_size])).to(device).float()
        x = x.contiguous(memory_format=torch.channels_last)
        out.append((flip_tta(run, x) if tta else run(x)).float().cpu())
    return torch.cat(out)


def probs_to_volume(probs: torch.Tensor, shape: tuple[int, int, int]) -> np.ndarray:
    """Resize slice probabilities back to the original in-plane size and take the argmax.

    Args:
        probs: (Z, K, S, S) probabilities of one patient's slices in axial order.
        shape: original volume shape (X, Y, Z).

    Returns:
        uint8 label volume (X, Y, Z).
    """
    x, y, z = shape
    if probs.shape[0] != z:
        raise ValueError(f"{probs.shape[0]} slices for a volume with {z} axial slices")
    if probs.shape[-2:] != (x, y):
        probs = F.interpolate(probs, size=(x, y), mode="bilinear", align_corners=False)
    return probs.argmax(1).to(torch.uint8).numpy().transpose(1, 2, 0)


def predict_volume(
    model: nn.Module,
    images: np.ndarray,
    meta: CaseMeta,
    *,
    device: str | torch.device = "cpu",
    tta: bool = False,
    largest_component: bool = False,
) -> np.ndarray:
    """Predict one patient's label volume at its original resolution.

    Args:
        images: (Z, C, S, S) the patient's cached slices in axial order.
        meta: the patient's geometry.
    """
    probs = predict_probs(model, images, device=device, tta=tta)
    volume = probs_to_volume(probs, meta.shape)
    return keep_largest_component(volume) if largest_component else volume


def save_prediction(volume: np.ndarray, meta: CaseMeta, path: str | Path) -> Path:
    """Write a predicted label volume as NIfTI with the label file's affine and header."""
    header = nib.load(meta.label_path).header.copy()
    header.set_data_dtype(np.uint8)
    image = nib.Nifti1Image(volume.astype(np.uint8), meta.affine, header)
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(image, tmp)
    return Path(path)
