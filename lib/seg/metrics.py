"""Segmentation metrics in the style of the MSD challenge and nnU-Net's evaluation.

All functions take NumPy integer label volumes (class 0 is background) and return plain
Python floats (or NumPy arrays for per-slice results).

Empty-mask conventions (as in nnU-Net's ``evaluate_predictions``):

* Dice / IoU: NaN when prediction and reference are both empty, 0 when exactly one is.
* HD95: NaN when both are empty, ``inf`` when exactly one is (there is no surface to measure
  to). Summaries report the mean over finite values plus a count of infinite ones.

Intervals and verdicts of paired comparisons (bootstrap, t-interval over seeds) are
:mod:`lib.common.statistics`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance

LABEL_KEYS = ("dice", "iou", "hd95")  # scored per foreground label, averaged over labels
SUMMARY_KEYS = (*LABEL_KEYS, "pixel_accuracy", "cross_entropy")


def _check_shapes(pred: np.ndarray, truth: np.ndarray) -> None:
    if pred.shape != truth.shape:
        raise ValueError(
            f"pred and truth must have the same shape, got {pred.shape} and {truth.shape}"
        )


def _masks(pred: np.ndarray, truth: np.ndarray, label: int) -> tuple[np.ndarray, np.ndarray]:
    pred, truth = np.asarray(pred), np.asarray(truth)
    _check_shapes(pred, truth)
    return pred == label, truth == label


def dice_from_counts(intersection: float, pred_sum: float, true_sum: float) -> float:
    """Dice from accumulated voxel counts, e.g. summed slice by slice over a 3D patient.

    Args:
        intersection: number of voxels in both prediction and reference.
        pred_sum: number of predicted foreground voxels.
        true_sum: number of reference foreground voxels.

    Returns:
        ``2 * intersection / (pred_sum + true_sum)``; NaN when both sums are 0.
    """
    denom = float(pred_sum) + float(true_sum)
    if denom == 0:
        return math.nan
    return 2.0 * float(intersection) / denom


def dice(pred: np.ndarray, truth: np.ndarray, label: int = 1) -> float:
    """Dice coefficient of class ``label``.

    Args:
        pred: predicted label volume, any shape.
        truth: reference label volume, same shape as ``pred``.
        label: class to score.

    Returns:
        Dice in [0, 1]; NaN when both masks are empty, 0 when exactly one is.
    """
    p, t = _masks(pred, truth, label)
    return dice_from_counts(np.count_nonzero(p & t), np.count_nonzero(p), np.count_nonzero(t))


def iou(pred: np.ndarray, truth: np.ndarray, label: int = 1) -> float:
    """Intersection over union (Jaccard index) of class ``label``.

    Args:
        pred: predicted label volume, any shape.
        truth: reference label volume, same shape as ``pred``.
        label: class to score.

    Returns:
        IoU in [0, 1]; NaN when both masks are empty, 0 when exactly one is.
    """
    p, t = _masks(pred, truth, label)
    union = np.count_nonzero(p | t)
    if union == 0:
        return math.nan
    return np.count_nonzero(p & t) / union


def _union_bbox(p: np.ndarray, t: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of ``p | t`` grown by one voxel, clipped to the array."""
    union = p | t
    box = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        idx = np.flatnonzero(union.any(axis=other))
        box.append(slice(max(int(idx[0]) - 1, 0), int(idx[-1]) + 2))
    return tuple(box)


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float], label: int = 1) -> float:
    """95th-percentile symmetric Hausdorff distance of class ``label`` in millimetres.

    Surface-based, computed with ``monai.metrics.compute_hausdorff_distance``: surfaces are
    the mask voxels removed by a binary erosion, the 95th percentile of the surface-to-surface
    distances is taken in each direction and the larger of the two is returned.

    Args:
        pred: predicted label volume, shape (D0, D1, ...).
        truth: reference label volume, same shape as ``pred``.
        spacing: voxel size in mm along each axis of ``pred``, length ``pred.ndim``.
        label: class to score.

    Returns:
        HD95 in mm; NaN when both masks are empty, ``inf`` when exactly one is.
    """
    p, t = _masks(pred, truth, label)
    if len(spacing) != p.ndim:
        raise ValueError(f"spacing has {len(spacing)} values for a {p.ndim}D volume")
    p_any, t_any = bool(p.any()), bool(t.any())
    if not p_any and not t_any:
        return math.nan
    if not p_any or not t_any:
        return math.inf
    # MONAI crops to the same box internally; cropping first just avoids float copies of
    # the whole volume. The one-voxel margin keeps the surfaces identical.
    box = _union_bbox(p, t)
    y_pred = torch.from_numpy(np.ascontiguousarray(p[box]))[None, None]
    y = torch.from_numpy(np.ascontiguousarray(t[box]))[None, None]
    with warnings.catch_warnings():
        # MONAI passes its own deprecated argument to get_mask_edges internally.
        warnings.filterwarnings(
            "ignore", message=".*always_return_as_numpy", category=FutureWarning
        )
        hd = compute_hausdorff_distance(
            y_pred, y, include_background=True, percentile=95, spacing=[float(s) for s in spacing]
        )
    return float(hd[0, 0])


