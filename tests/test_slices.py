import json
import os

import numpy as np
import pytest

from lib.data.slices import (
    SliceConfig,
    build_cache,
    cache_dir_for,
    concat,
    load_slices,
    normalise_volume,
    to_slices,
    with_context,
)
from lib.data.task import MSDDataError, read_task
from tests.helpers import make_task


@pytest.fixture
def task(tmp_path):
    return read_task(make_task(tmp_path / "task", 4))


def test_normalise_mri_zscore_and_ct_window():
    rng = np.random.default_rng(0)
    mri = rng.normal(500, 100, (1, 8, 8, 4)).astype(np.float32)
    out = normalise_volume(mri, False, SliceConfig())
    assert abs(out.mean()) < 1e-4 and abs(out.std() - 1) < 1e-3
    ct = np.array([-2000, -160, 40, 240, 3000], dtype=np.float32).reshape(1, 5, 1, 1)
    out = normalise_volume(ct, True, SliceConfig(ct_window=(-160, 240)))
    assert out.ravel().tolist() == pytest.approx([-1, -1, 0, 1, 1])


def test_resize_keeps_labels_and_shapes():
    image = np.random.default_rng(0).normal(size=(2, 40, 30, 5)).astype(np.float32)
    label = np.zeros((40, 30, 5), np.uint8)
    label[10:30, 5:25, 2] = 2
    imgs, masks, resized = to_slices(image, label, (1.0, 1.0, 1.0), SliceConfig(image_size=16))
    assert resized == (16, 16)
    assert imgs.shape == (5, 2, 16, 16) and imgs.dtype == np.float16
    assert masks.shape == (5, 16, 16) and masks.dtype == np.uint8
    assert set(np.unique(masks)) == {0, 2} and masks[2].any() and not masks[0].any()


def test_spacing_resamples_in_millimetres_onto_a_centred_canvas():
    image = np.zeros((1, 40, 20, 3), np.float32)
    label = np.zeros((40, 20, 3), np.uint8)
    label[10:30, 5:15] = 1  # 20 x 10 pixels of 2 x 1 mm: 40 x 10 mm
    cfg = SliceConfig(image_size=16, spacing=2.0, canvas=48)
    imgs, masks, resized = to_slices(image - 1, label, (2.0, 1.0, 3.0), cfg)
    assert resized == (40, 10) and imgs.shape == (3, 1, 48, 48)
    rows, cols = np.nonzero(masks[0])
    assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == (20, 5)  # 40 x 10 mm at 2 mm
    assert imgs[0, 0, 0, 0] == -1  # outside the scan: the volume's minimum


def test_spacing_that_would_blow_up_memory_is_refused_before_loading(task, tmp_path):
    from lib.data.slices import check_resampling
    from lib.data.task import MSDDataError

    cfg = SliceConfig(image_size=16, spacing=0.05)
    with pytest.raises(MSDDataError, match=r"img\.nii\.gz: resampling 512x512 .* choose a coarser spacing"):
        check_resampling("img.nii.gz", (512, 512, 200), (1.0, 1.0, 1.0), 1, cfg)
    assert check_resampling("img.nii.gz", (512, 512, 200), (1.0, 1.0, 1.0), 1, SliceConfig(spacing=2.0)) == (256, 256)
    with pytest.raises(ValueError, match="roi=True needs a target spacing"):
        SliceConfig(roi=True)


def test_cache_roundtrip_and_reuse(task, tmp_path):
    cfg = SliceConfig(image_size=16)
    out = build_cache(task, tmp_path / "cache", cfg, workers=1, progress=False)
    assert sorted(p.name for p in out.glob("*.npz")) == [f"p0{i}.npz" for i in range(4)]
    inodes = {p: p.stat().st_ino for p in out.glob("*.npz")}
    build_cache(task, tmp_path / "cache", cfg, workers=1, progress=False)
    assert {p: p.stat().st_ino for p in out.glob("*.npz")} == inodes  # reused, not rewritten
    s = load_slices(out, ["p01", "p03"])
    assert s.images.shape == (24, 1, 16, 16) and s.masks.shape == (24, 16, 16)
    assert s.case_ids.tolist() == ["p01"] * 12 + ["p03"] * 12
    assert s.slice_index.tolist() == list(range(12)) * 2
    assert s.cases["p01"].shape == (32, 32, 12) and s.cases["p01"].spacing == pytest.approx((1.5, 1.5, 3.0))
    assert len(s.patient("p03")) == 12


def test_other_settings_never_reuse_cache(task, tmp_path):
    a = build_cache(task, tmp_path, SliceConfig(image_size=16), workers=1, progress=False)
    b = build_cache(task, tmp_path, SliceConfig(image_size=16, clip_percentiles=(1, 99)), workers=1, progress=False)
    assert a != b and a == cache_dir_for(tmp_path, task, SliceConfig(image_size=16))


