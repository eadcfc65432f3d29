"""Segmenting new, unlabelled NIfTI scans with a checkpoint: outputs in each input's geometry and
orientation, the same masks as the evaluation, and every bad input reported by name."""

import hashlib
import json
import pathlib
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from lib.data.nifti import from_canonical, to_canonical
from lib.data.run import prepare_run
from lib.data.slices import ct_window_from_data
from lib.data.task import MSDDataError, read_task
from lib.seg import workflow
from lib.seg.postprocess import piece_thresholds, remove_small_pieces
from lib.seg.predict import MANIFEST, Predictor, _check_modality, find_inputs, main, predict
from lib.seg.train import TrainConfig
from tests.helpers import blob_case, make_task, write_task


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict")
    run = prepare_run(str(make_task(tmp / "Task98_Pred", 5, shape=(40, 36, 6))), tmp / "run",
                      image_size=32, seed=0, context=1, spacing="median", progress=False)
    cfg = TrainConfig(epochs=2, batch_size=8, augment=None, device="cpu", patience=None)
    workflow.train_model(run, "unet", workflow.model_config(run, "unet", encoder_depth=3,
                         decoder={"decoder_channels": [32, 16, 8]}), cfg, progress=False)
    model, meta = workflow.reload_model(run, "unet")
    workflow.test_model(run, "unet", model, meta)
    return run, run.run_dir / "unet" / "best.pt"


def test_canonical_orientation_round_trips_any_voxel_order():
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    affine = np.array([[0, -2.0, 0, 10], [1.5, 0, 0, -4], [0, 0, -3.0, 7], [0, 0, 0, 1]])
    canonical = to_canonical(nib.Nifti1Image(data, affine))
    assert nib.aff2axcodes(canonical.affine) == ("R", "A", "S") and canonical.shape == (3, 2, 4)
    assert np.array_equal(from_canonical(np.asarray(canonical.dataobj), affine), data)


def test_an_imagests_folder_is_segmented_like_the_evaluation_and_in_each_scans_orientation(
        trained, tmp_path):
    run, checkpoint = trained
    test_ids = run.split["test"]
    inputs = tmp_path / "Task98_Pred" / "imagesTs"
    inputs.mkdir(parents=True)
    for cid in test_ids:
        shutil.copy(run.task.case(cid).image, inputs / f"{cid}.nii.gz")
    # the same scan stored left-right flipped (LAS)
    flipped = nib.load(run.task.case(test_ids[0]).image)
    flip = np.diag([-1.0, 1, 1, 1])
    flip[0, 3] = flipped.shape[0] - 1
    nib.save(nib.Nifti1Image(np.asarray(flipped.dataobj)[::-1].copy(), flipped.affine @ flip),
             inputs / "flipped.nii.gz")
    # finds imagesTs
    table = predict(checkpoint, tmp_path / "Task98_Pred", tmp_path / "out", progress=False)
    assert list(table.index) == sorted([*test_ids, "flipped"]) and (table["error"] == "").all()
    for cid in test_ids:
        written = nib.load(tmp_path / "out" / f"{cid}.nii.gz")
        evaluated = nib.load(run.run_dir / "unet" / "predictions" / f"{cid}.nii.gz")
        assert np.array_equal(np.asarray(written.dataobj), np.asarray(evaluated.dataobj))
        assert np.allclose(written.affine, nib.load(inputs / f"{cid}.nii.gz").affine)
    mask = np.asarray(nib.load(tmp_path / "out" / f"{test_ids[0]}.nii.gz").dataobj)
    flipped_mask = np.asarray(nib.load(tmp_path / "out" / "flipped.nii.gz").dataobj)
    assert np.array_equal(flipped_mask, mask[::-1])
    assert "a volume_ml" in table.columns  # the class name from dataset.json


