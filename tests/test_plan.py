"""Plans that follow the data: a dataset's fingerprint within a preset's budget gives the settings,
each with its reason; an explicit parameter wins and the plan says so; checkpoints carry the plan
and new scans are segmented with it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from lib.common.presets import UNCAPPED_EPOCHS
from lib.data import fingerprint as fingerprint_mod
from lib.data.fingerprint import dataset_fingerprint
from lib.data.images2d import read_image_folder
from lib.data.plan import make_plan, plan_problem, plan_run, round_up
from lib.data.run import prepare_run
from lib.data.task import MSDDataError, read_task
from lib.seg import predict as predict_mod
from lib.seg import workflow
from lib.seg.checkpoint import CheckpointError, read_checkpoint
from lib.seg.predict import Predictor, predict
from lib.seg.train import TrainConfig
from tests.helpers import write_task


def sphere_case(rng: np.random.Generator, shape: tuple[int, int, int], spacing: tuple[float, float, float],
                radius_mm: float, *, background: float = 100.0, inside: float = 400.0,
                air: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A sphere of ``radius_mm`` (label 1) at a random place in noise; with ``air``, the volume
    outside a body cylinder holds that value (CT in HU)."""
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    half = [n * s / 2 for n, s in zip(shape, spacing)]
    cx, cy = (rng.uniform(-0.4, 0.4) * (h - radius_mm) for h in half[:2])
    label = ((x - cx) ** 2 + (y - cy) ** 2 + z ** 2 <= radius_mm ** 2).astype(np.uint8)
    image = rng.normal(background, 10, shape) + (inside - background) * label.astype(np.float64)
    if air is not None:
        image[x ** 2 + y ** 2 > (0.9 * min(half[:2])) ** 2] = air
    return image.astype(np.int16), label


@pytest.fixture(scope="module")
def anisotropic(tmp_path_factory):
    """MRI volumes of 160 x 160 x 8 voxels at 0.8 x 0.8 x 4 mm with a 10 mm sphere: a small
    structure in a large field of view, slices five times thicker than the pixels."""
    rng = np.random.default_rng(0)
    spacing = (0.8, 0.8, 4.0)
    cases = {f"a{i}": sphere_case(rng, (160, 160, 8), spacing, 10.0) for i in range(4)}
    return read_task(write_task(tmp_path_factory.mktemp("aniso") / "TaskAniso", cases, spacing=spacing))


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    """CT volumes in HU: air (-1000) around a soft-tissue body (40 HU) holding a bright structure (300 HU)."""
    rng = np.random.default_rng(1)
    spacing = (1.5, 1.5, 3.0)
    cases = {f"c{i}": sphere_case(rng, (48, 48, 6), spacing, 9.0, background=40, inside=300, air=-1000)
             for i in range(5)}
    return read_task(write_task(tmp_path_factory.mktemp("ct") / "TaskCT", cases, modality={"0": "CT"},
                                spacing=spacing))


