import gzip
import json

import nibabel as nib
import numpy as np
import pytest

from lib.msd import MSDDataError, load_volume, read_task
from tests.helpers import blob_case, make_task, write_task


def test_read_and_load(tmp_path):
    task = read_task(make_task(tmp_path, 3))
    assert [c.case_id for c in task.cases] == ["p00", "p01", "p02"]
    assert task.channels == 1 and task.num_classes == 2 and not task.is_ct
    vol = load_volume(task, task.cases[0])
    assert vol.image.shape == (1, 32, 32, 12) and vol.image.dtype == np.float32
    assert vol.label.shape == (32, 32, 12) and vol.label.dtype == np.uint8
    assert vol.spacing == pytest.approx((1.5, 1.5, 3.0))
    assert vol.affine[2, 2] == pytest.approx(3.0)


def test_multimodal_4d_and_multiclass(tmp_path):
    rng = np.random.default_rng(0)
    image, label = blob_case(rng, classes=3)
    four_d = np.stack([image, image // 2], axis=-1)
    root = write_task(tmp_path, {"a": (four_d, label)}, labels={"0": "bg", "1": "x", "2": "y"},
                      modality={"0": "T2", "1": "ADC"})
    task = read_task(root)
    vol = load_volume(task, task.cases[0])
    assert vol.image.shape == (2, 32, 32, 12)
    assert set(np.unique(vol.label)) == {0, 1, 2} and task.num_classes == 3


def test_missing_dataset_json(tmp_path):
    with pytest.raises(MSDDataError, match="dataset.json"):
        read_task(tmp_path)


def test_missing_label(tmp_path):
    root = make_task(tmp_path, 2)
    (root / "labelsTr" / "p01.nii.gz").unlink()
    with pytest.raises(MSDDataError, match="p01.nii.gz"):
        read_task(root)


def test_empty_task(tmp_path):
    write_task(tmp_path, {})
    with pytest.raises(MSDDataError, match="no training cases"):
        read_task(tmp_path)


def test_shape_mismatch(tmp_path):
    image, label = blob_case(np.random.default_rng(0))
    task = read_task(write_task(tmp_path, {"a": (image, label[:, :, :10])}))
    with pytest.raises(MSDDataError, match=r"a\.nii\.gz.*differs"):
        load_volume(task, task.cases[0])


def test_undeclared_label_values(tmp_path):
    image, label = blob_case(np.random.default_rng(0))
    label[0, 0, 0] = 7
    task = read_task(write_task(tmp_path, {"a": (image, label)}))
    with pytest.raises(MSDDataError, match=r"labelsTr/a\.nii\.gz: label values \[7\]"):
        load_volume(task, task.cases[0])


def test_corrupt_and_truncated_nifti(tmp_path):
    root = make_task(tmp_path, 2)
    path = root / "imagesTr" / "p00.nii.gz"
    path.write_bytes(path.read_bytes()[:200])
    (root / "imagesTr" / "p01.nii.gz").write_bytes(gzip.compress(b"not a nifti at all" * 10))
    task = read_task(root)
    for case in task.cases:
        with pytest.raises(MSDDataError, match=case.image.name):
            load_volume(task, case)


def test_channel_count_must_match(tmp_path):
    root = make_task(tmp_path, 1)
    meta = json.loads((root / "dataset.json").read_text())
    meta["modality"] = {"0": "T2", "1": "ADC"}
    (root / "dataset.json").write_text(json.dumps(meta))
    task = read_task(root)
    with pytest.raises(MSDDataError, match="channels"):
        load_volume(task, task.cases[0])


def test_nifti_affine_kept(tmp_path):
    root = make_task(tmp_path, 1)
    task = read_task(root)
    vol = load_volume(task, task.cases[0])
    assert np.allclose(vol.affine, nib.load(task.cases[0].label).affine)
