"""Slices -> probabilities -> label volume in the original image geometry -> NIfTI or PNG.

New, unlabelled scans are segmented by :mod:`lib.seg.predict`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lib.common.atomic import atomic_path
from lib.data.images2d import is_image_file, write_mask
from lib.data.nifti import from_canonical
from lib.data.slices import (
    CaseMeta,
    SliceConfig,
    SliceSet,
    canvas_pads,
    normalise_volume,
    to_slices,
    with_context,
)
from lib.seg.checkpoint import load_model
from lib.seg.forward import predict_probs
from lib.seg.postprocess import keep_largest_component, remove_small_pieces
from lib.seg.roi import Locator, canvas_probs


def patient_probs(model: nn.Module, images: np.ndarray, *, locator: Locator | None = None,
                  device: str | torch.device = "cpu", tta: bool = False, swap: Sequence[tuple[int, int]] = (),
                  case: str = "") -> torch.Tensor:
    """Class probabilities of one patient's cached slices (Z, C, S, S), on the cached grid.

    With a ``locator`` (region of interest) the model segments the located crop of the
    canvas, or the whole canvas in windows where nothing is found (see :mod:`lib.seg.roi`).
    """
    predict = lambda x: predict_probs(model, x, device=device, tta=tta, swap=swap)  # noqa: E731
    return predict(images) if locator is None else canvas_probs(predict, images, locator, case, device)


def probs_to_original(probs: torch.Tensor, meta: CaseMeta) -> torch.Tensor:
    """Slice probabilities back on the original in-plane grid.

    Args:
        probs: (Z, K, S, S) probabilities of one patient's cached slices in axial order.
        meta: the patient's geometry: original shape (X, Y, Z) and, when the slices sit on a
            canvas (target spacing or aspect-kept 2D images), their size before it (``resized``).

    Returns:
        float32 (Z, K, X, Y); outside the canvas every class has probability 0.
    """
    x, y, z = meta.shape
    if probs.shape[0] != z:
        raise ValueError(f"{probs.shape[0]} slices for a volume with {z} axial slices")
    if meta.resized is not None:  # undo the canvas: crop it, or pad with zeros (argmax: background)
        probs = F.pad(probs, [-w for w in canvas_pads(meta.resized, probs.shape[-1])], value=0.0)
    if probs.shape[-2:] != (x, y):
        probs = F.interpolate(probs, size=(x, y), mode="bilinear", align_corners=False)
    return probs


def probs_to_volume(probs: torch.Tensor, meta: CaseMeta) -> np.ndarray:
    """The argmax of :func:`probs_to_original`: a uint8 label volume (X, Y, Z)."""
    return probs_to_original(probs, meta).argmax(1).to(torch.uint8).numpy().transpose(1, 2, 0)


def save_prediction(volume: np.ndarray, meta: CaseMeta, path: str | Path, num_classes: int = 2) -> Path:
    """Write a predicted label volume (canonical orientation) in its label file's geometry:
    NIfTI with the label's voxel order, affine and header, or a PNG mask for a 2D image
    (``path``'s suffix is replaced to match)."""
    path = Path(path)
    if is_image_file(meta.label_path):
        return write_mask(volume, path.with_name(f"{meta.case_id}.png"), num_classes)
    label = nib.load(meta.label_path)
    header = label.header.copy()
    header.set_data_dtype(np.uint8)
    image = nib.Nifti1Image(from_canonical(volume.astype(np.uint8), label.affine), label.affine, header)
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(image, tmp)
    return path


def load_predictor(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Locator | None, dict]:
    """A checkpoint's model, its region-of-interest stage (None without one) and its settings."""
    model, meta = load_model(path, device)
    locator = Locator.from_state(meta["locator"], device) if meta.get("locator") else None
    return model, locator, meta


def segment_image(model: nn.Module, locator: Locator | None, data: dict[str, Any], image: np.ndarray,
                  spacing: tuple[float, float, float], *, device: str | torch.device = "cpu", tta: bool = False,
                  largest_component: bool | None = None, case: str = "") -> np.ndarray:
    """Segment one scan with the preprocessing its checkpoint recorded (``data``: normalisation,
    target spacing, canvas, region of interest, context slices).

    Args:
        image: float32 (C, X, Y, Z) raw intensities; spacing: its voxel size in mm.

    Returns:
        uint8 label volume (X, Y, Z) in the scan's own grid.
    """
    cfg = SliceConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data["slice_config"].items()})
    images, _, resized = to_slices(normalise_volume(image, data["is_ct"], cfg), None, spacing, cfg)
    z = len(images)
    slices = with_context(SliceSet(images, np.zeros((z, 1, 1), np.uint8), np.full(z, case), np.arange(z), {}),
                          data["context_slices"])
    probs = patient_probs(model, slices.images, locator=locator, device=device, tta=tta,
                          swap=[tuple(p) for p in data.get("mirror_pairs", ())], case=case)
    meta = CaseMeta(case, image.shape[1:], spacing, np.eye(4), "", "", resized=resized if cfg.on_canvas else None)
    volume = probs_to_volume(probs, meta)
    if largest_component is None and data.get("piece_thresholds") is not None:  # learned in training
        return remove_small_pieces(volume, {int(k): v for k, v in data["piece_thresholds"].items()})
    return keep_largest_component(volume) if largest_component is not False else volume
