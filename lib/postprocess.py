"""Post-processing of predicted label volumes and test-time augmentation."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from scipy import ndimage


def one_piece_labels(masks: Iterable[np.ndarray], labels: Sequence[int]) -> list[int]:
    """The labels that form one connected component in every mask holding them: those whose
    predictions :func:`keep_largest_component` may clean (nnU-Net decides this per class;
    two lungs labelled alike, for example, must keep both pieces)."""
    masks = list(masks)
    kept = []
    for lab in labels:
        pieces = []
        for mask in masks:
            pieces.append(ndimage.label(mask == lab, structure=np.ones((3,) * mask.ndim, dtype=bool))[1])
        if lab != 0 and max(pieces, default=0) <= 1:
            kept.append(int(lab))
    return kept


def keep_largest_component(mask: np.ndarray, labels: Sequence[int] | None = None) -> np.ndarray:
    """Keep only the largest connected component of each foreground label.

    Components use full connectivity (26-neighbourhood in 3D), as nnU-Net's
    ``remove_all_but_largest_component``; removed voxels become background (0).

    Args:
        mask: integer label volume, shape (D0, D1, ...).
        labels: labels to filter; ``None`` means every nonzero label present in ``mask``.

    Returns:
        A new array of the same shape and dtype; other labels are unchanged.
    """
    mask = np.asarray(mask)
    out = mask.copy()
    if labels is None:
        labels = [int(lab) for lab in np.unique(mask) if lab != 0]
    structure = np.ones((3,) * mask.ndim, dtype=bool)
    for lab in labels:
        if lab == 0:
            continue
        components, n = ndimage.label(mask == lab, structure=structure)
        if n <= 1:
            continue
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        out[(components > 0) & (components != int(np.argmax(sizes)))] = 0
    return out


def flip_tta(
    predict_fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    dims: Sequence[Sequence[int]] = ((3,), (2,), (2, 3)),
) -> torch.Tensor:
    """Average predicted probabilities over the identity and mirrored copies of a batch.

    Each flipped batch is passed through ``predict_fn`` and its prediction flipped back
    before averaging. Runs under ``torch.inference_mode()``.

    Args:
        predict_fn: maps images (N, C, H, W) to probabilities (N, K, H, W) (softmax or sigmoid
            already applied).
        images: batch of shape (N, C, H, W).
        dims: spatial dimensions to flip, one tuple per augmented copy (2 = H, 3 = W).

    Returns:
        Mean probabilities, shape (N, K, H, W).
    """
    with torch.inference_mode():
        total = predict_fn(images).clone()
        for d in dims:
            d = tuple(d)
            total += torch.flip(predict_fn(torch.flip(images, d)), d)
        return total / (1 + len(dims))