def test_changed_source_file_rebuilds(task, tmp_path):
    cfg = SliceConfig(image_size=16)
    out = build_cache(task, tmp_path, cfg, workers=1, progress=False)
    before = {p.name: p.stat().st_ino for p in out.glob("*.npz")}
    os.utime(task.cases[0].image, ns=(1, 1))
    build_cache(task, tmp_path, cfg, workers=1, progress=False)
    after = {p.name: p.stat().st_ino for p in out.glob("*.npz")}
    assert after["p00.npz"] != before["p00.npz"]  # rewritten (atomic replace: new inode)
    assert after["p01.npz"] == before["p01.npz"]  # others untouched


def test_parallel_conversion_matches_serial(task, tmp_path):
    a = build_cache(task, tmp_path / "a", SliceConfig(image_size=16), workers=1, progress=False)
    b = build_cache(task, tmp_path / "b", SliceConfig(image_size=16), workers=2, progress=False)
    sa, sb = load_slices(a, ["p00", "p02"]), load_slices(b, ["p00", "p02"])
    assert np.array_equal(sa.images, sb.images) and np.array_equal(sa.masks, sb.masks)


def test_failed_conversion_leaves_no_partial_file(task, tmp_path):
    task.cases[2].image.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(MSDDataError, match="p02.nii.gz"):
        build_cache(task, tmp_path, SliceConfig(image_size=16), workers=1, progress=False)
    out = cache_dir_for(tmp_path, task, SliceConfig(image_size=16))
    assert not (out / "p02.npz").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_missing_cache_entry_is_clear(tmp_path):
    with pytest.raises(MSDDataError, match="nobody"):
        load_slices(tmp_path, ["nobody"])


def test_stats_stored(task, tmp_path):
    out = build_cache(task, tmp_path, SliceConfig(image_size=16), workers=1, progress=False)
    stats = load_slices(out, ["p00"]).cases["p00"].stats
    assert 0 < stats["foreground_fraction"] < 1
    assert sum(stats["norm_hist"]) > 0.9 * 32 * 32 * 12
    assert json.dumps(stats)


def test_context_slices_stack_neighbours_within_each_patient(task, tmp_path):
    cache = build_cache(task, tmp_path, SliceConfig(image_size=32), workers=1, progress=False)
    plain = load_slices(cache, ["p00", "p01"])
    ctx = with_context(plain, 1)
    assert ctx.images.shape == (len(plain), 3, 32, 32) and ctx.context == 1
    np.testing.assert_array_equal(ctx.centre_images(), plain.images)
    first, last = np.flatnonzero(plain.case_ids == "p01")[[0, -1]]
    np.testing.assert_array_equal(ctx.images[first, 0], plain.images[first, 0])  # edge slice repeats, no p00 slice
    np.testing.assert_array_equal(ctx.images[first, 2], plain.images[first + 1, 0])
    np.testing.assert_array_equal(ctx.images[last, 0], plain.images[last - 1, 0])
    np.testing.assert_array_equal(ctx.images[last, 2], plain.images[last, 0])
    shuffled = with_context(plain.subset(np.random.default_rng(0).permutation(len(plain))), 1)
    row = int(np.flatnonzero((shuffled.case_ids == "p01") & (shuffled.slice_index == 3))[0])
    np.testing.assert_array_equal(shuffled.images[row], ctx.images[first + 3])  # order-independent
    assert with_context(ctx, 1) is ctx and with_context(plain, 0) is plain
    with pytest.raises(ValueError, match="all of its slices"):
        with_context(plain.subset(np.arange(0, len(plain), 2)), 1)
    with pytest.raises(ValueError, match="different context"):
        concat(plain, ctx)


@pytest.mark.parametrize("share", [1, 0.01])
def test_non_finite_voxels_are_refused_by_name_and_count_and_never_reach_the_cache(tmp_path, share):
    rng = np.random.default_rng(0)
    from tests.helpers import blob_case, write_task

    image, label = blob_case(rng)
    bad = image.astype(np.float32)
    flat = bad.reshape(-1)
    n_bad = 1 if share == 1 else int(share * flat.size)
    flat[rng.choice(flat.size, n_bad, replace=False)] = np.nan
    root = write_task(tmp_path / "t", {"good": blob_case(rng), "bad": (bad, label)})
    task = read_task(root)
    with pytest.raises(MSDDataError, match=rf"bad\.nii\.gz: {n_bad} of {flat.size} voxels are NaN or infinite"):
        build_cache(task, tmp_path / "cache", SliceConfig(image_size=16), workers=1, progress=False)
    cache = cache_dir_for(tmp_path / "cache", task, SliceConfig(image_size=16))
    assert not (cache / "bad.npz").exists()
    for npz in cache.glob("*.npz"):
        with np.load(npz) as z:
            assert np.isfinite(z["images"]).all()
