"""Tests for lib.vae on tiny synthetic disc data (32x32, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lib.vae as vae_mod
from lib.generative import epoch_indices
from lib.vae import (
    PairVAE,
    VAEConfig,
    interpolate,
    load_vae,
    predict_latent_segmenter,
    reconstruct,
    sample_pairs,
    save_vae,
    train_latent_segmenter,
    train_vae,
)
from tests import helpers

SIZE = 32


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One intra-op thread: on a busy 2-core box OpenMP oversubscription costs ~8x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_discs(n: int = 18, size: int = SIZE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    return helpers.make_discs(n, size, seed, margin=8, radius=(3, 7))


def tiny_cfg(**kw) -> VAEConfig:
    base = {
        "image_size": SIZE,
        "in_channels": 1,
        "num_classes": 2,
        "latent_dim": 8,
        "base_channels": 4,
        "kl_warmup_epochs": 2,
        "epochs": 2,
        "batch_size": 8,
        "lr": 3e-3,
        "seed": 0,
    }
    return VAEConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return make_discs()


@pytest.fixture(scope="module")
def trained(data):
    images, masks = data
    return train_vae(images, masks, tiny_cfg(epochs=3), progress=False)


def test_config_round_trip():
    cfg = tiny_cfg(time_budget_min=1.5)
    assert VAEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        VAEConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_forward_shapes(data):
    images, masks = data
    model = PairVAE(SIZE, 1, 2, latent_dim=8, base_channels=8)
    x, m = torch.from_numpy(images[:4]), torch.from_numpy(masks[:4])
    mu, logvar = model.encode(x, m)
    assert mu.shape == logvar.shape == (4, 8)
    image, logits = model.decode(mu)
    assert image.shape == (4, 1, SIZE, SIZE) and logits.shape == (4, 2, SIZE, SIZE)
    out = model(x, m)
    assert out.image_scaled.shape == (4, 1, SIZE, SIZE) and out.mask_logits.shape == (
        4,
        2,
        SIZE,
        SIZE,
    )
    assert out.image_scaled.abs().max() <= 1


def test_bad_image_size_rejected():
    with pytest.raises(ValueError, match="power of two"):
        PairVAE(48, 1, 2)


def test_loss_falls(data):
    images, masks = data
    _, history = train_vae(images, masks, tiny_cfg(epochs=5, kl_warmup_epochs=0), progress=False)
    assert [r["epoch"] for r in history] == list(range(1, 6))
    assert set(history[0]) == {
        "epoch",
        "loss",
        "recon_image",
        "recon_mask",
        "kl",
        "beta",
        "seconds",
    }
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]


def test_kl_warmup_ramps_from_zero(trained):
    _, history = trained
    assert [r["beta"] for r in history] == [0.0, 0.5, 1.0]


def test_sample_pairs(trained):
    model, _ = trained
    images, masks = sample_pairs(model, 5, seed=1, batch_size=2)
    assert images.shape == (5, 1, SIZE, SIZE) and images.dtype == np.float32
    assert masks.shape == (5, SIZE, SIZE) and masks.dtype == np.uint8
    assert set(np.unique(masks)) <= {0, 1}
    lo = (model.scaling.center - model.scaling.half_range).item()
    hi = (model.scaling.center + model.scaling.half_range).item()
    assert np.isfinite(images).all() and lo - 1e-4 <= images.min() and images.max() <= hi + 1e-4
    again = sample_pairs(model, 5, seed=1)
    np.testing.assert_allclose(again[0], images, atol=1e-5)
    np.testing.assert_array_equal(again[1], masks)
    assert not np.allclose(sample_pairs(model, 5, seed=2)[0], images)


def test_untrained_model_refuses_to_sample():
    with pytest.raises(RuntimeError, match="untrained"):
        sample_pairs(PairVAE(SIZE, 1, 2, latent_dim=8, base_channels=8), 2)


def test_save_load_round_trip(trained, tmp_path):
    model, history = trained
    cfg = tiny_cfg(epochs=3)
    path = save_vae(tmp_path / "vae.pt", model, cfg, history)
    loaded, cfg2, history2 = load_vae(path)
    assert cfg2 == cfg and history2 == history and loaded.trained_epochs == 3
    a, b = sample_pairs(model, 4, seed=3), sample_pairs(loaded, 4, seed=3)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_load_rejects_wrong_kind_and_corrupt(tmp_path):
    wrong = tmp_path / "unet.pt"
    torch.save({"kind": "unet", "version": 1}, wrong)
    with pytest.raises(ValueError, match="unet.pt"):
        load_vae(wrong)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.pt"):
        load_vae(corrupt)


def test_reconstruct_and_interpolate(trained, data):
    model, _ = trained
    images, masks = data
    rec_i, rec_m = reconstruct(model, images[:3], masks[:3])
    assert rec_i.shape == (3, 1, SIZE, SIZE) and rec_m.shape == (3, SIZE, SIZE)
    assert rec_m.dtype == np.uint8
    it_i, it_m = interpolate(model, (images[0], masks[0]), (images[1], masks[1]), steps=5)
    assert it_i.shape == (5, 1, SIZE, SIZE) and it_m.shape == (5, SIZE, SIZE)
    np.testing.assert_allclose(it_i[0], rec_i[0], atol=1e-4)


def test_resume_continues_and_matches_uninterrupted(data, tmp_path):
    images, masks = data
    _, h2 = train_vae(images, masks, tiny_cfg(epochs=2), out_dir=tmp_path / "a", progress=False)
    assert len(h2) == 2
    model, h4 = train_vae(images, masks, tiny_cfg(epochs=4), out_dir=tmp_path / "a", progress=False)
    assert [r["epoch"] for r in h4] == [1, 2, 3, 4] and h4[:2] == h2
    assert model.trained_epochs == 4 and load_vae(tmp_path / "a" / "vae.pt")[0].trained_epochs == 4
    straight, _ = train_vae(images, masks, tiny_cfg(epochs=4), progress=False)
    for p, q in zip(model.parameters(), straight.parameters()):
        torch.testing.assert_close(p, q)


def test_resume_with_other_config_raises(data, tmp_path):
    images, masks = data
    train_vae(images, masks, tiny_cfg(epochs=1), out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="latent_dim"):
        train_vae(images, masks, tiny_cfg(epochs=2, latent_dim=4), out_dir=tmp_path, progress=False)


def test_nan_guard_keeps_last_checkpoint(data, tmp_path, monkeypatch):
    images, masks = data
    train_vae(images, masks, tiny_cfg(epochs=1), out_dir=tmp_path, progress=False)
    real_loss = vae_mod.vae_loss

    def nan_loss(*args, **kw):
        terms = real_loss(*args, **kw)
        return {**terms, "loss": terms["loss"] * float("nan")}

    monkeypatch.setattr(vae_mod, "vae_loss", nan_loss)
    with pytest.raises(RuntimeError, match="epoch 2"):
        train_vae(images, masks, tiny_cfg(epochs=3), out_dir=tmp_path, progress=False)
    model, _, history = load_vae(tmp_path / "vae.pt")
    assert model.trained_epochs == 1 and len(history) == 1


def test_time_budget_stops_early(data):
    images, masks = data
    model, history = train_vae(
        images, masks, tiny_cfg(epochs=5, time_budget_min=1e-6), progress=False
    )
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


def test_latent_segmenter(trained, data):
    model, _ = trained
    images, masks = data
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seg = train_latent_segmenter(
        model, images, masks, epochs=2, lr=3e-3, batch_size=8, device="cpu", seed=0, progress=False
    )
    pred = predict_latent_segmenter(seg, images[:5])
    assert pred.shape == (5, SIZE, SIZE) and pred.dtype == np.uint8
    assert len(seg.history) == 2 and np.isfinite(seg.history[-1]["dice_ce"])
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])
