import gzip
import json

import nibabel as nib
import numpy as np
import pytest

from lib.data.task import MSDDataError, read_task
from lib.data.volumes import load_volume
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


def relabel(root, affine, case="a"):
    """Save ``case``'s label again with another affine (same voxels)."""
    path = root / "labelsTr" / f"{case}.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(nib.load(path).dataobj), affine), path)


def flipped_x(affine):
    flip = affine.copy()
    flip[0, 0], flip[0, 3] = -affine[0, 0], affine[0, 0] * 31  # same extent, mirrored voxel order
    return flip


def shifted(affine):
    return affine + np.pad([[50.0], [0.0], [0.0]], ((0, 1), (3, 0)))


def scaled(affine):
    return affine @ np.diag([3.0, 3.0, 3.0, 1.0])


@pytest.mark.parametrize("change,what", [(flipped_x, "direction"), (shifted, "origin"),
                                         (scaled, "spacing")])
def test_label_on_another_voxel_grid_than_its_image_is_refused(tmp_path, change, what):
    root = write_task(tmp_path, {"a": blob_case(np.random.default_rng(0))})
    relabel(root, change(nib.load(root / "imagesTr" / "a.nii.gz").affine))
    task = read_task(root)
    with pytest.raises(MSDDataError, match=rf"labelsTr/a\.nii\.gz: label {what} .* differs from "
                                           rf"image {what} .* of .*imagesTr/a\.nii\.gz"):
        load_volume(task, task.cases[0])


def test_float_noise_in_the_label_affine_is_accepted(tmp_path):
    root = write_task(tmp_path, {"a": blob_case(np.random.default_rng(0))})
    affine = nib.load(root / "imagesTr" / "a.nii.gz").affine
    relabel(root, affine + 1e-6 * np.random.default_rng(1).standard_normal((4, 4)) * [1, 1, 1, 0])
    task = read_task(root)
    vol = load_volume(task, task.cases[0])
    assert np.array_equal(vol.label, np.asarray(nib.load(root / "labelsTr" / "a.nii.gz").dataobj))


def edit_meta(root, change):
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps(change(meta)))


def second_file_for_a(root):
    image = nib.load(root / "imagesTr" / "a.nii.gz")
    nib.save(image, root / "imagesTr" / "a.nii")
    return "./imagesTr/a.nii"


@pytest.mark.parametrize("second,message", [
    (second_file_for_a, r"case id 'a' of .*imagesTr/a\.nii is also the id of .*imagesTr/a\.nii\.gz"),
    (lambda root: "./imagesTr/a.nii.gz", r"case id 'a' of .*imagesTr/a\.nii\.gz is also the id of"),
])
def test_two_training_entries_with_one_case_id_are_refused_naming_both(tmp_path, second, message):
    root = write_task(tmp_path, {"a": blob_case(np.random.default_rng(0))})
    entry = {"image": second(root), "label": "./labelsTr/a.nii.gz"}
    edit_meta(root, lambda m: m | {"training": [*m["training"], entry]})
    with pytest.raises(MSDDataError, match=message):
        read_task(root)


@pytest.mark.parametrize("path", ["../outside/a.nii.gz", "./imagesTr/../../outside/a.nii.gz",
                                  "{outside}/a.nii.gz"])
@pytest.mark.parametrize("key", ["image", "label"])
def test_training_paths_outside_the_task_folder_are_refused(tmp_path, path, key):
    root = write_task(tmp_path / "task", {"a": blob_case(np.random.default_rng(0))})
    (tmp_path / "outside").mkdir()
    (root / f"{key}sTr" / "a.nii.gz").rename(tmp_path / "outside" / "a.nii.gz")  # it exists there
    path = path.format(outside=tmp_path / "outside")
    edit_meta(root, lambda m: m | {"training": [{**m["training"][0], key: path}]})
    with pytest.raises(MSDDataError, match=rf"dataset\.json: 'training' entry 0 '{key}' "
                                           rf"'{path}' points outside the task folder"):
        read_task(root)


def test_a_symlinked_task_folder_still_reads(tmp_path):
    root = make_task(tmp_path / "real", 2)
    (tmp_path / "link").symlink_to(root, target_is_directory=True)
    task = read_task(tmp_path / "link")
    assert [c.case_id for c in task.cases] == ["p00", "p01"]
    assert load_volume(task, task.cases[1]).label.shape == (32, 32, 12)



def test_symlinked_files_inside_the_task_folder_still_read(tmp_path):
    root = make_task(tmp_path / "task", 1)
    store = tmp_path / "store"
    store.mkdir()
    scan = root / "imagesTr" / "p00.nii.gz"
    scan.rename(store / "p00.nii.gz")
    scan.symlink_to(store / "p00.nii.gz")  # a task built with `ln -s` from a shared store
    task = read_task(root)
    assert load_volume(task, task.cases[0]).image.shape == (1, 32, 32, 12)

@pytest.mark.parametrize("change,message", [
    (lambda m: [m], r"dataset\.json must be a JSON object, got list"),
    (lambda m: m | {"modality": ["MRI"]}, r"'modality' must be an object of channel id -> name"),
    (lambda m: m | {"labels": ["background", "a"]}, r"'labels' must be an object of class id"),
    (lambda m: m | {"labels": {"0": "background", "one": "a"}},
     r"'labels' key 'one' is not an integer class id"),
    (lambda m: m | {"labels": {"0": "background", "1": ["a"]}},
     r"'labels' entry '1' must be a name \(string\), got list"),
    (lambda m: m | {"labels": {"0": "background", "2": "a"}}, r"'labels' must number its class ids"),
    (lambda m: m | {"modality": {}}, r"'modality' declares no channel"),
    (lambda m: m | {"training": "./imagesTr"}, r"'training' must be a list"),
    (lambda m: m | {"training": ["./imagesTr/p00.nii.gz"]},
     r"'training' entry 0 must be an object with 'image' and 'label'"),
    (lambda m: m | {"training": [{"image": "./imagesTr/p00.nii.gz"}]}, r"'training' entry 0 has no 'label'"),
    (lambda m: m | {"training": [{"label": "./labelsTr/p00.nii.gz"}]}, r"'training' entry 0 has no 'image'"),
    (lambda m: m | {"training": [{"image": 3, "label": "./labelsTr/p00.nii.gz"}]},
     r"'training' entry 0 'image' must be a path string, got 3"),
])
def test_malformed_dataset_json_fields_are_named(tmp_path, change, message):
    root = make_task(tmp_path, 1)
    edit_meta(root, change)
    with pytest.raises(MSDDataError, match=r"dataset\.json: " + message):
        read_task(root)


def test_dataset_json_that_is_not_json_is_an_msd_error(tmp_path):
    root = make_task(tmp_path, 1)
    (root / "dataset.json").write_text("{'name': 1,}")
    with pytest.raises(MSDDataError, match=r"dataset\.json: not valid JSON"):
        read_task(root)
