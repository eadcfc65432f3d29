"""Tests for lib.synth.diffusion on tiny synthetic disc data (32x32, CPU)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from lib.synth.diffusion import (
    CHECKPOINT_NAME,
    DiffusionConfig,
    MaskDDPM,
    _ddim,
    _dpm_timesteps,
    _dpmpp_2m,
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
    fast = tiny_cfg(sampler="dpmpp_2m")
    assert config_from_dict(DiffusionConfig, dataclasses.asdict(fast)) == fast
    assert config_from_dict(DiffusionConfig, {"image_size": SIZE, "channel_mults": [1, 2]}).sampler == "ddim"


def test_unknown_sampler_is_refused_by_name():
    with pytest.raises(ValueError, match=r"unknown sampler 'euler'.*'ddim', 'dpmpp_2m'"):
        tiny_cfg(sampler="euler")


def test_sampling_timesteps_match_the_scheduler_jumps():
    scheduler = MaskDDPM(tiny_cfg()).scheduler
    _set_trailing_timesteps(scheduler, 4)
    assert scheduler.timesteps.tolist() == [99, 74, 49, 24]  # each step jumps back 100 // 4, the last to t = -1
    _set_trailing_timesteps(scheduler, 3)
    assert scheduler.timesteps.tolist() == [99, 66, 33]


def test_dpm_solver_timesteps_are_distinct_and_run_from_pure_noise_to_t0():
    assert _dpm_timesteps(1000, 20)[:3] == [999, 897, 800] and _dpm_timesteps(1000, 20)[-3:] == [11, 3, 0]
    assert _dpm_timesteps(100, 1) == [99]
    for steps in range(2, 101):
        ts = _dpm_timesteps(100, steps)
        assert len(ts) == steps and ts[0] == 99 and ts[-1] == 0 and all(np.diff(ts) < 0), steps


class GaussianDenoiser(nn.Module):
    """The exact v-prediction of the model's noise schedule for data x0 ~ N(mu, s^2), independent per
    pixel: with x_t = alpha x0 + sigma eps, E[x0 | x_t] = mu + alpha s^2 / (alpha^2 s^2 + sigma^2) (x_t - alpha mu)
    and v = alpha eps - sigma x0, so v = (alpha x_t - E[x0 | x_t]) / sigma. Masks are ignored."""

    def __init__(self, mu: float, s: float) -> None:
        super().__init__()
        self.mu, self.s = mu, s
        self.scheduler = MaskDDPM(tiny_cfg(timesteps=1000)).scheduler  # the model's 1000-step cosine schedule

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        a = self.scheduler.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
        alpha, sigma, x = a.sqrt(), (1 - a).sqrt(), x.double()
        x0 = self.mu + alpha * self.s**2 / (a * self.s**2 + 1 - a) * (x - alpha * self.mu)
        return ((alpha * x - x0) / sigma).float()


def test_dpm_solver_follows_the_probability_flow_ode_closer_than_ddim():
    """Against 1000 DDIM steps of the same ODE, for Gaussian data whose exact denoiser is known: 20 steps of
    DPM-Solver++(2M) land about 6x closer than 20 DDIM steps, and halving the step size divides their error by
    about 4 (second order), DDIM's by 2 (first order)."""
    mu, s = 0.2, 0.3
    model = GaussianDenoiser(mu, s)
    noise = torch.randn((8, 1, SIZE, SIZE), generator=torch.Generator().manual_seed(0))
    cond = torch.zeros(8, 2, SIZE, SIZE)
    ref = _ddim(model, cond, noise, 1000)
    # the ODE maps each noise value to its quantile in the data: x0 = mu + s * noise
    assert (ref - (mu + s * noise).clamp(-1, 1)).pow(2).mean().sqrt() < 0.005  # the sampler clips x0 to [-1, 1]
    err = {(name, steps): float((sample(model, cond, noise, steps) - ref).pow(2).mean().sqrt())
           for name, sample in (("ddim", _ddim), ("dpmpp_2m", _dpmpp_2m)) for steps in (20, 40)}
    ratio = err["ddim", 20] / err["dpmpp_2m", 20]
    print(f"RMS error against 1000 DDIM steps: {err}; DDIM / DPM-Solver++ at 20 steps: {ratio:.1f}")
    assert ratio > 4
    assert err["dpmpp_2m", 20] < 0.01
    assert err["dpmpp_2m", 20] / err["dpmpp_2m", 40] > 3 and err["ddim", 20] / err["ddim", 40] < 2.5
    for sample, tolerance in ((ref, 0.02), (_dpmpp_2m(model, cond, noise, 20), 0.05), (_ddim(model, cond, noise, 20), 0.15)):
        assert abs(float(sample.mean()) - mu) < 0.01
        assert abs(float(sample.std()) - s) < tolerance * s


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


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_generated_images_follow_mask(trained, data, sampler):
    masks = data[1][1:3]  # two disc slices
    model = trained[0]
    model.cfg = dataclasses.replace(model.cfg, sampler=sampler)
    try:
        images = generate_images(model, masks, seed=0)
    finally:
        model.cfg = dataclasses.replace(model.cfg, sampler="ddim")
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


def test_one_epoch_model_samples_with_each_sampler_and_its_checkpoint_keeps_the_sampler(data, tmp_path, capsys):
    images, masks = data
    model, _ = train_diffusion(images, masks, tiny_cfg(epochs=1, sampler="dpmpp_2m"), out_dir=tmp_path, progress=False)
    loaded, cfg, _ = load_diffusion(tmp_path / CHECKPOINT_NAME)
    assert cfg.sampler == loaded.cfg.sampler == "dpmpp_2m" and cfg == model.cfg
    out = {}
    for sampler in ("ddim", "dpmpp_2m"):
        loaded.cfg = dataclasses.replace(cfg, sampler=sampler)
        out[sampler] = generate_images(loaded, masks[:3], seed=0, batch_size=2, progress=True)
        assert out[sampler].shape == (3, 1, SIZE, SIZE) and out[sampler].dtype == np.float32
        assert np.isfinite(out[sampler]).all()
    err = capsys.readouterr().err
    assert "DDIM sampling, 3 images" in err and "DPM-Solver++(2M) sampling, 3 images" in err and "8/8" in err
    assert not np.allclose(out["ddim"], out["dpmpp_2m"])
    np.testing.assert_allclose(generate_images(loaded, masks[:3], seed=0), out["dpmpp_2m"], atol=1e-5)
    # a checkpoint written before the sampler existed loads with DDIM
    ckpt = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    del ckpt["config"]["sampler"]
    torch.save(ckpt, tmp_path / "old.pt")
    assert load_diffusion(tmp_path / "old.pt")[1].sampler == "ddim"
    # the sampler is a sampling setting: resuming with another one is not refused
    resumed, history = train_diffusion(images, masks, tiny_cfg(epochs=1), out_dir=tmp_path, progress=False)
    assert resumed.cfg.sampler == "ddim" and len(history) == 1


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
