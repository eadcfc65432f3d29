"""2D image folders (PNG/JPG/TIFF + masks): reading, bad input, aspect-kept slices, 2D metrics,
and a whole run from folder to PNG predictions of new images."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lib.data.images2d import (
    from_volume_axes,
    read_image,
    read_image_folder,
    read_mask,
    to_volume_axes,
    write_mask,
)
from lib.data.run import prepare_run
from lib.data.slices import CaseMeta, SliceConfig, to_slices
from lib.data.source import resolve_task
from lib.data.task import MSDDataError
from lib.data.volumes import load_volume
from lib.seg import workflow
from lib.seg.inference import probs_to_volume
from lib.seg.metrics import score_case
from lib.seg.predict import predict
from lib.seg.train import TrainConfig


def disc_image(h: int, w: int, rng: np.random.Generator, colour: bool = False) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:h, :w]
    cy, cx, r = h * rng.uniform(0.35, 0.65), w * rng.uniform(0.35, 0.65), min(h, w) * rng.uniform(0.15, 0.3)
    mask = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r**2).astype(np.uint8)
    image = np.clip(rng.normal(60, 15, (h, w)) + 120 * mask, 0, 255).astype(np.uint8)
    return (np.stack([image, image // 2, image // 3], -1) if colour else image), mask


def make_folder(root, n=6, seed=0, mask_scale=255, colour_first=False):
    """An image folder of ``n`` grey PNGs of varying size with disc masks (0/255)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        image, mask = disc_image(40 + 4 * i, 56 - 3 * i, rng, colour=colour_first and i == 0)
        Image.fromarray(image).save(root / "images" / f"img{i}.png")
        Image.fromarray(mask * mask_scale).save(root / "masks" / f"img{i}.png")
    return root


def test_a_folder_is_a_task_of_one_slice_patients_in_volume_axes(tmp_path):
    root = make_folder(tmp_path / "xray", mask_scale=1)
    task = resolve_task(str(root))
    assert task.is_2d and task.channels == 1 and task.labels == {0: "background", 1: "foreground"}
    assert [c.case_id for c in task.cases] == [f"img{i}" for i in range(6)]
    volume = load_volume(task, task.cases[1])
    pixels = np.asarray(Image.open(root / "images" / "img1.png"))
    assert volume.image.shape == (1, pixels.shape[1], pixels.shape[0], 1) and volume.label.max() == 1
    assert np.array_equal(from_volume_axes(volume.image[0, ..., 0]), pixels)  # x: column, y: upwards
    assert np.array_equal(volume.image[0, 0, -1, 0], pixels[0, 0])  # top-left pixel is at x=0, y=max


def test_colour_folders_have_three_channels_and_grey_images_are_repeated(tmp_path):
    task = read_image_folder(make_folder(tmp_path / "rgb", colour_first=True))
    assert task.channels == 3
    grey = load_volume(task, task.cases[1]).image
    assert grey.shape[0] == 3 and np.array_equal(grey[0], grey[2])


def test_masks_round_trip_through_png_as_binary_or_class_indices(tmp_path):
    mask = to_volume_axes(np.array([[0, 1, 1], [0, 0, 1]], np.uint8))
    write_mask(mask, tmp_path / "b.png", num_classes=2)
    assert set(np.unique(np.asarray(Image.open(tmp_path / "b.png")))) == {0, 255}
    assert np.array_equal(read_mask(tmp_path / "b.png")[..., 0], mask)
    multi = to_volume_axes(np.array([[0, 2, 1], [3, 0, 1]], np.uint8))
    write_mask(multi, tmp_path / "m.png", num_classes=4)
    assert np.array_equal(read_mask(tmp_path / "m.png")[..., 0], multi)


@pytest.mark.parametrize("damage,message", [
    (lambda r: (r / "masks" / "img2.png").unlink(), r"img2.png: image without a mask"),
    (lambda r: Image.fromarray(np.zeros((9, 9), np.uint8)).save(r / "masks" / "img3.png"),
     r"masks/img3.png: mask size 9x9 differs from its image's"),
    (lambda r: Image.fromarray(np.full((44, 53), 128, np.uint8)).save(r / "masks" / "img1.png"),
     r"masks/img1.png: mask values \[128\] are neither binary"),
    (lambda r: (r / "images" / "img4.png").write_bytes(b"not a png"), r"images/img4.png: cannot read image"),
])
def test_bad_folders_name_the_file_and_the_problem(tmp_path, damage, message):
    root = make_folder(tmp_path / "bad")
    damage(root)
    with pytest.raises(MSDDataError, match=message):
        read_image_folder(root)


@pytest.mark.parametrize("folder", ["images", "masks"])
def test_two_files_with_one_stem_are_refused_naming_both(tmp_path, folder):
    root = make_folder(tmp_path / "dup")
    Image.open(root / folder / "img1.png").save(root / folder / "img1.tif")
    with pytest.raises(MSDDataError, match=rf"{folder}/img1\.tif and .*{folder}/img1\.png share "
                                           r"the name 'img1'"):
        read_image_folder(root)


