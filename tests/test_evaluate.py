import json
import math

import imageio.v3 as iio
import nibabel as nib
import numpy as np
import pytest
import torch

from lib.common.viz import patient_gif, patient_grid
from lib.data.slices import CaseMeta, SliceConfig, build_cache, load_slices, to_slices
from lib.data.task import read_task
from lib.seg.evaluate import evaluate, metrics_table, postprocessing_table
from lib.seg.inference import probs_to_volume
from lib.seg.metrics import dice, summarise
from lib.seg.models import ModelConfig, build_model
from tests.helpers import make_task


@pytest.fixture(scope="module")
def test_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    task = read_task(make_task(root / "t", 2, shape=(40, 36, 8)))
    cache = build_cache(task, root / "cache", SliceConfig(image_size=32), workers=1, progress=False)
    return load_slices(cache, ["p00", "p01"])


@pytest.fixture(scope="module")
def test_set_3class(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval3")
    task = read_task(make_task(root / "t", 2, shape=(40, 36, 8), classes=3))
    cache = build_cache(task, root / "cache", SliceConfig(image_size=32), workers=1, progress=False)
    return load_slices(cache, ["p00", "p01"])


class Oracle(torch.nn.Module):
    """Predicts ``masks`` for their slices (looked up by sorted values, so flips find them too).

    Outputs one-hot logits over ``classes`` classes.
    """

    def __init__(self, images, masks, classes=2):
        super().__init__()
        self.classes = classes
        self.table = {self.key(img): (img, m) for img, m in zip(images.astype(np.float32), masks)}

    @staticmethod
    def key(img):
        return np.sort(img.ravel()).tobytes()

    def forward(self, x):
        out = []
        for img in x.numpy():
            ref, mask = self.table[self.key(img)]
            for flip in ((), (-1,), (-2,), (-2, -1)):  # undo the flip TTA applied, if any
                if np.array_equal(np.flip(ref, flip) if flip else ref, img):
                    out.append(np.flip(mask, flip) if flip else mask)
                    break
        onehot = np.eye(self.classes, dtype=np.float32)[np.stack(out)]
        return torch.from_numpy(np.moveaxis(onehot, -1, 1) * 20 - 10)


def test_probs_to_volume_restores_original_geometry():
    probs = torch.zeros(8, 2, 32, 32)
    probs[:, 1, 8:24, 8:24] = 1
    volume = probs_to_volume(probs, CaseMeta("p", (40, 36, 8), (1, 1, 1), np.eye(4), "", ""))
    assert volume.shape == (40, 36, 8) and volume.dtype == np.uint8
    assert volume[20, 18, 3] == 1 and volume[0, 0, 0] == 0


@pytest.mark.parametrize("shape,spacing,canvas", [((60, 44, 3), (1.5, 1.0), 48), ((60, 60, 2), (0.8, 0.8), 32)])
def test_resampled_canvas_maps_back_to_the_original_grid(shape, spacing, canvas):
    """Slices resampled to 1.25 mm on a canvas (cropped or padded) return to the original grid."""
    label = np.zeros(shape, np.uint8)
    label[shape[0] // 4:shape[0] // 2, shape[1] // 3:2 * shape[1] // 3] = 1
    cfg = SliceConfig(image_size=16, spacing=1.25, canvas=canvas)
    _, masks, resized = to_slices(np.zeros((1, *shape), np.float32), label, (*spacing, 2.0), cfg)
    probs = torch.from_numpy(np.eye(2, dtype=np.float32)[masks]).permute(0, 3, 1, 2)
    back = probs_to_volume(probs, CaseMeta("p", shape, (*spacing, 2.0), np.eye(4), "", "", resized=resized))
    assert back.shape == shape
    assert dice(back, label, 1) > 0.9


def test_evaluate_writes_scores_and_nifti(test_set, tmp_path, capsys):
    model = Oracle(test_set.images, test_set.masks)
    result = evaluate(model, test_set, [1], tmp_path, extra={"model": "oracle"})
    assert "evaluating test patients: 100%" in capsys.readouterr().err  # a bar over the patients
    assert set(result["cases"]) == {"p00", "p01"} and result["model"] == "oracle"
    case = result["cases"]["p00"]
    assert {"dice", "iou", "hd95", "pred_volume_ml", "true_volume_ml", "dice_train_res", "per_slice_dice",
            "inference_seconds"} <= set(case)
    assert case["dice_train_res"] == pytest.approx(1.0)
    assert 0.85 < case["dice"] <= 1.0  # resampling 32 -> 40x36 costs a little, as in the MSD scoring
    assert case["pred_volume_ml"] == pytest.approx(case["true_volume_ml"], rel=0.15)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["mean"]["dice"] == pytest.approx(np.mean([c["dice"] for c in result["cases"].values()]))
    pred = nib.load(tmp_path / "predictions" / "p00.nii.gz")
    label = nib.load(test_set.cases["p00"].label_path)
    assert pred.shape == label.shape and np.allclose(pred.affine, label.affine)
    assert set(postprocessing_table(tmp_path).index) == {"plain", "lcc", "tta", "tta+lcc"}
    assert list(metrics_table(result).index) == ["p00", "p01", "mean", "n_inf"]
    assert "per_slice_dice_by_class" not in case


def test_per_slice_dice_covers_every_class(test_set_3class, tmp_path):
    # Predicts class 2 as class 1: class 1 stays partly right, class 2 is wrong everywhere.
    s = test_set_3class
    model = Oracle(s.images, np.minimum(s.masks, 1), classes=3)
    result = evaluate(model, s, [1, 2], tmp_path, compare_postprocessing=False)
    for case in result["cases"].values():
        by_class = case["per_slice_dice_by_class"]
        assert set(by_class) == {"1", "2"}
        assert all(d in (None, 0.0) for d in by_class["2"]) and 0.0 in by_class["2"]
        for z, mean in enumerate(case["per_slice_dice"]):
            kept = [by_class[k][z] for k in ("1", "2") if by_class[k][z] is not None]
            assert mean == (pytest.approx(np.mean(kept)) if kept else None)


def test_metrics_table_mean_leaves_out_inf():
    inf = math.inf
    cases = {
        "a": {"dice": 1.0, "iou": 1.0, "hd95": 2.0},
        "b": {"dice": 0.0, "iou": 0.0, "hd95": inf},  # missed structure
        "c": {"dice": 0.5, "iou": 1 / 3, "hd95": 4.0},
    }
    table = metrics_table({"cases": cases})
    assert table.loc["mean", "hd95"] == pytest.approx(3.0)
    assert table.loc["b", "hd95"] == inf
    assert list(table.index) == ["a", "b", "c", "mean", "n_inf"]
    assert table.loc["n_inf", "hd95"] == 1
    summary = summarise(cases)
    for key in ("dice", "iou", "hd95"):
        assert table.loc["mean", key] == pytest.approx(summary["mean"][key])
        assert table.loc["n_inf", key] == summary["n_inf"][key]


def test_untrained_model_scores_low(test_set, tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="fpn"))
    result = evaluate(model, test_set, [1], tmp_path, compare_postprocessing=False)
    assert result["mean"]["dice"] < 0.6


def test_figures_and_gif(test_set, tmp_path):
    p = test_set.patient("p00")
    fig = patient_grid(p.images, p.masks, p.masks, n=4)
    assert len([a for a in fig.axes if a.images]) == 4
    path = patient_gif(p.images, p.masks, p.masks, tmp_path / "x.gif", scale=1)
    frames = iio.imread(path, index=None)
    assert frames.shape[0] == 8 and frames.shape[2] == 3 * 32


def test_class_table_scores_each_class_on_its_own():
    from lib.seg.evaluate import class_table

    def case(d1, d2, h2):
        return {"per_label": {"1": {"dice": d1, "iou": d1, "hd95": 2.0, "true_volume_ml": 1.0},
                              "2": {"dice": d2, "iou": d2, "hd95": h2, "true_volume_ml": 3.0}}}

    table = class_table({"cases": {"a": case(0.9, 0.0, float("inf")), "b": case(0.7, 0.6, 4.0)}},
                        {"1": "brainstem", "2": "cord"})
    assert list(table.index) == ["brainstem", "cord"]
    assert table.loc["brainstem", "dice"] == pytest.approx(0.8) and table.loc["cord", "dice_sd"] == pytest.approx(0.3)
    assert table.loc["cord", "hd95"] == 4.0 and table.loc["cord", "hd95_n_inf"] == 1
    single = class_table({"cases": {"a": {"dice": 0.5, "iou": 0.3, "hd95": 1.0, "true_area": 10.0}}})
    assert single.loc["class 1", "mean_true_area"] == 10.0
