"""Tests for the embedded demo dataset (lib/data/demo.py)."""

from __future__ import annotations

import json
import tarfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lib.data import demo
from lib.data.demo import DEMO_TASK_NAME, make_demo_task

SMALL = {"n_patients": 2, "shape": (48, 48, 24)}


@pytest.fixture(scope="module")
def default_demo(tmp_path_factory) -> tuple[Path, Path, float]:
    """The default demo (12 cases, 96x96x40, packed), with its generation time."""
    dest = tmp_path_factory.mktemp("demo")
    start = time.perf_counter()
    tar_path = make_demo_task(dest)
    return dest, tar_path, time.perf_counter() - start


def _load(task: Path, rel: str) -> nib.Nifti1Image:
    return nib.load(task / rel)


def _cases(task: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    meta = json.loads((task / "dataset.json").read_text())
    return [
        (np.asarray(_load(task, c["image"]).dataobj), np.asarray(_load(task, c["label"]).dataobj))
        for c in meta["training"]
    ]


def _mtimes(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*")}


def test_layout_and_dataset_json(default_demo):
    dest, tar_path, _ = default_demo
    task = dest / DEMO_TASK_NAME
    assert tar_path == dest / f"{DEMO_TASK_NAME}.tar"
    assert sorted(p.name for p in dest.iterdir()) == [DEMO_TASK_NAME, f"{DEMO_TASK_NAME}.tar"]
    assert sorted(p.name for p in task.iterdir()) == ["dataset.json", "imagesTr", "labelsTr"]
    meta = json.loads((task / "dataset.json").read_text())
    assert meta["tensorImageSize"] == "3D"
    assert meta["modality"] == {"0": "MRI"}
    assert meta["labels"] == {"0": "background", "1": "left atrium"}
    assert meta["numTraining"] == len(meta["training"]) == 12
    assert meta["numTest"] == 0 and meta["test"] == []
    for key in ("name", "description", "reference", "licence"):
        assert isinstance(meta[key], str) and meta[key]
    assert meta["training"][0] == {
        "image": "./imagesTr/la_demo_000.nii.gz",
        "label": "./labelsTr/la_demo_000.nii.gz",
    }
    for case in meta["training"]:
        assert (task / case["image"]).is_file() and (task / case["label"]).is_file()
    assert (
        len(list((task / "imagesTr").iterdir())) == len(list((task / "labelsTr").iterdir())) == 12
    )


def test_nifti_headers_and_dtypes(default_demo):
    task = default_demo[0] / DEMO_TASK_NAME
    meta = json.loads((task / "dataset.json").read_text())
    spacings = set()
    for case in meta["training"]:
        image, label = _load(task, case["image"]), _load(task, case["label"])
        assert image.shape == label.shape == (96, 96, 40)
        assert image.get_data_dtype() == np.int16 and label.get_data_dtype() == np.uint8
        img, lab = np.asarray(image.dataobj), np.asarray(label.dataobj)
        assert img.dtype == np.int16 and lab.dtype == np.uint8
        assert set(np.unique(lab)) == {0, 1}
        assert img.min() >= 0 and 500 < np.percentile(img, 99) < 3000
        np.testing.assert_allclose(image.affine, label.affine)
        zooms = image.header.get_zooms()
        np.testing.assert_allclose(zooms, np.diag(image.affine)[:3], rtol=1e-5)
        assert zooms[0] == zooms[1] and 1.15 < zooms[0] < 1.35 and 2.5 < zooms[2] < 2.9
        for get in (image.header.get_qform, image.header.get_sform):
            matrix, code = get(coded=True)
            assert code == 1
            np.testing.assert_allclose(matrix, image.affine, atol=1e-4)
        assert image.header.get_xyzt_units()[0] == "mm"
        spacings.add(zooms)
    assert len(spacings) > 1  # spacing varies slightly per patient


def test_foreground_is_plausible_and_not_intensity_separable(default_demo):
    task = default_demo[0] / DEMO_TASK_NAME
    for img, lab in _cases(task):
        fg = lab.astype(bool)
        assert 0.001 < fg.mean() < 0.03
        slices = np.flatnonzero(fg.any(axis=(0, 1)))
        assert 0.25 <= len(slices) / lab.shape[2] <= 0.7
        assert slices[0] >= 2 and slices[-1] <= lab.shape[2] - 3  # empty slices at both ends
        assert np.median(img[fg]) > 3 * np.median(img[img > 50])  # bright blood pool
        best_dice = max(
            2 * (fg & (img > t)).sum() / (fg.sum() + (img > t).sum())
            for t in np.percentile(img[fg], [2, 5, 10, 20, 35, 50])
        )
        assert best_dice < 0.7  # other bright structures: a threshold cannot segment it


def test_patients_differ(default_demo):
    cases = _cases(default_demo[0] / DEMO_TASK_NAME)
    volumes = [int(lab.sum()) for _, lab in cases]
    centroids = [tuple(np.argwhere(lab).mean(axis=0).round(1)) for _, lab in cases]
    assert len(set(volumes)) == len(cases) and len(set(centroids)) == len(cases)
    assert not np.array_equal(cases[0][0], cases[1][0])


def test_deterministic_by_seed(tmp_path):
    first = make_demo_task(tmp_path / "a", seed=3, pack=False, **SMALL)
    again = make_demo_task(tmp_path / "b", seed=3, pack=False, **SMALL)
    other = make_demo_task(tmp_path / "c", seed=4, pack=False, **SMALL)
    fewer = make_demo_task(tmp_path / "d", seed=3, pack=False, n_patients=1, shape=SMALL["shape"])
    for (i1, l1), (i2, l2) in zip(_cases(first), _cases(again)):
        assert np.array_equal(i1, i2) and np.array_equal(l1, l2)
    assert not np.array_equal(_cases(first)[0][0], _cases(other)[0][0])
    assert np.array_equal(_cases(first)[0][0], _cases(fewer)[0][0])  # one stream per case


def test_tar_members(default_demo):
    dest, tar_path, _ = default_demo
    cases = [f"la_demo_{i:03d}.nii.gz" for i in range(12)]
    expected = {
        DEMO_TASK_NAME,
        f"{DEMO_TASK_NAME}/dataset.json",
        f"{DEMO_TASK_NAME}/imagesTr",
        f"{DEMO_TASK_NAME}/labelsTr",
        *(f"{DEMO_TASK_NAME}/imagesTr/{c}" for c in cases),
        *(f"{DEMO_TASK_NAME}/labelsTr/{c}" for c in cases),
    }
    with tarfile.open(tar_path, "r:") as tar:  # plain, uncompressed tar
        assert set(tar.getnames()) == expected
        packed = tar.extractfile(f"{DEMO_TASK_NAME}/labelsTr/{cases[3]}").read()
    assert packed == (dest / DEMO_TASK_NAME / "labelsTr" / cases[3]).read_bytes()


def test_reuse_then_regenerate(tmp_path):
    tar_path = make_demo_task(tmp_path, seed=1, **SMALL)
    before = _mtimes(tmp_path)
    assert make_demo_task(tmp_path, seed=1, **SMALL) == tar_path
    assert _mtimes(tmp_path) == before  # nothing rewritten

    task = make_demo_task(tmp_path, seed=1, pack=False, **SMALL)
    assert task == tmp_path / DEMO_TASK_NAME and _mtimes(tmp_path) == before

    make_demo_task(tmp_path, seed=2, **SMALL)
    meta = json.loads((task / "dataset.json").read_text())
    assert meta["demo_params"]["seed"] == 2
    with tarfile.open(tar_path) as tar:
        packed = json.load(tar.extractfile(f"{DEMO_TASK_NAME}/dataset.json"))
    assert packed == meta
    assert tar_path.stat().st_mtime_ns != before[tar_path]
    assert sorted(p.name for p in tmp_path.iterdir()) == [DEMO_TASK_NAME, tar_path.name]


def test_missing_file_triggers_regeneration(tmp_path):
    task = make_demo_task(tmp_path, pack=False, **SMALL)
    (task / "labelsTr" / "la_demo_001.nii.gz").unlink()
    make_demo_task(tmp_path, pack=False, **SMALL)
    assert (task / "labelsTr" / "la_demo_001.nii.gz").is_file()


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_save_nifti", fail)
    with pytest.raises(KeyboardInterrupt):
        make_demo_task(tmp_path, **SMALL)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs", [{"n_patients": 0}, {"shape": (96, 96)}, {"shape": (8, 96, 40)}])
def test_invalid_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        make_demo_task(tmp_path, **kwargs)


def test_default_generation_is_fast(default_demo):
    assert default_demo[2] < 30  # a few seconds on 2 cores; generous bound against flakiness
