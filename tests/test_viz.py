"""Tests for lib.common.viz: one colour per class in contour figures and GIFs."""

from __future__ import annotations

import imageio.v3 as iio
import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.colors import to_rgba

from lib.common.viz import pair_grid, patient_gif, patient_grid, sources_grid
from tests.helpers import make_discs

TAB10 = plt.colormaps["tab10"].colors


def _toy(classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Two black 24x24 slices; foreground class k < ``classes`` fills rows 2-9, cols 8k-6..8k+1."""
    images = np.zeros((2, 1, 24, 24), dtype=np.float32)
    masks = np.zeros((2, 24, 24), dtype=np.uint8)
    for k in range(1, classes):
        masks[:, 2:10, 8 * k - 6:8 * k + 2] = k
    return images, masks


def _contours(ax: plt.Axes) -> set[tuple[tuple[float, ...], bool]]:
    """(RGBA colour, dashed) of each contour drawn on ``ax``."""
    out = set()
    for c in ax.collections:
        for colour in c.get_edgecolor():
            dashed = any(dashes is not None for _, dashes in c.get_linestyle())
            out.add((_rgba(colour), dashed))
    return out


def _rgba(colour) -> tuple[float, ...]:
    return tuple(round(float(c), 3) for c in to_rgba(colour))


def test_patient_grid_binary_keeps_green_truth_red_prediction() -> None:
    images, masks = _toy(2)
    fig = patient_grid(images, masks, masks, n=2, cols=2)
    assert _contours(fig.axes[0]) == {(_rgba("lime"), False), (_rgba("red"), False)}
    assert "green: truth, red: prediction" in fig._suptitle.get_text()
    plt.close(fig)


def test_patient_grid_one_colour_per_class() -> None:
    images, masks = _toy(3)
    preds = masks.copy()
    fig = patient_grid(images, masks, preds, n=2, cols=2)
    class_1, class_2 = _rgba(TAB10[0]), _rgba(TAB10[1])
    # truth solid, prediction dashed, each class in its own colour
    expected = {(class_1, False), (class_2, False), (class_1, True), (class_2, True)}
    assert _contours(fig.axes[0]) == expected
    plt.close(fig)


def test_patient_grid_legend_names_classes() -> None:
    images, masks = _toy(3)
    fig = patient_grid(images, masks, masks, n=2, cols=2, class_names={0: "bg", 1: "LV", 2: "RV"})
    labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert {"LV", "RV", "truth", "prediction"} <= set(labels) and "bg" not in labels
    assert "solid: truth, dashed: prediction" in fig._suptitle.get_text()
    plt.close(fig)


def test_pair_grid_one_colour_per_class() -> None:
    images, masks = _toy(3)
    fig = pair_grid(images, masks, n=2, cols=2)
    assert _contours(fig.axes[0]) == {(_rgba(TAB10[0]), False), (_rgba(TAB10[1]), False)}
    plt.close(fig)


def _panel_colours(path, masks: np.ndarray) -> dict[str, dict[int, np.ndarray]]:
    """Colour of each class's pixels in the truth and prediction panels of the first frame."""
    frame = iio.imread(path, index=None)[0].astype(int)
    shown = np.rot90(masks[0])
    width = shown.shape[1]
    panels = {"truth": frame[:, width:2 * width], "pred": frame[:, 2 * width:]}
    return {
        name: {k: panel[shown == k].mean(0) for k in np.unique(shown) if k}
        for name, panel in panels.items()
    }


def test_patient_gif_binary_keeps_green_truth_red_prediction(tmp_path) -> None:
    images, masks = _toy(2)
    colours = _panel_colours(patient_gif(images, masks, masks, tmp_path / "b.gif", scale=1), masks)
    r, g, b = colours["truth"][1]
    assert g > 100 and r < 20 and b < 20
    r, g, b = colours["pred"][1]
    assert r > 100 and g < 20 and b < 20


def test_patient_gif_one_colour_per_class(tmp_path) -> None:
    images, masks = _toy(3)
    colours = _panel_colours(patient_gif(images, masks, masks, tmp_path / "m.gif", scale=1), masks)
    truth, pred = colours["truth"], colours["pred"]
    assert np.abs(truth[1] - truth[2]).max() > 40
    for k in (1, 2):
        np.testing.assert_allclose(pred[k], truth[k], atol=8)
        np.testing.assert_allclose(truth[k], 0.45 * np.array(TAB10[k - 1]) * 255, atol=8)


@pytest.mark.parametrize("fn", [patient_grid, pair_grid])
def test_empty_masks_draw_nothing(fn) -> None:
    images, masks = _toy(1)
    fig = fn(images, masks, n=2, cols=2)
    assert not fig.axes[0].collections and not fig.legends
    plt.close(fig)


def test_sources_grid_has_one_labelled_row_per_source():
    images, masks = make_discs(12, 32)
    fig = sources_grid({"real": (images, masks), "gan": (images[::-1], masks[::-1])}, n=4)
    labels = [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()]
    assert labels == ["real", "gan"] and len(fig.axes) == 8
    assert sum(len(ax.images) for ax in fig.axes) == 8