def xray_folder(root, n: int = 6):
    """A 2D folder of grey PNGs about 300 x 260 px with a disc mask (0/255) each."""
    rng = np.random.default_rng(2)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        h, w = 260 + 4 * i, 300 - 2 * i
        yy, xx = np.mgrid[:h, :w]
        mask = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 <= (0.3 * h) ** 2
        image = np.clip(rng.normal(60, 15, (h, w)) + 120 * mask, 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"x{i}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"x{i}.png")
    return root


def test_a_2d_folder_is_planned_whole_at_the_size_the_budget_allows(tmp_path):
    fp = dataset_fingerprint(read_image_folder(xray_folder(tmp_path / "xray")), progress=False)
    assert fp["kind"] == "2d" and fp["cases"] == 6 and fp["spacing_unit"] == "px"
    assert fp["longer_side_px"]["median"] == pytest.approx(295.0) and fp["foreground_slices"]["share"] == 1.0
    assert fp["intensity"]["0"]["foreground"]["50"] > fp["intensity"]["0"]["all"]["50"]  # the discs are brighter
    cpu = make_plan(fp, "cpu")
    assert cpu.values["image_size"] == 256 and cpu.values["spacing"] is False and cpu.values["roi"] is False
    assert cpu.values["context_slices"] == 0 and cpu.values["normalisation"] == "zscore"
    assert cpu.values["epochs"] == UNCAPPED_EPOCHS and cpu.values["time_budget_min"] == 15.0
    assert cpu.values["patience_minutes"] == 5.0  # early stopping never in the first 5 of 15 minutes
    assert "median longer side 295 px" in cpu.fields["image_size"]["reason"]
    assert make_plan(fp, "gpu").values["image_size"] == 320  # the data's own size, a multiple of 32
    demo = make_plan(fp, "demo").values
    assert (demo["image_size"], demo["epochs"], demo["time_budget_min"], demo["tta"]) == (64, 4, 3.0, False)


def test_a_small_structure_in_a_large_anisotropic_field_of_view_gets_a_locator_and_context(anisotropic):
    fp = dataset_fingerprint(anisotropic, progress=False)
    assert fp["kind"] == "3d" and fp["anisotropy"]["median"] == pytest.approx(5.0)
    assert fp["in_plane_spacing_mm"]["median"] == pytest.approx(0.8)
    extent = fp["foreground"]["all"]["longer_in_plane_mm"]["p90"]
    assert 16 <= extent <= 21 and fp["foreground"]["1"]["cases"] == 4  # a 10 mm sphere: about 20 mm across
    plan = make_plan(fp, "cpu")
    values = plan.values
    assert values["spacing"] == pytest.approx(0.8)  # the median in-plane spacing, not the 4 mm slices
    assert values["roi"] is True and values["image_size"] == 64  # 25 px + context -> the smallest crop, 64
    assert values["context_slices"] == 1 and "anisotropy 5" in plan.fields["context_slices"]["reason"]
    assert values["roi_minutes"] == 1.5 and values["batch_size"] == 16
    assert "160 px field of view" in plan.fields["roi"]["reason"]
    demo = make_plan(fp, "demo").values  # as the demo preset always was: whole slices at 64 px, 4 epochs
    assert {k: demo[k] for k in ("image_size", "spacing", "roi", "context_slices", "epochs", "batch_size")} == \
        {"image_size": 64, "spacing": False, "roi": False, "context_slices": 0, "epochs": 4, "batch_size": 16}


def test_a_structure_on_one_or_two_slices_gets_no_context_and_a_large_one_no_locator(tmp_path):
    rng = np.random.default_rng(3)
    thin = {f"t{i}": sphere_case(rng, (64, 64, 6), (1.0, 1.0, 10.0), 6.0) for i in range(3)}
    fp = dataset_fingerprint(read_task(write_task(tmp_path / "TaskThin", thin, spacing=(1.0, 1.0, 10.0))),
                             progress=False)
    assert fp["foreground_slices"]["slices_with_foreground"]["median"] <= 2
    plan = make_plan(fp, "cpu")
    assert plan.values["context_slices"] == 0 and "neighbours add little" in plan.fields["context_slices"]["reason"]
    assert plan.values["roi"] is False and plan.values["image_size"] == 64  # the whole 64 mm at 1 mm


def test_the_locator_crop_follows_the_structure_and_a_large_field_of_view_is_coarsened():
    fp = {"kind": "3d", "cases": 10, "spacing_unit": "mm", "in_plane_spacing_mm": {"median": 1.0},
          "field_of_view_mm": {"max": [600.0, 500.0]}, "longer_side_px": {"median": 600},
          "anisotropy": {"median": 1.0}, "foreground_slices": {"slices_with_foreground": {"median": 20}},
          "foreground": {"all": {"cases": 10, "longer_in_plane_mm": {"p90": 100.0}}},
          "modality": {"is_ct": False, "intensities_look_like_hu": False},
          "intensity": {"0": {"all": {"0.5": 0.0}, "foreground": None}}}
    plan = make_plan(fp, "cpu")
    assert plan.values["roi"] is True and plan.values["image_size"] == round_up(125) == 128
    big = fp | {"foreground": {"all": {"cases": 10, "longer_in_plane_mm": {"p90": 400.0}}}}
    plan = make_plan(big, "cpu")  # 400 mm + context needs 500 px of 1 mm: whole slices, resampled to fit 256 px
    assert plan.values["roi"] is False and plan.values["image_size"] == 256
    assert plan.values["spacing"] == pytest.approx(600 / 256, abs=1e-3) and "coarsened" in plan.fields["spacing"]["reason"]
    assert plan.values["batch_size"] == 16 and make_plan(big, "gpu").values["image_size"] == 512
    small = make_plan(big, "cpu", {"image_size": 128})  # whole slices at a given size: coarser still, nothing cut off
    assert small.values["spacing"] == pytest.approx(600 / 128, abs=1e-3) and small.given == ["image_size"]
    assert make_plan(big, "cpu", {"image_size": 128, "spacing": 1.0}).values["spacing"] == 1.0  # both given: kept


def test_ct_in_hu_is_windowed_from_its_labelled_voxels(ct, tmp_path):
    fp = dataset_fingerprint(ct, progress=False)
    assert fp["modality"]["is_ct"] and fp["modality"]["intensities_look_like_hu"]
    assert fp["intensity"]["0"]["all"]["0.5"] == pytest.approx(-1000) and fp["intensity"]["0"]["min"] == -1000
    assert 250 < fp["intensity"]["0"]["foreground"]["50"] < 350
    plan = make_plan(fp, "cpu")
    assert plan.values["normalisation"] == "ct_window" and plan.values["ct_window"] is None
    assert "labelled voxels" in plan.fields["normalisation"]["reason"]
    run = prepare_run(str(ct.root), tmp_path / "run", image_size=plan.values["image_size"], seed=0, progress=False,
                      plan=plan.to_dict())
    low, high = run.slice_cfg.ct_window
    assert 200 < low < high < 400  # the window the plan promised: from the training patients' structure
    assert json.loads((tmp_path / "run" / "run.json").read_text())["plan"]["preset"] == "cpu"


def test_a_modality_the_intensities_contradict_is_named(ct, anisotropic):
    hu = dataset_fingerprint(ct, progress=False)
    hu["modality"] = hu["modality"] | {"is_ct": False}  # HU values declared as MRI
    plan = make_plan(hu, "cpu")
    assert plan.values["normalisation"] == "zscore" and "look like HU" in plan.fields["normalisation"]["reason"]
    mri = dataset_fingerprint(anisotropic, progress=False)
    mri["modality"] = mri["modality"] | {"is_ct": True}  # MRI values declared as CT
    assert "do not look like HU" in make_plan(mri, "cpu").fields["normalisation"]["reason"]


def test_an_explicit_parameter_wins_and_the_plan_says_so(anisotropic):
    fp = dataset_fingerprint(anisotropic, progress=False)
    plan = make_plan(fp, "cpu", {"image_size": 128, "roi": None, "tta": False, "unrelated": 3})
    assert plan.given == ["image_size", "tta"]
    field = plan.fields["image_size"]
    assert field["value"] == 128 and field["given"] and field["reason"].startswith("given explicitly (the plan: 128;")
    assert plan.values["roi"] is False  # a 128 px crop is not under half of the 160 px field of view...
    assert plan.values["spacing"] == 1.0 and "coarsened" in plan.fields["spacing"]["reason"]  # ...whose 128 mm fit 128 px
    assert plan.fill({"image_size": 128, "roi": None, "tta": False, "batch_size": None, "other": None}) == \
        {"roi": False, "batch_size": 16}
    table = plan.table()
    assert table.loc["image_size", "chosen by"] == "given" and table.loc["roi", "chosen by"] == "plan (cpu)"
    demo = make_plan(fp, "demo", {"time_budget_min": 5.0})  # an explicit budget is spent: no epoch cap
    assert demo.values["epochs"] == UNCAPPED_EPOCHS and demo.values["patience_minutes"] == pytest.approx(1.67)
    with pytest.raises(ValueError, match="unknown preset 'laptop'"):
        make_plan(fp, "laptop")


def test_the_fingerprint_is_cached_and_recomputed_when_the_data_changes(anisotropic, tmp_path, monkeypatch):
    params = {"data": str(anisotropic.root), "run_dir": str(tmp_path / "run"), "image_size": 96, "roi": None}
    plan = plan_run("cpu", params)
    saved = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert saved["given"] == ["image_size"] and saved["fields"]["roi"]["reason"] == plan.fields["roi"]["reason"]
    assert saved["fingerprint_key"] == json.loads((tmp_path / "run" / "fingerprint.json").read_text())["source_key"]
    calls = []
    real = fingerprint_mod.compute_fingerprint
    monkeypatch.setattr(fingerprint_mod, "compute_fingerprint", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert plan_run("cpu", params).values == plan.values and calls == []  # reused: nothing read again
    label = anisotropic.cases[0].label
    os.utime(label, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns + 10**9))
    plan_run("cpu", params)
    assert calls == [1]  # a changed file: fingerprinted again


def test_an_unreadable_case_is_named(tmp_path):
    rng = np.random.default_rng(4)
    task = read_task(write_task(tmp_path / "TaskBad", {f"b{i}": sphere_case(rng, (16, 16, 4), (1, 1, 1), 3.0)
                                                       for i in range(2)}))
    task.cases[1].image.write_bytes(b"not a nifti")
    with pytest.raises(MSDDataError, match=r"b1\.nii\.gz: cannot read NIfTI"):
        dataset_fingerprint(task, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "fingerprint.json").exists()


def test_malformed_plans_are_named():
    assert plan_problem({"fields": {"tta": {"value": True, "reason": "x", "given": False}}}) is None
    assert "not an object" in plan_problem([1])
    assert "no fields" in plan_problem({"preset": "cpu"})
    assert "'tta' lacks" in plan_problem({"fields": {"tta": {"value": True}}})


@pytest.mark.slow
def test_a_checkpoint_trained_with_a_plan_segments_new_scans_with_it(anisotropic, tmp_path, monkeypatch):
    plan = plan_run("cpu", {"data": str(anisotropic.root), "run_dir": str(tmp_path / "run"),
                            "split_file": None})
    values = plan.values
    run = prepare_run(str(anisotropic.root), tmp_path / "run", image_size=values["image_size"], seed=0,
                      context=values["context_slices"], spacing=values["spacing"], roi=values["roi"],
                      progress=False, plan=plan.to_dict())
    cfg = TrainConfig(epochs=1, batch_size=8, augment=None, device="cpu", patience=values["patience"],
                      patience_minutes=values["patience_minutes"])
    workflow.train_locator(run, cfg, minutes=0.05, progress=False)
    workflow.train_model(run, "unet", workflow.model_config(run, "unet", encoder_depth=3,
                         decoder={"decoder_channels": [32, 16, 8]}), cfg, progress=False)
    checkpoint = run.run_dir / "unet" / "best.pt"
    state = read_checkpoint(checkpoint)
    assert state["version"] == 2 and state["plan"]["fields"]["image_size"]["value"] == 64
    predictor = Predictor.load(checkpoint)
    data = predictor.data
    assert (data["image_size"], data["context_slices"], data["slice_config"]["spacing"]) == \
        (values["image_size"], values["context_slices"], values["spacing"])  # the plan's settings
    assert predictor.locator is not None and predictor.tta is True and "cpu plan of TaskAniso" in predictor.describe()
    seen = []
    real = predict_mod.segment_image
    monkeypatch.setattr(predict_mod, "segment_image", lambda *a, **k: seen.append(k["tta"]) or real(*a, **k))
    scan = tmp_path / "new" / "scan.nii.gz"
    scan.parent.mkdir()
    source = nib.load(anisotropic.cases[0].image)
    nib.save(nib.Nifti1Image(np.asarray(source.dataobj), source.affine), scan)
    table = predict(checkpoint, scan, tmp_path / "out", progress=False)
    assert table.loc["scan", "error"] == "" and seen == [True]  # flip TTA, as the plan chose
    predict(checkpoint, scan, tmp_path / "out2", tta=False, progress=False)
    assert seen == [True, False]  # an explicit choice wins
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state["plan"] = {"fields": {"tta": "on"}}
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"bad\.pt: malformed checkpoint, its plan field 'tta' lacks"):
        Predictor.load(tmp_path / "bad.pt")


def test_the_plan_table_tool_prints_one_row_per_dataset(ct, tmp_path, capsys):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from plan_table import main

    assert main([str(ct.root), str(xray_folder(tmp_path / "xray")), "--preset", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| dataset | median size px |") and len(lines) == 4
    assert lines[2].startswith("| TaskCT | 48x48x6 | 1.5x1.5x3 |") and lines[2].endswith("| ct_window |")
    assert lines[3].startswith("| xray | 295x270 | – |") and "| 256 px | – | no | 0 | 16 |" in lines[3]