def volume_ml(mask: np.ndarray, spacing: Sequence[float], label: int = 1) -> float:
    """Volume of class ``label`` in millilitres.

    Args:
        mask: label volume, shape (D0, D1, ...).
        spacing: voxel size in mm along each axis, length ``mask.ndim``.
        label: class to measure.

    Returns:
        Number of voxels times voxel volume (mm^3), divided by 1000.
    """
    mask = np.asarray(mask)
    if len(spacing) != mask.ndim:
        raise ValueError(f"spacing has {len(spacing)} values for a {mask.ndim}D volume")
    return np.count_nonzero(mask == label) * float(np.prod(spacing)) / 1000.0


def pixel_accuracy(pred: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of pixels (voxels) whose predicted class is the reference class."""
    _check_shapes(np.asarray(pred), np.asarray(truth))
    return float(np.mean(np.asarray(pred) == np.asarray(truth)))


def cross_entropy(probs: torch.Tensor, truth: np.ndarray, eps: float = 1e-6) -> float:
    """Mean cross-entropy (BCE with one foreground class) of class probabilities.

    Args:
        probs: (K, ...) probabilities, on the grid of ``truth``.
        truth: (...) class ids.
    """
    if tuple(probs.shape[1:]) != truth.shape:
        raise ValueError(f"probabilities {tuple(probs.shape)} do not cover labels of shape {truth.shape}")
    index = torch.from_numpy(truth.astype(np.int64))[None]
    picked = probs.float().gather(0, index)
    return float(-picked.clamp_min(eps).log().mean())


def _foreground(labels: Sequence[int]) -> list[int]:
    """``labels`` without background (0); raises if none is left."""
    fg = [int(lab) for lab in labels if int(lab) != 0]
    if not fg:
        raise ValueError("labels must contain at least one foreground label")
    return fg


def per_slice_dice(
    pred: np.ndarray, truth: np.ndarray, axis: int = -1, label: int | Sequence[int] = 1
) -> np.ndarray:
    """Dice of class ``label`` on each 2D slice along ``axis``.

    Args:
        pred: predicted label volume, shape (D0, D1, D2).
        truth: reference label volume, same shape as ``pred``.
        axis: slicing axis.
        label: class to score, or several classes (0, background, is skipped): then each
            slice gets the mean Dice over the classes present in its prediction or reference.

    Returns:
        Float array of shape (pred.shape[axis],); NaN for slices where both masks are empty
        (for every class scored).
    """
    labels = [label] if np.isscalar(label) else _foreground(label)
    pred, truth = np.asarray(pred), np.asarray(truth)
    _check_shapes(pred, truth)
    # masks of shape (labels, ..., slices)
    classes = np.reshape(labels, (-1,) + (1,) * pred.ndim)
    p, t = np.moveaxis(pred, axis, -1) == classes, np.moveaxis(truth, axis, -1) == classes
    other = tuple(range(1, p.ndim - 1))
    inter = np.count_nonzero(p & t, axis=other)
    denom = np.count_nonzero(p, axis=other) + np.count_nonzero(t, axis=other)
    n_scored = np.count_nonzero(denom, axis=0)
    out = np.full(n_scored.shape, np.nan)
    nonempty = n_scored > 0
    out[nonempty] = (2.0 * inter / np.maximum(denom, 1)).sum(0)[nonempty] / n_scored[nonempty]
    return out


def _nanmean(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else math.nan


def score_case(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float], labels: Sequence[int]
) -> dict:
    """Score one case on each foreground label.

    Args:
        pred: predicted label volume, shape (D0, D1, D2); a single slice (D2 = 1) is
            scored as a 2D image.
        truth: reference label volume, same shape as ``pred``.
        spacing: voxel size in mm along each axis.
        labels: foreground labels to score (0, background, is skipped).

    Returns:
        With one foreground label: ``{"dice", "iou", "hd95", "pred_volume_ml",
        "true_volume_ml", "pixel_accuracy"}`` (2D images: ``pred_area`` and ``true_area`` in
        squared spacing units instead of volumes; HD95 in those units). With several labels:
        the same keys, where ``dice``, ``iou`` and ``hd95`` are means over labels ignoring NaN
        (a missed label makes ``hd95`` inf) and volumes or areas are totals over labels, plus
        ``"per_label"``: ``{str(label): {...}}``.
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    _check_shapes(pred, truth)
    flat = pred.ndim == 3 and pred.shape[-1] == 1
    if flat:
        pred, truth, spacing = pred[..., 0], truth[..., 0], tuple(spacing)[:2]
    size = "area" if flat else "volume_ml"

    def amount(mask: np.ndarray, lab: int) -> float:
        return float(np.count_nonzero(mask == lab) * np.prod(spacing)) if flat else volume_ml(mask, spacing, lab)

    fg = _foreground(labels)
    per_label = {
        str(lab): {
            "dice": dice(pred, truth, lab),
            "iou": iou(pred, truth, lab),
            "hd95": hd95(pred, truth, spacing, lab),
            f"pred_{size}": amount(pred, lab),
            f"true_{size}": amount(truth, lab),
        }
        for lab in fg
    }
    accuracy = {"pixel_accuracy": pixel_accuracy(pred, truth)}
    if len(fg) == 1:
        return per_label[str(fg[0])] | accuracy
    scores = list(per_label.values())
    out: dict = {key: _nanmean([s[key] for s in scores]) for key in LABEL_KEYS}
    for key in (f"pred_{size}", f"true_{size}"):
        out[key] = float(sum(s[key] for s in scores))
    return out | accuracy | {"per_label": per_label}


def summarise(cases: Mapping[str, Mapping[str, float]]) -> dict:
    """Aggregate per-case scores (as from :func:`score_case`) over cases.

    NaN values (e.g. both masks empty) are left out. Infinite values (``hd95`` with a missed
    or spurious structure) are left out of mean/std/median and counted in ``n_inf``.

    Args:
        cases: ``{case_id: {"dice": ..., "iou": ..., "hd95": ..., ...}}``.

    Returns:
        ``{"mean": {key: float}, "std": {key: float}, "median": {key: float},
        "n_valid": {key: int}, "n_inf": {key: int}, "n_cases": int}`` for keys
        ``dice``, ``iou``, ``hd95``, ``pixel_accuracy`` and ``cross_entropy``, those that some case
        has; std is the population std (ddof=0); a statistic with no
        finite value is NaN.
    """
    out: dict = {"mean": {}, "std": {}, "median": {}, "n_valid": {}, "n_inf": {}}
    for key in [k for k in SUMMARY_KEYS if any(k in c for c in cases.values())]:
        values = np.array([float(c.get(key, math.nan)) for c in cases.values()], dtype=float)
        finite = values[np.isfinite(values)]
        out["n_valid"][key] = int(finite.size)
        out["n_inf"][key] = int(np.isinf(values).sum())
        for stat, fn in (("mean", np.mean), ("std", np.std), ("median", np.median)):
            out[stat][key] = float(fn(finite)) if finite.size else math.nan
    out["n_cases"] = len(cases)
    return out
