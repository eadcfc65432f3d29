"""Tests of the statistical shape model (lib/synth/shapes.py)."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from lib.synth.shapes import (
    ShapeModel,
    ShapeModelConfig,
    fit_shape_model,
    nearest_dice,
    shape_statistics,
)
from tests.helpers import make_discs

SIZE = 48


def make_halves(n: int, size: int, seed: int = 0) -> np.ndarray:
    """3-class masks (n, size, size): tilted ellipses whose left half is class 1 and right
    half class 2 (like hippocampus head and body); every 4th slice empty, every 5th shows
    only class 1 (a tip of the structure)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(float)
    masks = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        if i % 4 == 0:
            continue
        cy, cx = rng.uniform(size * 0.35, size * 0.65, 2)
        a, b = rng.uniform(size * 0.12, size * 0.2), rng.uniform(size * 0.06, size * 0.1)
        t = rng.uniform(-0.4, 0.4)
        u = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)
        v = -(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)
        inside = (u / a) ** 2 + (v / b) ** 2 <= 1
        if i % 5 == 0:
            inside &= u < 0
        masks[i][inside] = 1
        masks[i][inside & (u > 0)] = 2
    return masks


@pytest.fixture(scope="module")
def discs() -> np.ndarray:
    return make_discs(180, SIZE, seed=0)[1]


@pytest.fixture(scope="module")
def disc_model(discs) -> ShapeModel:
    return ShapeModel.fit(discs, 2)


@pytest.fixture(scope="module")
def disc_samples(disc_model) -> np.ndarray:
    return disc_model.sample(300, seed=1)


@pytest.fixture(scope="module")
def halves() -> np.ndarray:
    return make_halves(160, SIZE, seed=0)


@pytest.fixture(scope="module")
def halves_model(halves) -> ShapeModel:
    return fit_shape_model(halves, 3, ShapeModelConfig())


# ----------------------------------------------------------------------------- config


def test_config_round_trip_and_validation():
    cfg = ShapeModelConfig(variance_kept=0.98, band=15, downsample=1, temperature=0.8, seed=3)
    assert ShapeModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        ShapeModelConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    for bad in ({"variance_kept": 0}, {"variance_kept": 1.5}, {"band": 0}, {"downsample": 0},
                {"downsample": 1.5}, {"temperature": -1}, {"truncate": 0}, {"area_slack": -0.1},
                {"max_rounds": 0}, {"max_modes": -1}):
        with pytest.raises(ValueError):
            ShapeModelConfig(**bad)


# ----------------------------------------------------------------------------- binary


def test_binary_fit(disc_model, discs):
    assert disc_model.num_classes == 2 and disc_model.shape == (SIZE, SIZE)
    assert 1 <= disc_model.n_modes <= 20
    assert disc_model.explained.sum() >= disc_model.cfg.variance_kept - 1e-6
    assert disc_model.empty_share == pytest.approx(1 / 3)
    assert disc_model.n_train == len(discs)
    assert abs(float(disc_model.levels[0])) < 3  # calibration only nudges the 0 level


def test_binary_samples_shape_dtype_classes(disc_samples):
    assert disc_samples.shape == (300, SIZE, SIZE) and disc_samples.dtype == np.uint8
    assert set(np.unique(disc_samples)) == {0, 1}


def test_binary_samples_new_and_plausible(disc_samples, discs):
    stats = shape_statistics(disc_samples, discs)
    # new shapes, not copies, yet close to real ones (real-to-real leave-one-out ~0.75)
    assert 0.3 < stats["novelty_median"] < 0.9
    assert stats["copies_share"] < 0.2
    assert stats["novelty_median"] < stats["reference_novelty_median"] + 0.1
    c = stats["classes"][1]
    assert c["samples"]["components_one_share"] == 1.0 and c["reference"]["components_one_share"] == 1.0
    assert c["within_range"]["all"] and stats["within_range"]
    ratio = c["samples"]["area_median"] / c["reference"]["area_median"]
    assert 0.85 < ratio < 1.15


