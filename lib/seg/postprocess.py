"""Post-processing of predicted label volumes and test-time augmentation."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from scipy import ndimage


def _pieces(mask: np.ndarray, label: int) -> np.ndarray:
    """Connected components of ``label`` (full connectivity) and their sizes, largest first."""
    components, n = ndimage.label(mask == label, structure=np.ones((3,) * mask.ndim, dtype=bool))
    return components, np.bincount(components.ravel(), minlength=n + 1)


def piece_thresholds(masks: Iterable[np.ndarray], labels: Sequence[int]) -> dict[int, float]:
    """How small a predicted piece of each label may be, learned from training masks: half the
    smallest ratio of a piece to its mask's largest piece of that label (0.5 for a label that
    is always one piece; two lungs labelled alike keep both). Labels never present are left out.
    """
    ratios: dict[int, list[float]] = {int(lab): [] for lab in labels if lab != 0}
    for mask in masks:
        for lab in ratios:
            sizes = _pieces(mask, lab)[1][1:]
            if sizes.size and sizes.max() > 0:
                ratios[lab].append(float(sizes[sizes > 0].min() / sizes.max()))
    return {lab: 0.5 * min(r) for lab, r in ratios.items() if r}


def remove_small_pieces(mask: np.ndarray, thresholds: Mapping[int, float]) -> np.ndarray:
    """Set to background every piece of a label smaller than ``thresholds[label]`` times that
    label's largest piece (see :func:`piece_thresholds`); other labels are unchanged."""
    mask = np.asarray(mask)
    out = mask.copy()
    for lab, fraction in thresholds.items():
        components, sizes = _pieces(mask, int(lab))
        sizes[0] = 0
        if sizes.max() == 0:
            continue
        small = np.flatnonzero(sizes < fraction * sizes.max())
        out[np.isin(components, small[small > 0])] = 0
    return out


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
    swap: Sequence[tuple[int, int]] = (),
) -> torch.Tensor:
    """Average predicted probabilities over the identity and mirrored copies of a batch.

    Each flipped batch is passed through ``predict_fn`` and its prediction flipped back
    before averaging. Runs under ``torch.inference_mode()``.

    Args:
        predict_fn: maps images (N, C, H, W) to probabilities (N, K, H, W) (softmax or sigmoid
            already applied).
        images: batch of shape (N, C, H, W).
        dims: spatial dimensions to flip, one tuple per augmented copy (2 = H, 3 = W).
        swap: class pairs that are mirror images (left/right organs): a copy flipped along one
            axis predicts each as its partner, so their channels are exchanged back.

    Returns:
        Mean probabilities, shape (N, K, H, W).
    """
    with torch.inference_mode():
        total = predict_fn(images).clone()
        for d in dims:
            d = tuple(d)
            probs = torch.flip(predict_fn(torch.flip(images, d)), d)
            if swap and len(d) == 1:
                order = list(range(probs.shape[1]))
                for a, b in swap:
                    order[a], order[b] = b, a
                probs = probs[:, order]
            total += probs
        return total / (1 + len(dims))
