"""Figures: patient grids with contours, curves, GIFs, histograms, sample grids.

Slices are stored as (X, Y) arrays; they are shown rotated (``np.rot90``) so that
anterior is up, for images, truths and predictions alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import imageio.v3 as iio
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from lib.atomic import atomic_path

TRUTH_COLOUR, PRED_COLOUR = "lime", "red"


def _show(s: np.ndarray) -> np.ndarray:
    return np.rot90(np.asarray(s, dtype=np.float32))


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Save a figure atomically as PNG."""
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    return Path(path)


def pick_slices(masks: np.ndarray, n: int) -> np.ndarray:
    """``n`` slice indices spread over the slices containing foreground (all slices if none)."""
    fg = np.flatnonzero(masks.reshape(len(masks), -1).max(1) > 0)
    pool = fg if len(fg) else np.arange(len(masks))
    return pool[np.linspace(0, len(pool) - 1, min(n, len(pool))).round().astype(int)]


def patient_grid(
    images: np.ndarray,
    masks: np.ndarray,
    preds: np.ndarray | None = None,
    *,
    n: int = 12,
    cols: int = 6,
    title: str = "",
    slice_index: Sequence[int] | None = None,
) -> Figure:
    """Grid of a patient's slices with the true (green) and predicted (red) contours.

    Args:
        images: (Z, C, H, W) slices (first channel shown).
        masks: (Z, H, W) true class ids.
        preds: optional (Z, H, W) predicted class ids.
    """
    chosen = pick_slices(masks, n)
    rows = int(np.ceil(len(chosen) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.2 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), chosen):
        ax.imshow(_show(images[i, 0]), cmap="gray")
        if masks[i].any():
            ax.contour(_show(masks[i] > 0), levels=[0.5], colors=TRUTH_COLOUR, linewidths=0.8)
        if preds is not None and preds[i].any():
            ax.contour(_show(preds[i] > 0), levels=[0.5], colors=PRED_COLOUR, linewidths=0.8)
        ax.set_title(f"slice {slice_index[i] if slice_index is not None else i}", fontsize=8)
    fig.suptitle(title + ("  (green: truth, red: prediction)" if preds is not None else "  (green: label)"))
    fig.tight_layout()
    return fig


def curves(history: list[dict], title: str = "") -> Figure:
    """Training/validation loss and validation Dice against epoch."""
    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    a.plot(epochs, [h["val_loss"] for h in history], "o-", label="val")
    a.set(xlabel="epoch", ylabel="Dice + CE loss", title="loss")
    a.legend()
    b.plot(epochs, [h["val_dice"] for h in history], "o-", color="C2")
    b.set(xlabel="epoch", ylabel="mean per-patient 3D Dice", title="validation Dice", ylim=(0, 1))
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _to_uint8(image: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(image, (1, 99))
    return (np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)


def _overlay(gray: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    rgb = np.repeat(gray[..., None], 3, axis=-1).astype(np.float32)
    sel = mask > 0
    rgb[sel] = 0.55 * rgb[sel] + 0.45 * np.array(colour, dtype=np.float32)
    return rgb.astype(np.uint8)


def patient_gif(images: np.ndarray, masks: np.ndarray, preds: np.ndarray, path: str | Path, *, fps: int = 8, scale: int = 2) -> Path:
    """Animated GIF through a patient's slices: image | truth | prediction, side by side.

    Args:
        images: (Z, C, H, W); masks, preds: (Z, H, W).
    """
    frames = []
    for img, m, p in zip(images[:, 0].astype(np.float32), masks, preds):
        gray = _to_uint8(_show(img))
        frame = np.concatenate(
            [np.repeat(gray[..., None], 3, -1), _overlay(gray, _show(m), (0, 255, 0)), _overlay(gray, _show(p), (255, 0, 0))],
            axis=1,
        )
        frames.append(np.kron(frame, np.ones((scale, scale, 1), dtype=np.uint8)))
    with atomic_path(path, suffix=".gif") as tmp:
        iio.imwrite(tmp, np.stack(frames), extension=".gif", duration=1000 / fps, loop=0)
    return Path(path)


def pair_grid(images: np.ndarray, masks: np.ndarray, *, n: int = 16, cols: int = 8, title: str = "") -> Figure:
    """Image+mask pairs (e.g. synthetic samples): image row with the mask contour."""
    n = min(n, len(images))
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, img, m in zip(axes.ravel(), images[:n], masks[:n]):
        ax.imshow(_show(img[0]), cmap="gray")
        if m.any():
            ax.contour(_show(m > 0), levels=[0.5], colors=TRUTH_COLOUR, linewidths=0.7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def history_curves(history: list[dict], keys: list[str], title: str = "") -> Figure:
    """One panel per history key against epoch (e.g. a generator's loss terms)."""
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3), squeeze=False)
    epochs = [h["epoch"] for h in history]
    for ax, key in zip(axes[0], keys):
        ax.plot(epochs, [h[key] for h in history], "o-")
        ax.set(xlabel="epoch", title=key)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