def test_empty_share_reproduced(disc_model):
    for n in (300, 601):
        s = disc_model.sample(n, seed=5)
        empty = ~s.reshape(n, -1).any(axis=1)
        assert abs(empty.mean() - 1 / 3) <= 1.01 / n  # stochastic rounding of n / 3
    s = disc_model.sample(100, seed=5, include_empty=False)
    assert s.reshape(100, -1).any(axis=1).all()
    assert disc_model.sample(0).shape == (0, SIZE, SIZE)


def test_seeds(disc_model):
    a, b = disc_model.sample(20, seed=7), disc_model.sample(20, seed=7)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, disc_model.sample(20, seed=8))
    np.testing.assert_array_equal(disc_model.sample(20), disc_model.sample(20, seed=disc_model.cfg.seed))


def test_temperature(disc_model):
    def areas(t):
        s = disc_model.sample(60, seed=2, temperature=t, include_empty=False)
        return s.reshape(len(s), -1).sum(axis=1)

    assert np.ptp(areas(0.0)) == 0  # the mean shape, moved around
    assert np.std(areas(0.5)) < np.std(areas(1.0))


def test_align_off(discs):
    model = ShapeModel.fit(discs, 2, ShapeModelConfig(align=False))
    s = model.sample(100, seed=0)
    stats = shape_statistics(s, discs)
    assert 0.3 < stats["novelty_median"] < 0.9
    assert stats["classes"][1]["samples"]["components_one_share"] == 1.0


# ----------------------------------------------------------------------------- 3 classes


def test_multiclass_samples(halves_model, halves):
    s = halves_model.sample(200, seed=0)
    assert s.shape == (200, SIZE, SIZE) and s.dtype == np.uint8
    assert set(np.unique(s)) == {0, 1, 2}
    assert halves_model.empty_share == pytest.approx(0.25)
    stats = shape_statistics(s, halves)
    assert stats["empty_share"] == pytest.approx(0.25, abs=0.01)
    assert 0.3 < stats["novelty_median"] < 0.9 and stats["copies_share"] < 0.2
    for k in (1, 2):
        c = stats["classes"][k]
        assert c["within_range"]["all"], (k, c)
        assert c["samples"]["components_one_share"] == 1.0
    # class 2 is shown by 4/5 of the real foreground slices; the samples roughly agree
    present = stats["classes"][2]["samples"]["present_share"]
    assert abs(present - stats["classes"][2]["reference"]["present_share"]) < 0.2
    # both halves touch each other where both are shown (classes adjacent, not scattered)
    both = [m for m in s if (m == 1).any() and (m == 2).any()]
    touching = [((m == 1) & np.roll(m == 2, 1, axis=1)).any() or ((m == 1) & np.roll(m == 2, -1, axis=1)).any()
                or ((m == 1) & np.roll(m == 2, 1, axis=0)).any() or ((m == 1) & np.roll(m == 2, -1, axis=0)).any()
                for m in both]
    assert np.mean(touching) > 0.8


def test_absent_class_warns(discs):
    with pytest.warns(UserWarning, match="never occur"):
        model = ShapeModel.fit(discs[:60], 3)
    assert set(np.unique(model.sample(30, seed=0))) <= {0, 1}


# ----------------------------------------------------------------------------- save / load


def test_save_load_round_trip(halves_model, tmp_path):
    path = halves_model.save(tmp_path / "sub" / "shape.npz")
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == ["shape.npz"]
    loaded = ShapeModel.load(path)
    assert loaded.cfg == halves_model.cfg and loaded.num_classes == 3
    np.testing.assert_array_equal(loaded.sample(50, seed=4), halves_model.sample(50, seed=4))


