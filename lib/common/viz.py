"""Figures: patient grids with contours, curves, GIFs, histograms, sample grids.

Slices are stored as (X, Y) arrays; they are shown rotated (``np.rot90``) so that
anterior is up, for images, truths and predictions alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import imageio.v3 as iio
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from lib.common.atomic import atomic_path

# One foreground class: truth lime, prediction red. Several: class k in CLASS_PALETTE[k - 1]
# (cycled) for both, truth solid and prediction dashed in contour figures.
TRUTH_COLOUR, PRED_COLOUR = "lime", "red"
CLASS_PALETTE = plt.colormaps["tab10"].colors


def _show(s: np.ndarray) -> np.ndarray:
    return np.rot90(np.asarray(s, dtype=np.float32))


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Save a figure atomically as PNG."""
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    return Path(path)


def _class_colours(
    class_names: Mapping[int, str] | None, *masks: np.ndarray | None
) -> tuple[dict[int, tuple[float, float, float]], dict[int, tuple[float, float, float]]]:
    """Truth and prediction colour of each foreground class (named or found in ``masks``)."""
    found = set(class_names or ()).union(*(np.unique(m).tolist() for m in masks if m is not None))
    classes = sorted(int(k) for k in found if k != 0)
    if len(classes) <= 1:
        truth, pred = to_rgb(TRUTH_COLOUR), to_rgb(PRED_COLOUR)
        return dict.fromkeys(classes, truth), dict.fromkeys(classes, pred)
    palette = {k: CLASS_PALETTE[(k - 1) % len(CLASS_PALETTE)] for k in classes}
    return palette, palette


def _contours(
    ax: Axes, mask: np.ndarray, colours: Mapping[int, tuple], width: float, style: str = "solid"
) -> None:
    """Contour of each class of ``colours`` present in ``mask``, in its colour."""
    for k, colour in colours.items():
        sel = _show(mask == k)
        if sel.any():
            ax.contour(sel, levels=[0.5], colors=[colour], linewidths=width, linestyles=style)


def _class_legend(
    fig: Figure, colours: Mapping[int, tuple], class_names: Mapping[int, str] | None, preds: bool
) -> None:
    """Legend below the figure: one entry per class, plus the truth/prediction line styles."""
    names = class_names or {}
    handles = [
        Line2D([], [], color=colour, label=names.get(k, f"class {k}"))
        for k, colour in colours.items()
    ]
    if preds:
        handles += [
            Line2D([], [], color="gray", label="truth"),
            Line2D([], [], color="gray", linestyle="--", label="prediction"),
        ]
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0), ncol=len(handles),
               fontsize=8, frameon=False)


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
    class_names: Mapping[int, str] | None = None,
) -> Figure:
    """Grid of a patient's slices with the true and predicted contours.

    One foreground class: truth green, prediction red. Several: one colour per class (see
    the legend), truth solid and prediction dashed.

    Args:
        images: (Z, C, H, W) slices (first channel shown).
        masks: (Z, H, W) true class ids.
        preds: optional (Z, H, W) predicted class ids.
        class_names: names of the foreground classes in the legend (default "class k"); its
            keys count as classes even where absent from the masks.
    """
    truth_colours, pred_colours = _class_colours(class_names, masks, preds)
    multi = len(truth_colours) > 1
    chosen = pick_slices(masks, n)
    rows = int(np.ceil(len(chosen) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.2 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), chosen):
        ax.imshow(_show(images[i, 0]), cmap="gray")
        _contours(ax, masks[i], truth_colours, 0.8)
        if preds is not None:
            _contours(ax, preds[i], pred_colours, 0.8, "dashed" if multi else "solid")
        ax.set_title(f"slice {slice_index[i] if slice_index is not None else i}", fontsize=8)
    if multi:
        note = "  (solid: truth, dashed: prediction)" if preds is not None else ""
        _class_legend(fig, truth_colours, class_names, preds is not None)
    else:
        note = "  (green: truth, red: prediction)" if preds is not None else "  (green: label)"
    fig.suptitle(title + note)
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


