"""Tests for lib.diffusion on tiny synthetic disc data (32x32, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lib.diffusion as diff_mod
from lib.diffusion import (
    DiffusionConfig,
    MaskDDPM,
    deform_masks,
    generate_images,
    load_diffusion,
    sample_masks,
    sample_pairs,
    save_diffusion,
    train_diffusion,
)
from tests import helpers

SIZE = 32


def make_discs(n: int = 32, size: int = SIZE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    return helpers.make_discs(n, size, seed, margin=10, radius=(4, 7))


def tiny_cfg(**kw) -> DiffusionConfig:
    base = {"image_size": SIZE, "base_channels": 8, "channel_mults": (1, 2), "timesteps": 100,
            "sample_steps": 4, "epochs": 2, "batch_size": 8, "lr": 2e-3, "seed": 0}  # fmt: skip
    return DiffusionConfig(**{**base, **kw})


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest single-threaded (and do not fight parallel test jobs)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return make_discs()


@pytest.fixture(scope="module")
def trained(data):
    images, masks = data
    return train_diffusion(images, masks, tiny_cfg(epochs=8), progress=False)


def test_denoiser_forward_shapes():
    cfg = tiny_cfg(num_classes=3, in_channels=2, channel_mults=(1, 2, 2))
    model = MaskDDPM(cfg)
    x = torch.randn(3, 2, SIZE, SIZE)
    cond = torch.nn.functional.one_hot(torch.randint(0, 3, (3, SIZE, SIZE)), 3)
    out = model(x, torch.tensor([0, 50, 99]), cond.permute(0, 3, 1, 2).float())
    assert out.shape == x.shape


def test_config_round_trip_and_validation():
    cfg = tiny_cfg(time_budget_min=1.5)
    assert DiffusionConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError):
        DiffusionConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError):
        tiny_cfg(image_size=30, channel_mults=(1, 2, 2))
    with pytest.raises(ValueError):
        tiny_cfg(sample_steps=101)


def test_loss_falls(trained):
    _, history = trained
    assert [r["epoch"] for r in history] == list(range(1, 9))
    assert all(r["seconds"] > 0 for r in history)
    first, last = history[0]["loss"], np.mean([r["loss"] for r in history[-3:]])
    assert last < 0.7 * first


def test_sample_pairs_shapes_and_determinism(trained):
    model, _ = trained
    images, masks = sample_pairs(model, 5, seed=1)
    assert images.shape == (5, 1, SIZE, SIZE) and images.dtype == np.float32
    assert masks.shape == (5, SIZE, SIZE) and masks.dtype == np.uint8
    assert np.isfinite(images).all()
    again = sample_pairs(model, 5, seed=1, batch_size=2)
    np.testing.assert_array_equal(masks, again[1])
    np.testing.assert_allclose(images, again[0], atol=1e-5)
    other = sample_pairs(model, 5, seed=2)
    assert not np.allclose(images, other[0])
    none = sample_pairs(model, 0)
    assert none[0].shape == (0, 1, SIZE, SIZE) and none[1].shape == (0, SIZE, SIZE)


def test_generated_images_follow_mask(trained, data):
    model, _ = trained
    masks = data[1][1:3]  # two disc slices
    images = generate_images(model, masks, seed=0)
    fg, bg = images[:, 0][masks == 1].mean(), images[:, 0][masks == 0].mean()
    assert fg > bg + 1.0


def test_save_load_round_trip(trained, tmp_path):
    model, history = trained
    path = save_diffusion(tmp_path / "d.pt", model, model.cfg, history)
    loaded, cfg, hist = load_diffusion(path)
    assert cfg == model.cfg and hist == history and loaded.trained_epochs == 8
    np.testing.assert_array_equal(loaded.mask_bank, model.mask_bank)
    assert loaded.empty_fraction == pytest.approx(model.empty_fraction)
    a, b = sample_pairs(model, 3, seed=4), sample_pairs(loaded, 3, seed=4)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])


def test_bad_checkpoints_name_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.pt"):
        load_diffusion(corrupt)
    wrong = tmp_path / "wrong.pt"
    torch.save({"kind": "pair_vae", "version": 1}, wrong)
    with pytest.raises(ValueError, match="wrong.pt"):
        load_diffusion(wrong)


def test_resume_continues_and_checks_config(data, tmp_path):
    images, masks = data
    _, h1 = train_diffusion(images, masks, tiny_cfg(epochs=1), out_dir=tmp_path, progress=False)
    model, h2 = train_diffusion(images, masks, tiny_cfg(epochs=2), out_dir=tmp_path, progress=False)
    assert [r["epoch"] for r in h2] == [1, 2] and h2[0] == h1[0]
    assert model.trained_epochs == 2
    assert load_diffusion(tmp_path / "diffusion.pt")[0].trained_epochs == 2
    # an uninterrupted run gives the same result
    _, full = train_diffusion(images, masks, tiny_cfg(epochs=2), progress=False)
    assert full[1]["loss"] == pytest.approx(h2[1]["loss"], rel=1e-4)
    with pytest.raises(ValueError, match="different config"):
        train_diffusion(images, masks, tiny_cfg(epochs=3, lr=1e-3), out_dir=tmp_path)
    with pytest.raises(ValueError, match="different images"):
        train_diffusion(images[::-1].copy(), masks, tiny_cfg(epochs=3), out_dir=tmp_path)


def test_nan_guard_keeps_last_checkpoint(data, tmp_path, monkeypatch):
    images, masks = data
    train_diffusion(images, masks, tiny_cfg(epochs=1), out_dir=tmp_path, progress=False)
    monkeypatch.setattr(
        diff_mod.Denoiser, "forward", lambda self, x, t, c: torch.full_like(x, float("nan"))
    )
    with pytest.raises(RuntimeError, match="epoch 2"):
        train_diffusion(images, masks, tiny_cfg(epochs=2), out_dir=tmp_path, progress=False)
    assert load_diffusion(tmp_path / "diffusion.pt")[0].trained_epochs == 1


def test_time_budget_stops_after_one_epoch(data):
    images, masks = data
    _, history = train_diffusion(
        images, masks, tiny_cfg(epochs=5, time_budget_min=1e-6), progress=False
    )
    assert len(history) == 1


def test_untrained_sampling_raises():
    model = MaskDDPM(tiny_cfg())
    with pytest.raises(RuntimeError, match="untrained"):
        sample_pairs(model, 2)
    with pytest.raises(RuntimeError, match="untrained"):
        sample_masks(model, 2, seed=0)


def test_deformed_masks_differ_but_keep_area(data):
    masks = data[1][data[1].reshape(len(data[1]), -1).any(1)]
    out = deform_masks(masks, 2, seed=0)
    assert out.shape == masks.shape and out.dtype == np.uint8
    assert set(np.unique(out)) <= {0, 1}
    changed = (out != masks).reshape(len(masks), -1).any(1)
    assert changed.mean() > 0.9
    ratio = out.reshape(len(out), -1).sum(1) / masks.reshape(len(masks), -1).sum(1)
    assert np.all((ratio > 0.6) & (ratio < 1.6))
    np.testing.assert_array_equal(out, deform_masks(masks, 2, seed=0))


def test_deform_keeps_class_ids():
    masks = np.zeros((4, SIZE, SIZE), np.uint8)
    masks[:, 8:24, 8:16] = 1
    masks[:, 8:24, 16:24] = 2
    out = deform_masks(masks, 3, seed=1)
    assert set(np.unique(out)) == {0, 1, 2}


def test_sample_masks_empty_share(trained, data):
    model, _ = trained
    masks = sample_masks(model, 300, seed=0)
    empty = ~masks.reshape(len(masks), -1).any(1)
    assert model.empty_fraction == pytest.approx(np.mean(~data[1].reshape(32, -1).any(1)))
    assert abs(empty.mean() - model.empty_fraction) < 0.1