def test_load_errors(disc_model, tmp_path):
    with pytest.raises(ValueError, match="missing.npz"):
        ShapeModel.load(tmp_path / "missing.npz")

    good = disc_model.save(tmp_path / "good.npz")
    half = tmp_path / "half.npz"
    half.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="half.npz"):
        ShapeModel.load(half)

    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros(3))
    with pytest.raises(ValueError, match="other.npz"):
        ShapeModel.load(other)

    # right format, wrong version / wrong array shapes
    with np.load(good) as z:
        arrays = {k: z[k] for k in z.files}
    meta = str(arrays["meta"])
    old = tmp_path / "old.npz"
    np.savez(old, **{**arrays, "meta": np.array(meta.replace('"version": 1', '"version": 99'))})
    with pytest.raises(ValueError, match="old.npz.*version"):
        ShapeModel.load(old)
    bad = tmp_path / "bad.npz"
    np.savez(bad, **{**arrays, "mean": arrays["mean"][:-1]})
    with pytest.raises(ValueError, match="bad.npz.*mean"):
        ShapeModel.load(bad)
    assert zipfile.is_zipfile(good)


# ----------------------------------------------------------------------------- bad input


def test_fit_rejects_bad_input(discs):
    fg = discs.copy()
    with pytest.raises(ValueError, match="dtype"):
        ShapeModel.fit(fg.astype(np.float32), 2)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        ShapeModel.fit(fg[0], 2)
    with pytest.raises(ValueError, match="numpy array"):
        ShapeModel.fit(fg.tolist(), 2)
    with pytest.raises(ValueError, match="num_classes"):
        ShapeModel.fit(fg * 2, 2)
    with pytest.raises(ValueError, match="num_classes"):
        ShapeModel.fit(fg, 1)
    with pytest.raises(ValueError, match="negative"):
        ShapeModel.fit(-fg.astype(np.int8), 2)
    with pytest.raises(ValueError, match="no foreground"):
        ShapeModel.fit(np.zeros((5, 16, 16), np.uint8), 2)
    one = np.zeros((5, 16, 16), np.uint8)
    one[2, 4:8, 4:8] = 1
    with pytest.raises(ValueError, match="at least 2"):
        ShapeModel.fit(one, 2)


def test_sample_rejects_bad_arguments(disc_model):
    with pytest.raises(ValueError, match="n must be"):
        disc_model.sample(-1)
    with pytest.raises(ValueError, match="temperature"):
        disc_model.sample(3, temperature=-1)


def test_identical_shapes_give_zero_modes():
    masks = np.zeros((6, 24, 24), np.uint8)
    masks[1:, 8:14, 9:15] = 1
    model = ShapeModel.fit(masks, 2, ShapeModelConfig(downsample=1))
    assert model.n_modes == 0
    s = model.sample(10, seed=0, include_empty=False)
    assert (s.reshape(10, -1).sum(axis=1) == 36).all()


# ----------------------------------------------------------------------------- statistics


def test_statistics_of_copies(discs):
    stats = shape_statistics(discs, discs)
    assert stats["novelty_median"] == 1.0 and stats["copies_share"] == 1.0
    assert stats["within_range"] and stats["empty_share"] == pytest.approx(1 / 3)
    assert 0.3 < stats["reference_novelty_median"] < 1.0
    # copies are found even where the reference is subsampled
    sub = shape_statistics(discs[:50], discs, max_reference=20)
    assert sub["novelty_median"] == 1.0
    with pytest.raises(ValueError, match="slice size"):
        shape_statistics(discs[:, :10], discs)
    with pytest.raises(ValueError, match="dtype"):
        shape_statistics(discs.astype(float), discs)


def test_nearest_dice():
    a = np.zeros((2, 8, 8), np.uint8)
    a[0, :4, :4] = 1  # 16 px
    a[1, :4, :4] = 2
    b = np.zeros((2, 8, 8), np.uint8)
    b[0, :4, :2] = 1  # 8 px inside a[0]
    b[1, 4:, 4:] = 1
    d = nearest_dice(a, b, 3)
    assert d[0] == pytest.approx(2 * 8 / 24)
    assert d[1] == pytest.approx(0.0)  # class 2 shown by neither reference
    loo = nearest_dice(b, b, 3, exclude_self=True)
    assert loo == pytest.approx([0.0, 0.0])