def _overlay(gray: np.ndarray, mask: np.ndarray, colours: Mapping[int, tuple]) -> np.ndarray:
    """``gray`` as RGB with each class's pixels tinted in its colour (RGB in [0, 1])."""
    rgb = np.repeat(gray[..., None], 3, axis=-1).astype(np.float32)
    for k, colour in colours.items():
        sel = mask == k
        rgb[sel] = 0.55 * rgb[sel] + 0.45 * 255 * np.array(colour, dtype=np.float32)
    return rgb.astype(np.uint8)


def patient_gif(
    images: np.ndarray,
    masks: np.ndarray,
    preds: np.ndarray,
    path: str | Path,
    *,
    fps: int = 8,
    scale: int = 2,
    class_names: Mapping[int, str] | None = None,
) -> Path:
    """Animated GIF through a patient's slices: image | truth | prediction, side by side.

    One foreground class: truth green, prediction red. Several: each class in its colour
    (as in :func:`patient_grid`) in both panels.

    Args:
        images: (Z, C, H, W); masks, preds: (Z, H, W).
        class_names: foreground classes (keys) to colour besides those found in the masks.
    """
    truth_colours, pred_colours = _class_colours(class_names, masks, preds)
    frames = []
    for img, m, p in zip(images[:, 0].astype(np.float32), masks, preds):
        gray = _to_uint8(_show(img))
        frame = np.concatenate(
            [
                np.repeat(gray[..., None], 3, -1),
                _overlay(gray, _show(m), truth_colours),
                _overlay(gray, _show(p), pred_colours),
            ],
            axis=1,
        )
        frames.append(np.kron(frame, np.ones((scale, scale, 1), dtype=np.uint8)))
    with atomic_path(path, suffix=".gif") as tmp:
        iio.imwrite(tmp, np.stack(frames), extension=".gif", duration=1000 / fps, loop=0)
    return Path(path)


def pair_grid(
    images: np.ndarray,
    masks: np.ndarray,
    *,
    n: int = 16,
    cols: int = 8,
    title: str = "",
    class_names: Mapping[int, str] | None = None,
) -> Figure:
    """Image+mask pairs (e.g. synthetic samples): each image with its mask contours.

    One foreground class: green contours. Several: one colour per class, named in a legend
    (``class_names``, default "class k"), as in :func:`patient_grid`.
    """
    n = min(n, len(images))
    colours, _ = _class_colours(class_names, masks[:n])
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, img, m in zip(axes.ravel(), images[:n], masks[:n]):
        ax.imshow(_show(img[0]), cmap="gray")
        _contours(ax, m, colours, 0.7)
    if len(colours) > 1:
        _class_legend(fig, colours, class_names, preds=False)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def sources_grid(
    sources: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    n: int = 6,
    title: str = "",
    class_names: Mapping[int, str] | None = None,
) -> Figure:
    """Real and synthetic pairs side by side: one row per source (e.g. "real", each generator),
    ``n`` slices with foreground each, the mask contoured in each class's colour."""
    colours, _ = _class_colours(class_names, *(m[pick_slices(m, n)] for _, m in sources.values()))
    fig, axes = plt.subplots(len(sources), n, figsize=(1.6 * n, 1.7 * len(sources)), squeeze=False)
    for row, (name, (images, masks)) in zip(axes, sources.items()):
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.spines[:].set_visible(False)
        for ax, i in zip(row, pick_slices(masks, n)):
            ax.imshow(_show(images[i, 0]), cmap="gray")
            _contours(ax, masks[i], colours, 0.7)
        row[0].set_ylabel(name.replace(" (", "\n("), fontsize=9)  # long names on two lines
    if len(colours) > 1:
        _class_legend(fig, colours, class_names, preds=False)
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
