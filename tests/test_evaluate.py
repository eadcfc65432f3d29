import json

import imageio.v3 as iio
import nibabel as nib
import numpy as np
import pytest
import torch

from lib.evaluate import evaluate, metrics_table, postprocessing_table
from lib.inference import probs_to_volume
from lib.models import ModelConfig, build_model
from lib.msd import read_task
from lib.slices import SliceConfig, build_cache, load_slices
from lib.viz import patient_gif, patient_grid
from tests.helpers import make_task


@pytest.fixture(scope="module")
def test_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    task = read_task(make_task(root / "t", 2, shape=(40, 36, 8)))
    cache = build_cache(task, root / "cache", SliceConfig(image_size=32), workers=1, progress=False)
    return load_slices(cache, ["p00", "p01"])


class Oracle(torch.nn.Module):
    """Predicts the true mask of each slice (looked up by its sorted values, so flips find it too)."""

    def __init__(self, images, masks):
        super().__init__()
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
        return torch.from_numpy(np.stack(out)[:, None].astype(np.float32) * 20 - 10)


def test_probs_to_volume_restores_original_geometry():
    probs = torch.zeros(8, 2, 32, 32)
    probs[:, 1, 8:24, 8:24] = 1
    volume = probs_to_volume(probs, (40, 36, 8))
    assert volume.shape == (40, 36, 8) and volume.dtype == np.uint8
    assert volume[20, 18, 3] == 1 and volume[0, 0, 0] == 0


def test_evaluate_writes_scores_and_nifti(test_set, tmp_path):
    model = Oracle(test_set.images, test_set.masks)
    result = evaluate(model, test_set, [1], tmp_path, extra={"model": "oracle"})
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
    assert list(metrics_table(result).index) == ["p00", "p01", "mean"]


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