@pytest.mark.parametrize("meta,message", [
    ({"modality": ["grey"]}, r"'modality' must be an object of channel id -> name"),
    ({"labels": {"0": "background", "one": "lung"}}, r"'labels' key 'one' is not an integer class id"),
    ([], r"dataset\.json must be a JSON object, got list"),
])
def test_malformed_dataset_json_fields_of_an_image_folder_are_named(tmp_path, meta, message):
    root = make_folder(tmp_path / "meta")
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(MSDDataError, match=r"meta/dataset\.json: " + message):
        read_image_folder(root)


def test_an_empty_image_folder_is_refused(tmp_path):
    (tmp_path / "e" / "images").mkdir(parents=True)
    (tmp_path / "e" / "masks").mkdir()
    with pytest.raises(MSDDataError, match="no images"):
        resolve_task(str(tmp_path / "e"))


def test_fit_keeps_the_aspect_ratio_and_probabilities_go_back_to_the_image_size():
    cfg = SliceConfig(image_size=32, fit=True)
    image = np.zeros((1, 60, 30, 1), np.float32)
    image[0, 10:20, 5:10] = 1.0
    label = (image[0] > 0).astype(np.uint8)
    slices, masks, resized = to_slices(image, label, (1.0, 1.0, 1.0), cfg)
    assert resized == (32, 16) and slices.shape == (1, 1, 32, 32) and masks[0, :, :8].sum() == 0  # padded
    probs = torch.stack([1 - torch.from_numpy(masks).float(), torch.from_numpy(masks).float()], 1)
    back = probs_to_volume(probs, CaseMeta("a", (60, 30, 1), (1, 1, 1), np.eye(4), "", "", resized=resized))
    assert back.shape == (60, 30, 1) and (back == label).mean() > 0.97


def test_a_single_slice_is_scored_as_an_image_in_pixels():
    truth = np.zeros((20, 20, 1), np.uint8)
    truth[5:15, 5:15] = 1
    pred = np.roll(truth, 2, axis=0)
    scores = score_case(pred, truth, (1.0, 1.0, 1.0), [1])
    assert scores["hd95"] == pytest.approx(2.0) and scores["true_area"] == 100 and "true_volume_ml" not in scores
    assert scores["pixel_accuracy"] == pytest.approx(1 - 40 / 400)


def test_a_run_on_an_image_folder_predicts_new_images_at_their_own_size(tmp_path):
    root = make_folder(tmp_path / "xray", n=8)
    run = prepare_run(str(root), tmp_path / "run", image_size=32, seed=0, context=1, spacing="median", roi=True,
                      progress=False)
    assert run.context == 0 and run.slice_cfg.fit and not run.slice_cfg.roi and run.piece_thresholds == {1: 0.5}
    cfg = TrainConfig(epochs=1, batch_size=4, augment=None, device="cpu", patience=None)
    workflow.train_model(run, "unet", workflow.model_config(run, "unet", encoder_depth=3,
                         decoder={"decoder_channels": [32, 16, 8]}), cfg, progress=False)
    model, meta = workflow.reload_model(run, "unet")
    metrics = workflow.test_model(run, "unet", model, meta)
    case = run.split["test"][0]
    for key in ("dice", "iou", "hd95", "pixel_accuracy", "cross_entropy", "pred_area"):
        assert np.isfinite(metrics["cases"][case][key]) or key == "hd95"
    evaluated = run.run_dir / "unet" / "predictions" / f"{case}.png"
    size = Image.open(root / "images" / f"{case}.png").size
    assert Image.open(evaluated).size == size
    _, gif, _ = workflow.show_patient(run, "unet", model, tta=True)  # post-processed per image
    assert gif.is_file()

    new = tmp_path / "new"
    new.mkdir()
    for cid in run.split["test"]:
        (new / f"{cid}.png").write_bytes((root / "images" / f"{cid}.png").read_bytes())
    (new / "broken.png").write_bytes(b"garbage")
    table = predict(run.run_dir / "unet" / "best.pt", new, tmp_path / "out", progress=False)
    assert "cannot read image" in table.loc["broken", "error"]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / f"{case}.png")), np.asarray(Image.open(evaluated)))
    assert "foreground area_px" in table.columns
    with pytest.raises(FileExistsError, match="already holds"):
        predict(run.run_dir / "unet" / "best.pt", new, tmp_path / "out", progress=False)
    again = predict(run.run_dir / "unet" / "best.pt", new / f"{case}.png", tmp_path / "out", overwrite=True,
                    progress=False)
    assert again.loc[case, "error"] == ""


@pytest.mark.parametrize("suffix", [".jpg", ".tif"])
def test_jpg_and_tiff_images_are_read_with_png_masks(tmp_path, suffix):
    root = make_folder(tmp_path / "f", n=3)
    for path in sorted((root / "images").glob("*.png")):
        Image.open(path).save(path.with_suffix(suffix))
        path.unlink()
    task = read_image_folder(root)
    assert [c.image.suffix for c in task.cases] == [suffix] * 3
    image = read_image(task.cases[0].image)
    assert image.shape == (1, 56, 40, 1) and image.max() > 100
