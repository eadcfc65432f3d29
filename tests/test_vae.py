"""Tests for lib.synth.vae (PairVAE and PairVAEGAN) and the latent segmenter of lib.study.latent,
on tiny synthetic disc data (32x32, CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch

from lib.study import latent as latent_mod
from lib.study.latent import predict_latent_segmenter, train_latent_segmenter
from lib.synth import vae as vae_mod
from lib.synth.generative import TrainingCollapsed, epoch_indices
from lib.synth.vae import (
    CHECKPOINT_NAME,
    GAN_CHECKPOINT_NAME,
    PairVAE,
    PairVAEGAN,
    VAEConfig,
    VAEGANConfig,
    interpolate,
    load_vae,
    reconstruct,
    sample_pairs,
    train_vae,
)
from tests import helpers

SIZE = 32
KINDS = ("vae", "vae_gan")
VAE_KEYS = {"epoch", "loss", "recon_image", "recon_mask", "kl", "beta", "seconds"}


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One intra-op thread: on a busy 2-core box OpenMP oversubscription costs ~8x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_cfg(kind: str = "vae", **kw) -> VAEConfig:
    base = {"image_size": SIZE, "latent_dim": 8, "base_channels": 4, "kl_warmup_epochs": 2, "epochs": 2,
            "batch_size": 8, "lr": 3e-3, "seed": 0}
    if kind == "vae":
        return VAEConfig(**base | kw)
    return VAEGANConfig(**base | {"disc_channels": 4, "disc_layers": 2, "disc_lr": 2e-3} | kw)


def checkpoint(out_dir: Path, kind: str) -> Path:
    return out_dir / (CHECKPOINT_NAME if kind == "vae" else GAN_CHECKPOINT_NAME)


class Trained(NamedTuple):
    cfg: VAEConfig
    out_dir: Path
    model: PairVAE
    history: list[dict]


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return helpers.make_discs(18, SIZE, 0, margin=8, radius=(3, 7))


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory) -> dict[str, Trained]:
    """Each kind trained for 4 epochs in one go, with a checkpoint."""
    runs = {}
    for kind in KINDS:
        cfg, out_dir = tiny_cfg(kind, epochs=4), tmp_path_factory.mktemp(kind)
        runs[kind] = Trained(cfg, out_dir, *train_vae(*data, cfg, out_dir=out_dir, progress=False))
    return runs


def test_config_round_trip():
    for cfg in (tiny_cfg(time_budget_min=1.5), tiny_cfg("vae_gan", adv_weight=0.2)):
        assert type(cfg).from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        VAEConfig.from_dict({**tiny_cfg().to_dict(), "bogus": 1})


def test_forward_shapes(data):
    images, masks = data
    model = PairVAE(tiny_cfg(base_channels=8))
    x, m = torch.from_numpy(images[:4]), torch.from_numpy(masks[:4])
    mu, logvar = model.encode(x, m)
    assert mu.shape == logvar.shape == (4, 8)
    image, logits = model.decode(mu)
    assert image.shape == (4, 1, SIZE, SIZE) and logits.shape == (4, 2, SIZE, SIZE)
    out = model(x, m)
    assert out.image_scaled.shape == (4, 1, SIZE, SIZE) and out.mask_logits.shape == (4, 2, SIZE, SIZE)
    assert out.image_scaled.abs().max() <= 1


def test_bad_sizes_rejected():
    with pytest.raises(ValueError, match="power of two"):
        PairVAE(tiny_cfg(image_size=48))
    with pytest.raises(ValueError, match="disc_layers=4 is too deep for image_size 32: use at most 3"):
        PairVAEGAN(tiny_cfg("vae_gan", disc_layers=4))


@pytest.mark.parametrize("kind", KINDS)
def test_loss_falls(straight, kind):
    run = straight[kind]
    assert isinstance(run.model, PairVAEGAN) == (kind == "vae_gan") and run.model.trained_epochs == 4
    history = run.history
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    gan_keys = {"vae_loss", "g_adv", "feature_match", "d_loss"} if kind == "vae_gan" else set()
    assert set(history[0]) == VAE_KEYS | gan_keys
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]
    assert history[-1]["recon_image"] < 0.7 * history[0]["recon_image"]


def test_kl_warmup_ramps_from_zero(straight):
    assert [r["beta"] for r in straight["vae"].history] == [0.0, 0.5, 1.0, 1.0]


def test_sample_pairs(straight):
    model = straight["vae"].model
    images, masks = sample_pairs(model, 5, seed=1, batch_size=2)
    assert images.shape == (5, 1, SIZE, SIZE) and images.dtype == np.float32
    assert masks.shape == (5, SIZE, SIZE) and masks.dtype == np.uint8
    assert set(np.unique(masks)) <= {0, 1}
    lo, hi = model.scaling.lo.item(), model.scaling.hi.item()
    assert np.isfinite(images).all() and lo - 1e-4 <= images.min() and images.max() <= hi + 1e-4
    again = sample_pairs(model, 5, seed=1)
    np.testing.assert_allclose(again[0], images, atol=1e-5)
    np.testing.assert_array_equal(again[1], masks)
    assert not np.allclose(sample_pairs(model, 5, seed=2)[0], images)
    assert sample_pairs(model, 0)[0].shape == (0, 1, SIZE, SIZE)


@pytest.mark.parametrize("kind", KINDS)
def test_untrained_model_refuses_to_sample(kind):
    model = PairVAE(tiny_cfg()) if kind == "vae" else PairVAEGAN(tiny_cfg(kind))
    with pytest.raises(RuntimeError, match="untrained"):
        sample_pairs(model, 2)


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(straight, kind):
    run = straight[kind]
    loaded, cfg, history = load_vae(checkpoint(run.out_dir, kind))
    assert type(loaded) is type(run.model) and type(cfg) is type(run.cfg)
    assert cfg == run.cfg and history == run.history and loaded.trained_epochs == 4
    a, b = sample_pairs(run.model, 4, seed=3), sample_pairs(loaded, 4, seed=3)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize("kind", KINDS)
def test_resume_matches_a_straight_run(straight, data, tmp_path, kind):
    run = straight[kind]
    _, h2 = train_vae(*data, tiny_cfg(kind, epochs=2), out_dir=tmp_path, progress=False)
    model, h4 = train_vae(*data, run.cfg, out_dir=tmp_path, progress=False)
    assert [r["epoch"] for r in h4] == [1, 2, 3, 4] and h4[:2] == h2 and model.trained_epochs == 4
    for resumed, whole in zip(h4, run.history, strict=True):
        assert {k: v for k, v in resumed.items() if k != "seconds"} == pytest.approx(
            {k: v for k, v in whole.items() if k != "seconds"}, rel=1e-4, abs=1e-6)
    a, b = sample_pairs(run.model, 4, seed=3), sample_pairs(model, 4, seed=3)
    np.testing.assert_allclose(a[0], b[0], atol=1e-4)
    np.testing.assert_array_equal(a[1], b[1])


def test_load_rejects_wrong_kind_and_corrupt(tmp_path):
    wrong = tmp_path / "unet.pt"
    torch.save({"kind": "unet", "version": 1}, wrong)
    with pytest.raises(ValueError, match="unet.pt"):
        load_vae(wrong)
    old = tmp_path / "vae.pt"  # the stand-alone trainer's format
    torch.save({"kind": "pair_vae", "version": 1}, old)
    with pytest.raises(ValueError, match="unsupported checkpoint version 1"):
        load_vae(old)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.pt"):
        load_vae(corrupt)
    with pytest.raises(FileNotFoundError):
        load_vae(tmp_path / "missing.pt")


@pytest.mark.parametrize("kind", KINDS)
def test_reconstruct_and_interpolate(straight, data, kind):
    model = straight[kind].model
    images, masks = data
    rec_i, rec_m = reconstruct(model, images[:3], masks[:3])
    assert rec_i.shape == (3, 1, SIZE, SIZE) and rec_m.shape == (3, SIZE, SIZE)
    assert rec_m.dtype == np.uint8
    it_i, it_m = interpolate(model, (images[0], masks[0]), (images[1], masks[1]), steps=5)
    assert it_i.shape == (5, 1, SIZE, SIZE) and it_m.shape == (5, SIZE, SIZE)
    np.testing.assert_allclose(it_i[0], rec_i[0], atol=1e-4)


def test_resume_with_other_config_raises(data, tmp_path):
    train_vae(*data, tiny_cfg("vae_gan", epochs=1), out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="adv_weight"):
        train_vae(*data, tiny_cfg("vae_gan", epochs=2, adv_weight=1.0), out_dir=tmp_path, progress=False)


def test_nan_guard_keeps_last_checkpoint(data, tmp_path, monkeypatch):
    train_vae(*data, tiny_cfg(epochs=1), out_dir=tmp_path, progress=False)
    real_loss = vae_mod.vae_loss

    def nan_loss(*args, **kw):
        terms = real_loss(*args, **kw)
        return {**terms, "loss": terms["loss"] * float("nan")}

    monkeypatch.setattr(vae_mod, "vae_loss", nan_loss)
    with pytest.raises(TrainingCollapsed, match="non-finite loss .*epoch 2"):
        train_vae(*data, tiny_cfg(epochs=3), out_dir=tmp_path, progress=False)
    model, _, history = load_vae(tmp_path / CHECKPOINT_NAME)
    assert model.trained_epochs == 1 and len(history) == 1


def test_discriminator_wins_stops_training_and_keeps_the_last_good_epoch(data, tmp_path, monkeypatch):
    real_step = PairVAEGAN.train_step

    def winning_discriminator(self, images, masks, step):
        terms = real_step(self, images, masks, step)
        return terms | {"d_loss": torch.tensor(1e-3), "g_adv": torch.tensor(0.5 + 0.1 * step.epoch)}

    monkeypatch.setattr(PairVAEGAN, "train_step", winning_discriminator)
    with pytest.raises(TrainingCollapsed, match="discriminator wins .* at epoch 3; .*keeps epoch 2"):
        train_vae(*data, tiny_cfg("vae_gan", epochs=6), out_dir=tmp_path, progress=False)
    model, _, history = load_vae(tmp_path / GAN_CHECKPOINT_NAME)
    assert isinstance(model, PairVAEGAN) and model.trained_epochs == 2 and len(history) == 2


def test_collapse_rule_needs_a_lasting_win():
    model = PairVAEGAN(tiny_cfg("vae_gan"))

    def rows(d_loss, g_adv):
        return [{"epoch": i + 1, "d_loss": d, "g_adv": g} for i, (d, g) in enumerate(zip(d_loss, g_adv))]

    healthy = rows([0.2, 0.01, 0.01], [0.3, 0.6, 0.9])  # the discriminator won only the last two epochs
    catching_up = rows([0.01, 0.01, 0.01], [0.9, 0.8, 0.7])  # the generator's adversarial loss falls
    for *history, row in (healthy, catching_up):
        model.check_epoch(row, history)
    *history, row = rows([0.01, 0.01, 0.01], [0.9, 0.8, 0.95])
    with pytest.raises(TrainingCollapsed, match="from 0.900 to 0.950"):
        model.check_epoch(row, history)


def test_time_budget_stops_early(data):
    model, history = train_vae(*data, tiny_cfg(epochs=5, time_budget_min=1e-6), progress=False)
    assert len(history) == 1 and model.trained_epochs == 1


def test_bad_data_rejected(data):
    images, masks = data
    with pytest.raises(ValueError, match="mask values"):
        train_vae(images, masks * 3, tiny_cfg(), progress=False)
    with pytest.raises(ValueError, match="images must have shape"):
        train_vae(images[:, :, :16, :16], masks, tiny_cfg(), progress=False)


def test_foreground_oversampling():
    has_fg = np.array([True] + [False] * 99)
    idx = epoch_indices(has_fg, 0.5, torch.Generator().manual_seed(0))
    assert len(idx) == 100 and 30 <= int((idx == 0).sum()) <= 70
    idx = epoch_indices(has_fg, None, torch.Generator().manual_seed(0))
    assert sorted(idx.tolist()) == list(range(100))


@pytest.mark.parametrize("kind", KINDS)
def test_latent_segmenter(straight, data, kind, monkeypatch):
    model = straight[kind].model
    images, masks = data
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seg = train_latent_segmenter(model, images, masks, epochs=2, lr=3e-3, batch_size=8, device="cpu", seed=0,
                                 progress=False)
    pred = predict_latent_segmenter(seg, images[:5])
    assert pred.shape == (5, SIZE, SIZE) and pred.dtype == np.uint8
    assert len(seg.history) == 2 and np.isfinite(seg.history[-1]["dice_ce"])
    steps = []
    monkeypatch.setattr(latent_mod, "_backward_step", lambda *a: steps.append(1))
    train_latent_segmenter(model, images, masks, steps=7, batch_size=8, device="cpu", seed=0, progress=False)
    assert len(steps) == 7  # an exact number of optimiser steps, the last epoch cut short
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])
