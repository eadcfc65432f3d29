"""Region of interest: boxes, crops and their inverse, the locator and its fallback, and a
checkpoint that segments a scan from its image alone."""

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from lib.data.run import prepare_run
from lib.seg import workflow
from lib.seg.inference import patient_probs
from lib.seg.predict import predict
from lib.seg.roi import LOCATOR_SIZE, Locator, box_around, crop, paste, sliding_window, tiles
from lib.seg.train import TrainConfig
from tests.helpers import make_task


def test_box_is_centred_on_the_structure_and_kept_inside_the_canvas():
    mask = np.zeros((3, 100, 100), np.uint8)
    mask[1, 40:60, 20:30] = 1
    assert box_around(mask, 32) == (34, 9)  # centre (50, 25)
    mask[:] = 0
    mask[0, 95:, 95:] = 1
    assert box_around(mask, 32) == (68, 68)  # pushed back inside
    assert box_around(np.zeros((2, 10, 10)), 4) is None
    small = np.zeros((1, 10, 10), np.uint8)
    small[0, 4:6, 4:6] = 1
    assert box_around(small, 20, scale=4.0) == (10, 10)  # a 10 px locator grid on a 40 px canvas


def test_paste_puts_a_crop_back_and_marks_the_rest_background():
    probs = torch.rand(2, 3, 8, 8)
    out = paste(probs, (5, 7), 20)
    assert torch.equal(crop(out, (5, 7), 8), probs)
    assert out[:, 0, 0, 0].eq(1).all() and out[:, 1:, 0, 0].eq(0).all()


@pytest.mark.parametrize("canvas,size", [(64, 32), (100, 32), (32, 32)])
def test_windows_cover_the_canvas_and_average_back_to_the_prediction(canvas, size):
    covered = np.zeros((canvas, canvas), int)
    for r, c in tiles(canvas, size):
        covered[r:r + size, c:c + size] += 1
    assert covered.min() >= 1
    images = np.random.default_rng(0).random((2, 1, canvas, canvas)).astype(np.float32)
    probs = lambda x: torch.from_numpy(np.concatenate([1 - x, x], axis=1))  # noqa: E731
    assert torch.allclose(sliding_window(probs, images, size), probs(images), atol=1e-6)


class Bright(nn.Module):
    """Foreground wherever the input is above 0.5 (logit +-10)."""

    def forward(self, x):
        return (x[:, :1] > 0.5).float() * 20 - 10


def test_locator_finds_the_structure_or_falls_back_to_windows_with_a_warning():
    canvas, size = 128, 32
    images = np.zeros((4, 3, canvas, canvas), np.float32)  # context 1: the locator reads the centre channel
    images[1:3, 1, 80:100, 20:36] = 1.0
    locator = Locator(Bright(), size, channels=1, context=1)
    box = locator.find(images)
    assert box is not None and abs(box[0] - (90 - 16)) <= 2 and abs(box[1] - (28 - 16)) <= 2
    model = Bright()
    probs = patient_probs(model, images[:, 1:2], locator=Locator(Bright(), size, 1, 0))
    assert probs.shape == (4, 2, canvas, canvas) and probs[1, 1, 90, 28] > 0.99
    with pytest.warns(UserWarning, match="scan_x: the region-of-interest stage found no structure"):
        empty = patient_probs(model, np.zeros((2, 1, canvas, canvas), np.float32), locator=locator.__class__(
            Bright(), size, 1, 0), case="scan_x")
    assert empty.shape == (2, 2, canvas, canvas) and empty[:, 1].max() < 0.01


def test_roi_run_trains_a_locator_crops_and_segments_new_scans_from_the_checkpoint(tmp_path):
    task = make_task(tmp_path / "Task99_Test", 5, shape=(80, 72, 8))
    run = prepare_run(str(task), tmp_path / "run", image_size=32, seed=0, context=1, spacing="median", roi=True,
                      progress=False)
    assert run.slice_cfg.spacing == 1.5 and run.slice_cfg.canvas == 96  # the helper scans have 1.5 mm pixels
    with pytest.raises(RuntimeError, match="train or load its locator first"):
        run.slices("train")
    cfg = TrainConfig(epochs=1, batch_size=8, augment=None, device="cpu", patience=None)
    located = workflow.train_locator(run, cfg, 0.5, progress=False)
    assert located.model is not None and set(run.boxes) == {c.case_id for c in run.task.cases}
    assert run.locator.model(torch.zeros(1, 1, LOCATOR_SIZE, LOCATOR_SIZE)).shape[-1] == LOCATOR_SIZE
    train = run.slices("train")
    assert train.images.shape[1:] == (3, 32, 32)
    case = run.split["train"][0]  # training patients are cropped around their labels: all of it inside
    assert run.slices("train").patient(case).masks.sum() == run.canvas_slices("train").patient(case).masks.sum()
    model_cfg = workflow.model_config(run, "unet", encoder_depth=3, decoder={"decoder_channels": [32, 16, 8]})
    workflow.train_model(run, "unet", model_cfg, cfg, progress=False)
    model, meta = workflow.reload_model(run, "unet")
    assert meta["locator"]["size"] == 32 and meta["data"]["slice_config"]["roi"] is True
    metrics = workflow.test_model(run, "unet", model, meta)
    assert set(metrics["cases"]) == set(run.split["test"])
    test_case = run.task.case(run.split["test"][0])
    table = predict(run.run_dir / "unet" / "best.pt", test_case.image, tmp_path / "new", progress=False)
    assert table.loc[test_case.case_id, "error"] == ""
    evaluated = np.asarray(nib.load(run.run_dir / "unet" / "predictions" / f"{test_case.case_id}.nii.gz").dataobj)
    written = nib.load(tmp_path / "new" / test_case.image.name)
    assert written.shape == (80, 72, 8) and np.array_equal(np.asarray(written.dataobj), evaluated)
    assert np.allclose(written.affine, nib.load(test_case.image).affine)


def test_scans_that_fit_in_one_crop_need_no_region_of_interest(tmp_path, capsys):
    task = make_task(tmp_path / "Task99_Test", 3, shape=(40, 36, 6))
    run = prepare_run(str(task), tmp_path / "run", image_size=64, seed=0, spacing="median", roi=True, progress=False)
    assert (run.slice_cfg.roi, run.slice_cfg.image_size, run.slice_cfg.spacing) == (False, 64, 1.5)
    assert "every scan fits in 64 px at 1.5 mm" in capsys.readouterr().out
    assert run.slices("train").images.shape[-2:] == (64, 64)