def test_bad_scans_are_reported_by_name_and_the_others_written(trained, tmp_path, capsys):
    run, checkpoint = trained
    inputs = tmp_path / "in"
    inputs.mkdir()
    good = run.split["test"][0]
    shutil.copy(run.task.case(good).image, inputs / "good.nii.gz")
    two = np.stack([np.asarray(nib.load(run.task.case(good).image).dataobj)] * 2, -1)
    nib.save(nib.Nifti1Image(two, np.eye(4)), inputs / "two_channels.nii.gz")
    (inputs / "broken.nii.gz").write_bytes(b"not a nifti")
    assert main([str(checkpoint), str(inputs), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "FAILED two_channels:" in err and "2 channel(s), but" in err and "FAILED broken:" in err
    assert (tmp_path / "out" / "good.nii.gz").is_file()
    assert not (tmp_path / "out" / "broken.nii.gz").exists()
    # would overwrite good.nii.gz
    assert main([str(checkpoint), str(inputs), str(tmp_path / "out")]) == 2
    assert "already holds 1 mask(s) that msdseg-predict wrote" in capsys.readouterr().err


def _scans(run, folder, n=2):
    """Copies of ``n`` of the task's scans in ``folder``; their names."""
    folder.mkdir(parents=True, exist_ok=True)
    for case in run.task.cases[:n]:
        shutil.copy(case.image, folder / case.image.name)
    return [case.image.name for case in run.task.cases[:n]]


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_masks_never_replace_the_input_scans(trained, tmp_path, capsys):
    run, checkpoint = trained
    task = tmp_path / "Task98_Pred"
    inputs = task / "imagesTs"
    names = _scans(run, inputs)
    Image.fromarray(np.full((8, 8), 9, np.uint8)).save(inputs / "xray.png")
    before = _digests(task)
    refused = {  # input, output: what the message says
        inputs: (inputs, "the output folder is the input folder"),
        "inside": (inputs, "lies inside the input folder"),
        "task": (task, "lies inside the input folder"),  # the task folder's imagesTs is used
        "file": (inputs / names[0], f"{names[0]} (one of the input scans)"),
    }
    for key, (source, message) in refused.items():
        out = inputs / "masks" if key == "inside" else inputs
        assert main([str(checkpoint), str(source), str(out), "--overwrite"]) == 2, key
        err = capsys.readouterr().err
        assert message in err and "nothing written" in err and len(err.strip().splitlines()) == 1
        assert _digests(task) == before and not (inputs / "masks").exists()
        assert not (inputs / MANIFEST).exists()


def test_overwrite_replaces_only_the_masks_the_command_wrote(trained, tmp_path, capsys):
    run, checkpoint = trained
    names = _scans(run, tmp_path / "in")
    args = [str(checkpoint), str(tmp_path / "in")]
    foreign = tmp_path / "theirs"
    foreign.mkdir()
    (foreign / names[1]).write_bytes(b"a mask drawn by hand")
    assert main([*args, str(foreign), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert f"{names[1]} (a file that msdseg-predict did not write)" in err
    assert (foreign / names[1]).read_bytes() == b"a mask drawn by hand"
    assert sorted(p.name for p in foreign.iterdir()) == [names[1]]

    ours = tmp_path / "ours"
    assert main([*args, str(ours)]) == 0
    manifest = json.loads((ours / MANIFEST).read_text())
    assert sorted(manifest["files"]) == sorted(names)
    assert set(manifest["files"].values()) == {str(checkpoint.resolve())}
    assert main([*args, str(ours)]) == 2
    assert "already holds 2 mask(s) that msdseg-predict wrote" in capsys.readouterr().err
    assert main([*args, str(ours), "--overwrite"]) == 0


@pytest.mark.parametrize("names", [("a.png", "a.jpg"), ("a.nii", "a.nii.gz")])
def test_inputs_that_would_write_the_same_mask_are_refused(trained, tmp_path, capsys, names):
    _, checkpoint = trained
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in names:
        if name.endswith((".nii", ".nii.gz")):
            nib.save(nib.Nifti1Image(np.zeros((8, 8, 2), np.float32), np.eye(4)), inputs / name)
        else:
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(inputs / name)
    assert main([str(checkpoint), str(inputs), str(tmp_path / "out"), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert all(str(inputs / name) in err for name in names) and "case 'a'" in err
    assert not (tmp_path / "out").exists()


class _Touch:
    """Unpickling this creates ``marker``: code that a checkpoint must never run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def _unknown_key(state, tmp_path):
    state["model_config"]["layers_of_magic"] = 3


def _missing_weight(state, tmp_path):
    del state["state_dict"][next(iter(state["state_dict"]))]


def _no_data(state, tmp_path):
    del state["data"]


def _no_slice_config(state, tmp_path):
    del state["data"]["slice_config"]


def _malicious(state, tmp_path):
    state["payload"] = _Touch(tmp_path / "pwned")


@pytest.mark.parametrize("spoil", [_unknown_key, _missing_weight, _no_data, _no_slice_config,
                                   _malicious])
def test_an_unusable_checkpoint_exits_3_and_writes_nothing(trained, tmp_path, capsys, spoil):
    run, checkpoint = trained
    _scans(run, tmp_path / "in", n=1)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    spoil(state, tmp_path)
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    out = tmp_path / "new" / "out"
    assert main([str(bad), str(tmp_path / "in"), str(out)]) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"msdseg-predict: {bad}: ")
    assert "Traceback" not in err and not (tmp_path / "new").exists()
    assert not (tmp_path / "pwned").exists()
    assert main([str(tmp_path / "missing.pt"), str(tmp_path / "in"), str(out)]) == 3
    assert "missing.pt: checkpoint does not exist" in capsys.readouterr().err


def test_a_scan_with_a_nan_voxel_fails_alone(trained, tmp_path, capsys):
    run, checkpoint = trained
    names = _scans(run, tmp_path / "in")
    scan = nib.load(tmp_path / "in" / names[0])
    voxels = np.asarray(scan.dataobj, dtype=np.float32)
    voxels[3, 4, 1] = np.nan
    nib.save(nib.Nifti1Image(voxels, scan.affine), tmp_path / "in" / "holey.nii.gz")
    out = tmp_path / "out"
    assert main([str(checkpoint), str(tmp_path / "in"), str(out)]) == 1
    failed = [line for line in capsys.readouterr().err.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and "NaN" in failed[0]
    assert failed[0].startswith(f"FAILED holey: {tmp_path / 'in' / 'holey.nii.gz'}: 1 of")
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, *names])
    assert sorted(json.loads((out / MANIFEST).read_text())["files"]) == sorted(names)
    # every scan failed: no new output folder is left behind
    holey = tmp_path / "in" / "holey.nii.gz"
    assert main([str(checkpoint), str(holey), str(tmp_path / "a" / "b")]) == 1
    assert not (tmp_path / "a").exists()


def test_the_help_lists_the_exit_codes(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for line in ("0  every scan segmented", "1  some scans failed",
                 "2  bad arguments, input or output", "3  unusable checkpoint"):
        assert line in text


def test_inputs_that_hold_nothing_to_segment_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MSDDataError, match="empty input folder"):
        find_inputs(tmp_path / "empty")
    with pytest.raises(MSDDataError, match="no such file"):
        find_inputs(tmp_path / "missing")


def test_a_ct_checkpoint_refuses_a_scan_that_is_not_in_hu(tmp_path):
    data = {"in_channels": 1, "context_slices": 0, "is_ct": True, "is_2d": False,
            "modalities": {"0": "CT"}}
    predictor = Predictor(torch.nn.Identity(), None, data, "ct.pt", torch.device("cpu"))
    _check_modality(predictor, tmp_path / "ct.nii.gz", np.full((1, 4, 4, 2), -1000.0))
    with pytest.raises(MSDDataError,
                       match="mri.nii.gz: lowest value 0, but ct.pt was trained on CT in HU"):
        _check_modality(predictor, tmp_path / "mri.nii.gz", np.zeros((1, 4, 4, 2)))
    with pytest.raises(MSDDataError,
                       match="x.png: a 2D image, but ct.pt was trained on NIfTI volumes"):
        _check_modality(predictor, tmp_path / "x.png", np.zeros((1, 4, 4, 1)))


def test_the_ct_window_comes_from_the_training_patients_labelled_voxels(tmp_path):
    rng = np.random.default_rng(0)
    cases = {f"c{i}": blob_case(rng, (24, 24, 6)) for i in range(3)}
    task = read_task(write_task(tmp_path / "TaskCT", cases, modality={"0": "CT"}))
    record = tmp_path / "window.json"
    window = ct_window_from_data(task, ["c0", "c1"], record)
    inside = np.concatenate([img[lab > 0] for img, lab in (cases["c0"], cases["c1"])])
    assert window == pytest.approx(tuple(np.percentile(inside, (0.5, 99.5))), abs=15)
    assert ct_window_from_data(task, ["c0", "c1"], record) == window and record.is_file()
    run = prepare_run(str(task.root), tmp_path / "run", image_size=16, seed=0, progress=False)
    assert run.slice_cfg.ct_window == ct_window_from_data(task, run.split["train"])
    fixed = prepare_run(str(task.root), tmp_path / "run2", image_size=16, seed=0,
                        ct_window=(-100, 300), progress=False)
    assert fixed.slice_cfg.ct_window == (-100.0, 300.0)


def test_pieces_smaller_than_training_allows_are_removed_and_two_lungs_kept():
    one = np.zeros((20, 20, 1), np.uint8)
    one[2:8, 2:8] = 1  # class 1: two pieces of 36 and 24 pixels (two lungs)
    one[12:18, 2:6] = 1
    one[2:6, 12:16] = 2  # class 2: one piece
    thresholds = piece_thresholds([one], [1, 2, 3])
    assert thresholds == {1: pytest.approx(0.5 * 24 / 36), 2: 0.5}
    pred = one.copy()
    pred[10, 10] = 1  # a speck of class 1 and a small second piece of class 2
    pred[15:17, 15:17] = 2
    cleaned = remove_small_pieces(pred, thresholds)
    assert np.array_equal(cleaned, one)
