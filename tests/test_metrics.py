"""Tests for lib.seg.metrics and lib.common.statistics against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import cKDTree

from lib.common.statistics import (
    crossed_bootstrap,
    paired_bootstrap,
    seed_sd,
    seed_t_interval,
    seeds_for_power,
    variance_components,
)
from lib.seg.metrics import (
    dice,
    dice_from_counts,
    hd95,
    iou,
    per_slice_dice,
    score_case,
    summarise,
    volume_ml,
)


def _two_cubes() -> tuple[np.ndarray, np.ndarray]:
    """4x4x4 cubes overlapping in a 2x2x4 block: |P| = |T| = 64, |P & T| = 16."""
    pred = np.zeros((8, 8, 6), dtype=np.uint8)
    truth = np.zeros_like(pred)
    pred[0:4, 0:4, 0:4] = 1
    truth[2:6, 2:6, 0:4] = 1
    return pred, truth


def _reference_hd95(p: np.ndarray, t: np.ndarray, spacing: tuple[float, ...]) -> float:
    """Brute-force surface HD95: surfaces by 6-neighbour erosion, KD-tree distances."""

    def surface_points(m: np.ndarray) -> np.ndarray:
        return np.argwhere(m & ~ndimage.binary_erosion(m)) * np.asarray(spacing)

    sp, st = surface_points(p), surface_points(t)
    d_pt = cKDTree(st).query(sp)[0]
    d_tp = cKDTree(sp).query(st)[0]
    return max(np.percentile(d_pt, 95), np.percentile(d_tp, 95))


def test_dice_iou_overlapping_cubes() -> None:
    pred, truth = _two_cubes()
    assert dice(pred, truth) == pytest.approx(2 * 16 / 128)
    assert iou(pred, truth) == pytest.approx(16 / 112)
    assert dice(pred, pred) == 1.0
    assert iou(pred, pred) == 1.0
    assert isinstance(dice(pred, truth), float)
    assert isinstance(iou(pred, truth), float)


def test_dice_iou_use_label() -> None:
    pred, truth = _two_cubes()
    assert dice(pred * 3, truth * 3, label=3) == pytest.approx(0.25)
    assert math.isnan(dice(pred * 3, truth * 3, label=1))


def test_dice_iou_2d() -> None:
    pred = np.array([[1, 1, 0], [0, 0, 0]])
    truth = np.array([[1, 0, 0], [1, 0, 0]])
    assert dice(pred, truth) == pytest.approx(0.5)
    assert iou(pred, truth) == pytest.approx(1 / 3)


def test_empty_conventions() -> None:
    empty = np.zeros((5, 5, 5), dtype=np.uint8)
    full = empty.copy()
    full[1:3, 1:3, 1:3] = 1
    spacing = (1.0, 1.0, 1.0)
    assert math.isnan(dice(empty, empty))
    assert math.isnan(iou(empty, empty))
    assert math.isnan(hd95(empty, empty, spacing))
    for a, b in ((empty, full), (full, empty)):
        assert dice(a, b) == 0.0
        assert iou(a, b) == 0.0
        assert hd95(a, b, spacing) == math.inf


def test_shape_mismatch_raises() -> None:
    a = np.zeros((4, 4, 4), dtype=np.uint8)
    b = np.zeros((4, 4, 5), dtype=np.uint8)
    for fn in (dice, iou):
        with pytest.raises(ValueError, match="same shape"):
            fn(a, b)
    with pytest.raises(ValueError, match="same shape"):
        hd95(a, b, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="same shape"):
        score_case(a, b, (1.0, 1.0, 1.0), [1])


def test_hd95_single_voxel_shift_anisotropic() -> None:
    pred = np.zeros((6, 6, 8), dtype=np.uint8)
    truth = np.zeros_like(pred)
    pred[3, 3, 2] = 1
    truth[3, 3, 4] = 1
    assert hd95(pred, truth, (0.7, 1.3, 2.5)) == pytest.approx(5.0)


@pytest.mark.parametrize(
    ("axis", "spacing", "expected"),
    [
        (2, (1.0, 1.0, 2.5), 5.0),
        (2, (0.5, 0.8, 2.5), 5.0),
        (0, (3.0, 1.0, 1.0), 6.0),
    ],
)
def test_hd95_cube_shift(axis: int, spacing: tuple[float, ...], expected: float) -> None:
    # A 10x10x6 box shifted by 2 voxels along its short axis: every surface voxel of the
    # leading face is exactly 2 voxels from the other surface (100 of 344 surface voxels),
    # and no surface voxel is farther, so the 95th percentile is 2 * spacing[axis].
    pred = np.zeros((14, 14, 14), dtype=np.uint8)
    box = [slice(2, 12), slice(2, 12), slice(2, 12)]
    box[axis] = slice(2, 8)
    pred[tuple(box)] = 1
    truth = np.roll(pred, 2, axis=axis)
    assert hd95(pred, truth, spacing) == pytest.approx(expected)
    assert hd95(truth, pred, spacing) == pytest.approx(expected)


def test_hd95_is_surface_based() -> None:
    # 2D: a filled 9x9 square with a centred 3x3 square inside it. Distances from the 32
    # outer-ring pixels to the inner square's ring: 4 corners sqrt(18), 8 at sqrt(13), 8 at
    # sqrt(10), 12 at 3; the inner ring is 3 from the outer ring everywhere. The 95th
    # percentile (index 0.95 * 31 = 29.45 of the sorted 32) is sqrt(18). A volume-based
    # HD95 over all 81 pixels would give sqrt(13) instead.
    outer = np.zeros((13, 13), dtype=np.uint8)
    outer[2:11, 2:11] = 1
    inner = np.zeros_like(outer)
    inner[5:8, 5:8] = 1
    assert hd95(outer, inner, (2.0, 2.0)) == pytest.approx(2.0 * math.sqrt(18))


def test_hd95_matches_bruteforce_reference() -> None:
    rng = np.random.default_rng(0)
    spacing = (0.8, 1.1, 3.0)
    shape = (24, 20, 12)
    pred = ndimage.gaussian_filter(rng.random(shape), 2) > 0.5
    truth = ndimage.gaussian_filter(rng.random(shape), 2) > 0.5
    assert pred.any() and truth.any()
    expected = _reference_hd95(pred, truth, spacing)
    assert hd95(pred.astype(np.uint8), truth.astype(np.uint8), spacing) == pytest.approx(
        expected, rel=1e-5
    )


def test_hd95_spacing_length_checked() -> None:
    pred, truth = _two_cubes()
    with pytest.raises(ValueError, match="spacing"):
        hd95(pred, truth, (1.0, 1.0))


def test_volume_ml() -> None:
    mask = np.zeros((12, 12, 12), dtype=np.uint8)
    mask[1:11, 1:11, 1:11] = 2
    assert volume_ml(mask, (1.0, 1.0, 1.0), label=2) == pytest.approx(1.0)
    assert volume_ml(mask, (2.0, 1.0, 1.0), label=2) == pytest.approx(2.0)
    assert volume_ml(mask, (1.0, 1.0, 1.0), label=1) == 0.0


def test_per_slice_dice() -> None:
    pred = np.zeros((4, 5, 4), dtype=np.uint8)
    truth = np.zeros_like(pred)
    # slice 0: both empty -> NaN
    pred[0, 0, 1] = 1  # slice 1: prediction only -> 0
    pred[1:3, 1:3, 2] = 1  # slice 2: identical -> 1
    truth[1:3, 1:3, 2] = 1
    pred[0:2, 0:2, 3] = 1  # slice 3: 4 vs 2 voxels, 2 shared -> 4/6
    truth[0:2, 0, 3] = 1
    out = per_slice_dice(pred, truth)
    assert out.shape == (4,)
    assert math.isnan(out[0])
    np.testing.assert_allclose(out[1:], [0.0, 1.0, 4 / 6])
    assert per_slice_dice(pred, truth, axis=0).shape == (4,)
    assert per_slice_dice(pred, truth, axis=1).shape == (5,)
    np.testing.assert_allclose(per_slice_dice(pred, truth, axis=2), out)


def test_per_slice_dice_mean_over_labels() -> None:
    truth = np.zeros((4, 4, 4), dtype=np.uint8)
    pred = np.zeros_like(truth)
    # slice 0: every label empty in both -> NaN
    truth[0:2, 0:2, 1:3] = 1  # slices 1, 2: label 1 right
    pred[0:2, 0:2, 1:3] = 1
    truth[2:4, 2:4, 1] = 2  # slice 1: label 2 wrong (predicted elsewhere) -> mean(1, 0)
    pred[2:4, 0:2, 1] = 2
    # slice 2: label 2 absent in both, ignored -> 1
    truth[2:4, 2:4, 3] = 2  # slice 3: only label 2, 2 of 4 voxels found -> 2/3
    pred[2:4, 2, 3] = 2
    np.testing.assert_allclose(per_slice_dice(pred, truth, label=2), [np.nan, 0.0, np.nan, 2 / 3])
    out = per_slice_dice(pred, truth, label=[1, 2])
    np.testing.assert_allclose(out, [np.nan, 0.5, 1.0, 2 / 3])
    np.testing.assert_array_equal(per_slice_dice(pred, truth, label=[0, 1, 2]), out)
    np.testing.assert_array_equal(
        per_slice_dice(pred, truth, label=[1]), per_slice_dice(pred, truth, label=1)
    )
    with pytest.raises(ValueError, match="foreground"):
        per_slice_dice(pred, truth, label=[0])


def test_dice_from_counts() -> None:
    assert dice_from_counts(10, 15, 25) == pytest.approx(0.5)
    assert math.isnan(dice_from_counts(0, 0, 0))
    assert dice_from_counts(0, 5, 0) == 0.0


def test_dice_from_counts_accumulated_over_slices_equals_3d() -> None:
    rng = np.random.default_rng(1)
    pred = (rng.random((6, 7, 9)) > 0.6).astype(np.uint8)
    truth = (rng.random((6, 7, 9)) > 0.5).astype(np.uint8)
    inter = psum = tsum = 0
    for z in range(pred.shape[-1]):
        p, t = pred[..., z] == 1, truth[..., z] == 1
        inter += int((p & t).sum())
        psum += int(p.sum())
        tsum += int(t.sum())
    assert dice_from_counts(inter, psum, tsum) == pytest.approx(dice(pred, truth))


def test_score_case_single_label() -> None:
    pred, truth = _two_cubes()
    scores = score_case(pred, truth, (1.0, 1.0, 2.0), labels=[0, 1])
    assert set(scores) == {"dice", "iou", "hd95", "pred_volume_ml", "true_volume_ml", "pixel_accuracy"}
    assert scores["pixel_accuracy"] == pytest.approx(np.mean(pred == truth))
    assert scores["dice"] == pytest.approx(0.25)
    assert scores["iou"] == pytest.approx(1 / 7)
    assert scores["pred_volume_ml"] == pytest.approx(64 * 2 / 1000)
    assert scores["true_volume_ml"] == pytest.approx(64 * 2 / 1000)
    assert scores["hd95"] == pytest.approx(hd95(pred, truth, (1.0, 1.0, 2.0)))
    assert all(isinstance(v, float) for v in scores.values())


def test_score_case_multiclass() -> None:
    truth = np.zeros((10, 10, 10), dtype=np.uint8)
    truth[1:4, 1:4, 1:4] = 1
    truth[6:9, 6:9, 6:9] = 2
    pred = truth.copy()
    pred[pred == 2] = 0  # label 2 missed entirely
    spacing = (1.0, 1.0, 1.0)
    scores = score_case(pred, truth, spacing, labels=[1, 2, 3])  # label 3 absent in both
    per = scores["per_label"]
    assert set(per) == {"1", "2", "3"}
    assert per["1"]["dice"] == 1.0 and per["1"]["hd95"] == 0.0
    assert per["2"]["dice"] == 0.0 and per["2"]["hd95"] == math.inf
    assert per["2"]["pred_volume_ml"] == 0.0
    assert per["2"]["true_volume_ml"] == pytest.approx(0.027)
    assert math.isnan(per["3"]["dice"]) and math.isnan(per["3"]["hd95"])
    assert scores["dice"] == pytest.approx(0.5)  # mean of 1 and 0, NaN ignored
    assert scores["iou"] == pytest.approx(0.5)
    assert scores["hd95"] == math.inf
    assert scores["pred_volume_ml"] == pytest.approx(0.027)
    assert scores["true_volume_ml"] == pytest.approx(0.054)

    partial = score_case(truth, truth, spacing, labels=[1, 2, 3])
    assert partial["dice"] == 1.0 and partial["hd95"] == 0.0


def test_summarise_ignores_nan_and_counts_inf() -> None:
    cases = {
        "a": {"dice": 1.0, "iou": 1.0, "hd95": 1.0, "pred_volume_ml": 3.0},
        "b": {"dice": 0.5, "iou": 1 / 3, "hd95": 3.0},
        "c": {"dice": math.nan, "iou": math.nan, "hd95": math.nan},
        "d": {"dice": 0.0, "iou": 0.0, "hd95": math.inf},
    }
    out = summarise(cases)
    assert out["n_cases"] == 4
    assert set(out["mean"]) == {"dice", "iou", "hd95"}
    assert out["mean"]["dice"] == pytest.approx(0.5)
    assert out["std"]["dice"] == pytest.approx(np.std([1.0, 0.5, 0.0]))
    assert out["median"]["dice"] == pytest.approx(0.5)
    assert out["n_valid"]["dice"] == 3
    assert out["mean"]["hd95"] == pytest.approx(2.0)
    assert out["std"]["hd95"] == pytest.approx(1.0)
    assert out["median"]["hd95"] == pytest.approx(2.0)
    assert out["n_valid"]["hd95"] == 2
    assert out["n_inf"]["hd95"] == 1
    assert out["n_inf"]["dice"] == 0


def test_summarise_all_nan() -> None:
    out = summarise({"a": {"dice": math.nan, "iou": math.nan, "hd95": math.inf}})
    assert math.isnan(out["mean"]["dice"])
    assert math.isnan(out["mean"]["hd95"])
    assert out["n_inf"]["hd95"] == 1


def test_paired_bootstrap_gives_a_verdict_only_when_the_interval_excludes_zero() -> None:
    rng = np.random.default_rng(1)
    better = paired_bootstrap(0.05 + 0.01 * rng.standard_normal(20))
    assert better["verdict"] == "higher" and 0 < better["low"] < better["mean"] < better["high"] and better["n"] == 20
    assert paired_bootstrap(-0.05 + 0.01 * rng.standard_normal(20))["verdict"] == "lower"
    noisy = paired_bootstrap([0.1, -0.1, 0.12, -0.09, float("nan")])
    assert noisy["verdict"] == "no clear difference" and noisy["n"] == 4 and noisy["low"] < 0 < noisy["high"]
    with pytest.raises(ValueError, match="no finite"):
        paired_bootstrap([float("nan")])


def test_paired_bootstrap_matches_a_hand_computed_case() -> None:
    # two pairs: a resample of two is {a, a}, {a, b} or {b, b}, means a, (a+b)/2, b with chances 1/4, 1/2, 1/4,
    # so the 2.5 % and 97.5 % quantiles of the resampled means are a and b
    ci = paired_bootstrap([0.1, 0.3])
    assert ci["mean"] == pytest.approx(0.2) and ci["low"] == pytest.approx(0.1) and ci["high"] == pytest.approx(0.3)
    assert ci["verdict"] == "higher" and ci["n"] == 2
    ci = paired_bootstrap([0.0, 1.0])
    assert (ci["low"], ci["high"], ci["verdict"]) == (pytest.approx(0.0), pytest.approx(1.0), "no clear difference")


def test_seed_t_interval_matches_the_t_formula_and_needs_two_runs() -> None:
    ci = seed_t_interval([0.09, 0.10, 0.11])  # mean 0.10, sd 0.01: half-width t(0.975, 2) * 0.01 / sqrt(3)
    assert ci["mean"] == pytest.approx(0.10) and ci["low"] == pytest.approx(0.10 - 4.3027 * 0.01 / 3**0.5, abs=1e-5)
    assert ci["verdict"] == "higher" and ci["n"] == 3
    assert seed_t_interval([0.1, float("nan")])["verdict"] == "no clear difference"  # one finite run: no interval


def test_crossed_bootstrap_keeps_the_spread_between_runs_and_between_patients() -> None:
    runs = np.array([[0.05] * 8] * 4 + [[-0.2] * 8])  # one training run failed: the interval must show it
    patients = np.array([[0.3, -0.3] * 4] * 5)  # every run agrees, the patients differ
    steady = np.full((5, 8), 0.05)
    assert crossed_bootstrap(steady)["verdict"] == "higher"
    for spread in (runs, patients):
        ci = crossed_bootstrap(spread)
        assert ci["low"] < 0 < ci["high"] and ci["verdict"] == "no clear difference" and ci["n"] == 40
    assert crossed_bootstrap(np.full((1, 4), 0.1))["verdict"] == "no clear difference"  # one run: no interval
    with pytest.raises(ValueError, match="finite value"):
        crossed_bootstrap(np.full((2, 4), np.nan))


@pytest.mark.parametrize("run_sd, patient_sd, noise_sd", [(0.03, 0.04, 0.03), (0.05, 0.02, 0.05), (0.01, 0.05, 0.05)])
def test_with_no_effect_the_studys_verdict_is_wrong_in_at_most_7_percent_of_200_replicates(run_sd, patient_sd,
                                                                                          noise_sd) -> None:
    """5 training runs x 20 test patients, a true difference of 0: the crossed interval covers 0 in at
    least 93 % of the replicates, and the verdict (both intervals on one side of 0) is "no clear
    difference" in at least 93 %. The t-interval over runs alone covers less where test patients
    spread more than runs (it is conditional on this test set), which is why both are required."""
    rng = np.random.default_rng(1)
    covered = quiet = 0
    for r in range(200):
        diff = (rng.normal(0, run_sd, (5, 1)) + rng.normal(0, patient_sd, (1, 20))
                + rng.normal(0, noise_sd, (5, 20)))
        primary, secondary = seed_t_interval(diff.mean(axis=1)), crossed_bootstrap(diff, n_boot=1000, seed=r)
        covered += secondary["low"] <= 0 <= secondary["high"]
        quiet += not (primary["verdict"] == secondary["verdict"] != "no clear difference")
    assert covered >= 186 and quiet >= 186


def test_variance_components_recover_the_spread_between_runs_and_the_residual() -> None:
    rng = np.random.default_rng(0)
    runs, patients = rng.normal(0, 0.04, (400, 1)), rng.normal(0, 0.10, (1, 30))  # patient effects shared by every run
    parts = variance_components(runs + patients + rng.normal(0, 0.06, (400, 30)))
    assert parts["var_run"] == pytest.approx(0.04**2, rel=0.15) and parts["var_residual"] == pytest.approx(0.06**2, rel=0.05)
    assert seed_sd(parts, 20) == pytest.approx((0.04**2 + 0.06**2 / 20) ** 0.5, rel=0.1)
    flat = variance_components(np.tile(rng.normal(0, 0.1, (1, 6)), (3, 1)))  # runs equal: no spread between them
    assert flat["var_run"] == pytest.approx(0.0, abs=1e-12) and flat["var_residual"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="2 runs"):
        variance_components(np.zeros((1, 5)))


def test_seeds_for_power_follows_the_noncentral_t() -> None:
    assert seeds_for_power(0.05, 0.03) == 24 and seeds_for_power(0.01, 0.03) == 4
    assert seeds_for_power(0.08, 0.03) > seeds_for_power(0.05, 0.03)
    assert seeds_for_power(1.0, 0.001, most=10) == 11
