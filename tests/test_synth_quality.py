"""Tests for lib.synth.quality on tiny synthetic data (32x32, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from torch import nn

from lib.synth.quality import (
    diversity_msssim,
    encoder_features,
    frechet_distance,
    mask_agreement,
    memorisation_distance,
    memorisation_summary,
    quality_table,
    sharpness,
    sharpness_ratio,
)
from tests import helpers

SIZE = 32


def make_discs(n: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noisy images with bright discs (class 1); every third slice is empty."""
    return helpers.make_discs(n, SIZE, seed, margin=10, radius=(4, 7))


class TinyEncoder(nn.Module):
    """Returns a list of feature maps, deepest last, like smp encoders."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.b = nn.Conv2d(4, 8, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f1 = torch.relu(self.a(x))
        return [x, f1, torch.relu(self.b(f1))]


def threshold_predictor(images: np.ndarray) -> np.ndarray:
    return (images[:, 0] > 1.5).astype(np.uint8)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return make_discs()


def test_blur_lowers_sharpness(data):
    images = data[0]
    blurred = gaussian_filter(images, sigma=(0, 0, 1.5, 1.5))
    assert sharpness(blurred) < 0.5 * sharpness(images)
    assert sharpness_ratio(blurred, images) < 0.5
    assert sharpness_ratio(images, images) == pytest.approx(1.0)


def test_msssim_diversity():
    rng = np.random.default_rng(0)
    same = np.repeat(rng.normal(0, 1, (1, 1, SIZE, SIZE)).astype(np.float32), 6, axis=0)
    assert diversity_msssim(same, n_pairs=20) == pytest.approx(1.0, abs=1e-4)
    noise = rng.normal(0, 1, (6, 1, SIZE, SIZE)).astype(np.float32)
    assert diversity_msssim(noise, n_pairs=20) < 0.5


def test_memorisation_distance(data):
    images = data[0]
    synth = np.concatenate([images[3:4], images[5:6] + 0.1])
    d = memorisation_distance(synth, images)
    assert d.shape == (2,)
    assert d[0] == pytest.approx(0.0, abs=1e-6)
    assert d[1] == pytest.approx(0.1, abs=1e-4)
    summary = memorisation_summary(synth, images)
    assert summary["nn_rmse_min"] == pytest.approx(0.0, abs=1e-6)
    assert summary["real_nn_rmse_median"] > 0.1  # self-matches are excluded


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, (400, 3)) * np.array([1.0, 2.0, 0.5])
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = np.array([1.0, -2.0, 0.5])
    assert frechet_distance(a, a + shift) == pytest.approx(np.sum(shift**2), rel=1e-6)
    mu = a.mean(0)
    scaled = mu + 2.0 * (a - mu)  # covariance x4: trace term tr(S) (1 - 2)^2
    assert frechet_distance(a, scaled) == pytest.approx(np.trace(np.cov(a.T)), rel=1e-6)
    # independent diagonal Gaussians: |dmu|^2 + sum (s_a - s_b)^2 (s = std devs)
    s_a, s_b = np.array([1.0, 2.0, 0.5]), np.array([2.0, 1.0, 0.5])
    x = rng.normal(0, 1, (20000, 3)) * s_a
    y = rng.normal(0, 1, (20000, 3)) * s_b + shift
    expected = np.sum(shift**2) + np.sum((s_a - s_b) ** 2)
    assert frechet_distance(x, y) == pytest.approx(expected, rel=0.05)


def test_frechet_distance_rank_deficient_is_finite():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, (5, 16)), rng.normal(0, 1, (5, 16))
    assert np.isfinite(frechet_distance(a, b))


def test_mask_agreement(data):
    images, masks = data
    assert mask_agreement(lambda x: masks[: len(x)], images[:4], masks[:4]) == 1.0
    assert mask_agreement(threshold_predictor, images, masks, batch_size=5) > 0.8
    empty = np.zeros_like(masks[:2])
    assert np.isnan(mask_agreement(lambda x: empty, images[:2], empty))


def test_encoder_features(data):
    enc = TinyEncoder().train()
    feats = encoder_features(enc, data[0], batch_size=5)
    assert feats.shape == (len(data[0]), 8) and enc.training


def test_quality_table(data):
    images, masks = data
    blurred = gaussian_filter(images, sigma=(0, 0, 1.5, 1.5))
    held_out = make_discs(12, seed=1)
    table = quality_table((images, masks), held_out, {"blur": (blurred, masks), "copy": (images, masks)},
                          threshold_predictor, TinyEncoder(), new_masks={"blur"})
    assert list(table) == ["real", "blur", "copy"]
    keys = {"n", "foreground_share", "frechet", "frechet_ratio", "sharpness_ratio", "msssim_diversity", "nn_distance_median",
            "mask_agreement", "mask_agreement_ratio"}
    assert set(table["copy"]) == keys and set(table["blur"]) == set(table["real"]) == keys | {"mask_novelty_median"}
    real, blur, copy = table["real"], table["blur"], table["copy"]
    assert real["frechet_ratio"] == 1.0 and copy["frechet_ratio"] == pytest.approx(copy["frechet"] / real["frechet"])
    assert blur["sharpness_ratio"] < 0.5 < real["sharpness_ratio"]
    assert copy["nn_distance_median"] == pytest.approx(0.0, abs=1e-6) and real["nn_distance_median"] > 0.1
    assert blur["mask_novelty_median"] == pytest.approx(1.0)  # the training masks themselves: no novelty
    n_fg = min(int(m.reshape(len(m), -1).any(axis=1).sum()) for m in (masks, held_out[1]))
    assert 2 <= n_fg < 12 and all(r["n"] == n_fg for r in table.values())  # slices without foreground left out


def test_quality_table_ignores_background_only_slices(data):
    """Empty slices added to the held-out set change nothing; a source without foreground is an error."""
    images, masks = data
    held_out = make_discs(12, seed=1)
    padded = (np.concatenate([held_out[0], np.zeros_like(held_out[0])]),
              np.concatenate([held_out[1], np.zeros_like(held_out[1])]))
    plain = quality_table((images, masks), held_out, {"copy": (images, masks)}, threshold_predictor, TinyEncoder())
    padded_table = quality_table((images, masks), padded, {"copy": (images, masks)}, threshold_predictor,
                                 TinyEncoder())
    assert padded_table["copy"]["frechet"] == pytest.approx(plain["copy"]["frechet"])
    assert padded_table["real"]["foreground_share"] == pytest.approx(plain["real"]["foreground_share"] / 2)
    table = quality_table((images, masks), held_out, {"empty_gen": (images, np.zeros_like(masks)),
                                                      "copy": (images, masks)}, threshold_predictor, TinyEncoder())
    assert table["empty_gen"]["foreground_share"] == 0 and table["empty_gen"]["frechet"] is None
    assert table["copy"]["frechet"] == pytest.approx(plain["copy"]["frechet"])  # the empty source changes nothing
    with pytest.raises(ValueError, match="real slices with foreground in \\['held-out'\\]"):
        quality_table((images, masks), (held_out[0], np.zeros_like(held_out[1])), {"copy": (images, masks)},
                      threshold_predictor, TinyEncoder())


def test_a_generator_with_few_foreground_pairs_does_not_shrink_the_others(data):
    images, masks = data
    held_out = make_discs(12, seed=1)
    plain = quality_table((images, masks), held_out, {"copy": (images, masks)}, threshold_predictor, TinyEncoder())
    few = (images[:3], masks[:3])
    n_few = int(few[1].reshape(3, -1).any(axis=1).sum())
    table = quality_table((images, masks), held_out, {"few": few, "copy": (images, masks)}, threshold_predictor,
                          TinyEncoder(), min_pairs=n_few + 1)
    assert table["few"]["n"] == n_few and table["few"]["frechet"] is None and table["few"]["sharpness_ratio"] is None
    assert table["copy"]["n"] == plain["copy"]["n"] > n_few
    assert table["copy"]["frechet"] == pytest.approx(plain["copy"]["frechet"])
