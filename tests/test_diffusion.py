"""Tests for lib.synth.diffusion on tiny synthetic disc data (32x32, CPU)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from lib.synth.diffusion import (
    CHECKPOINT_NAME,
    DiffusionConfig,
    MaskDDPM,
    _set_trailing_timesteps,
    generate_images,
    load_diffusion,
    sample_masks,
    sample_pairs,
    train_diffusion,
)
from lib.synth.generative import TrainingCollapsed, config_from_dict
from lib.synth.masks import deform_masks
from tests import helpers

SIZE = 32


def make_discs(n: int = 32, size: int = SIZE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    return helpers.make_discs(n, size, seed, margin=10, radius=(4, 7))


def tiny_cfg(**kw) -> DiffusionConfig:
    # a short EMA: the shared trainer's EMA starts from the initial weights, and these runs are ~30 steps
    base = {"image_size": SIZE, "base_channels": 8, "channel_mults": (1, 2), "timesteps": 100,
            "sample_steps": 4, "epochs": 2, "batch_size": 8, "lr": 2e-3, "ema_decay": 0.8, "seed": 0}  # fmt: skip
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
def trained(data, tmp_path_factory):
    images, masks = data
    out_dir = tmp_path_factory.mktemp("trained")
    model, history = train_diffusion(images, masks, tiny_cfg(epochs=8), out_dir=out_dir, progress=False)
    return model, history, out_dir / CHECKPOINT_NAME


def test_denoiser_forward_shapes():
    cfg = tiny_cfg(num_classes=3, in_channels=2, channel_mults=(1, 2, 2), attention=True)
    model = MaskDDPM(cfg)
    x = torch.randn(3, 2, SIZE, SIZE)
    cond = torch.nn.functional.one_hot(torch.randint(0, 3, (3, SIZE, SIZE)), 3)
    out = model(x, torch.tensor([0, 50, 99]), cond.permute(0, 3, 1, 2).float())
    assert out.shape == x.shape


def test_config_round_trip_and_validation():
    cfg = tiny_cfg(time_budget_min=1.5)
    assert config_from_dict(DiffusionConfig, dataclasses.asdict(cfg) | {"channel_mults": [1, 2]}) == cfg
    with pytest.raises(ValueError, match="divisible"):
        tiny_cfg(image_size=30, channel_mults=(1, 2, 2))
    with pytest.raises(ValueError, match="sample_steps"):
        tiny_cfg(sample_steps=101)
    with pytest.raises(ValueError, match="noise schedule"):
        tiny_cfg(schedule="quadratic")


def test_sampling_timesteps_match_the_scheduler_jumps():
    scheduler = MaskDDPM(tiny_cfg()).scheduler
    _set_trailing_timesteps(scheduler, 4)
    assert scheduler.timesteps.tolist() == [99, 74, 49, 24]  # each step jumps back 100 // 4, the last to t = -1
    _set_trailing_timesteps(scheduler, 3)
    assert scheduler.timesteps.tolist() == [99, 66, 33]


def test_loss_falls(trained):
    _, history, _ = trained
    assert [r["epoch"] for r in history] == list(range(1, 9))
    assert all(r["seconds"] > 0 for r in history)
    first, last = history[0]["loss"], np.mean([r["loss"] for r in history[-3:]])
    assert last < 0.7 * first


def test_sample_pairs_shapes_and_determinism(trained):
    model = trained[0]
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
    masks = data[1][1:3]  # two disc slices
    images = generate_images(trained[0], masks, seed=0)
    fg, bg = images[:, 0][masks == 1].mean(), images[:, 0][masks == 0].mean()
    assert fg > bg + 1.0


def test_sampling_shows_one_bar_over_every_denoising_step(trained, data, capsys):
    model = trained[0]
    quiet = generate_images(model, data[1][:3], seed=0, batch_size=2)
    assert "DDIM sampling" not in capsys.readouterr().err
    shown = generate_images(model, data[1][:3], seed=0, batch_size=2, progress=True)
    err = capsys.readouterr().err
    steps = 2 * model.cfg.sample_steps  # two batches
    assert "DDIM sampling, 3 images" in err and f"{steps}/{steps}" in err
    np.testing.assert_allclose(quiet, shown, atol=1e-6)


def test_reload_gives_identical_samples(trained):
    model, history, path = trained
    loaded, cfg, hist = load_diffusion(path)
    assert cfg == model.cfg and hist == history and loaded.trained_epochs == 8
    np.testing.assert_array_equal(loaded.mask_bank, model.mask_bank)
    assert len(loaded.mask_bank) > 0 and loaded.empty_fraction == pytest.approx(model.empty_fraction)
    a, b = sample_pairs(model, 3, seed=4), sample_pairs(loaded, 3, seed=4)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])


def test_resume_equals_a_straight_run(data, tmp_path):
    images, masks = data
    straight, h_straight = train_diffusion(images, masks, tiny_cfg(epochs=4), progress=False)
    _, h2 = train_diffusion(images, masks, tiny_cfg(epochs=2), out_dir=tmp_path, progress=False)
    resumed, h4 = train_diffusion(images, masks, tiny_cfg(epochs=4), out_dir=tmp_path, progress=False)
    assert [r["epoch"] for r in h4] == [1, 2, 3, 4] and h4[:2] == h2
    assert [r["loss"] for r in h4] == pytest.approx([r["loss"] for r in h_straight], rel=1e-5)
    np.testing.assert_allclose(sample_pairs(resumed, 3, seed=0)[0], sample_pairs(straight, 3, seed=0)[0], atol=1e-4)
    with pytest.raises(ValueError, match="different config"):
        train_diffusion(images, masks, tiny_cfg(epochs=5, lr=1e-3), out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="other images"):
        train_diffusion(images[::-1].copy(), masks, tiny_cfg(epochs=5), out_dir=tmp_path, progress=False)


def test_nan_loss_stops_and_keeps_the_last_checkpoint(data, tmp_path, monkeypatch):
    images, masks = data
    train_diffusion(images, masks, tiny_cfg(epochs=1), out_dir=tmp_path, progress=False)
    forward = MaskDDPM.forward
    monkeypatch.setattr(MaskDDPM, "forward", lambda self, x, t, c: forward(self, x, t, c) * float("nan"))
    with pytest.raises(TrainingCollapsed, match="epoch 2"):
        train_diffusion(images, masks, tiny_cfg(epochs=2), out_dir=tmp_path, progress=False)
    monkeypatch.undo()
    assert load_diffusion(tmp_path / CHECKPOINT_NAME)[0].trained_epochs == 1


def test_untrained_model_refuses_to_sample():
    model = MaskDDPM(tiny_cfg())
    with pytest.raises(RuntimeError, match="untrained"):
        sample_pairs(model, 2)
    with pytest.raises(RuntimeError, match="untrained"):
        sample_masks(model, 2, seed=0)
    with pytest.raises(RuntimeError, match="untrained"):
        generate_images(model, np.zeros((1, SIZE, SIZE), np.uint8))


def test_bad_checkpoints_are_refused(trained, tmp_path):
    ckpt = torch.load(trained[2], weights_only=True)
    torch.save(ckpt | {"epoch": 0}, tmp_path / "untrained.pt")
    with pytest.raises(RuntimeError, match="untrained"):
        load_diffusion(tmp_path / "untrained.pt")
    torch.save(ckpt | {"config": ckpt["config"] | {"num_classes": 3}}, tmp_path / "classes.pt")
    with pytest.raises(ValueError, match="inconsistent MaskDDPM checkpoint"):
        load_diffusion(tmp_path / "classes.pt")
    torch.save(ckpt | {"config": ckpt["config"] | {"image_size": 2 * SIZE}}, tmp_path / "size.pt")
    with pytest.raises(ValueError, match="mask bank"):  # the U-Net's weights fit any size; the bank does not
        load_diffusion(tmp_path / "size.pt")
    torch.save({"kind": "pair_vae", "version": 1}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="wrong.pt"):
        load_diffusion(tmp_path / "wrong.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.pt"):
        load_diffusion(tmp_path / "corrupt.pt")


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


def test_sample_masks_come_from_the_bank_with_the_empty_share(trained, data):
    model = trained[0]
    masks = sample_masks(model, 300, seed=0)
    empty = ~masks.reshape(len(masks), -1).any(1)
    assert model.empty_fraction == pytest.approx(np.mean(~data[1].reshape(32, -1).any(1)))
    assert abs(empty.mean() - model.empty_fraction) < 0.1
    areas = masks[~empty].reshape(int((~empty).sum()), -1).sum(1)
    bank_areas = model.mask_bank.reshape(len(model.mask_bank), -1).sum(1)
    assert 0.5 * bank_areas.min() < areas.min() and areas.max() < 1.6 * bank_areas.max()
    np.testing.assert_array_equal(masks, sample_masks(model, 300, seed=0))
