from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from lib.common.env import amp_dtype, autocast
from lib.data.slices import SliceConfig, build_cache, load_slices
from lib.data.task import read_task
from lib.seg import train as train_mod
from lib.seg.checkpoint import load_model, read_checkpoint
from lib.seg.forward import predict_probs
from lib.seg.models import ModelConfig, build_model, check_image_size
from lib.seg.train import TrainConfig, fit, lr_factor, out_of_patience, patient_dice, sample_indices
from tests.helpers import make_task

SIZE = 32
DATA = {"image_size": SIZE, "num_classes": 2}


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("task")
    task = read_task(make_task(root / "t", 5, shape=(40, 40, 10)))
    cache = build_cache(task, root / "cache", SliceConfig(image_size=SIZE), workers=1, progress=False)
    return load_slices(cache, ["p00", "p01", "p02"]), load_slices(cache, ["p03"]), load_slices(cache, ["p04"])


def small_model(**kw):
    return ModelConfig(arch="unet", encoder_name="resnet18", encoder_depth=3,
                       decoder={"decoder_channels": [32, 16, 8]}, **kw)


def cfg(**kw):
    base = dict(epochs=2, batch_size=8, lr=3e-3, warmup_steps=2, augment=None, device="cpu", patience=None,
                checkpoint_minutes=0)
    return TrainConfig(**(base | kw))


def test_loss_falls_and_model_learns(sets, tmp_path):
    train, val, _ = sets
    result = fit(train, val, small_model(), cfg(epochs=6), tmp_path, DATA, progress=False)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.7 * losses[0]
    assert result.best_val_dice > 0.5
    assert {"epoch", "train_loss", "val_loss", "val_dice", "lr", "seconds", "data_wait_share"} <= set(result.history[0])


def test_save_load_gives_identical_predictions(sets, tmp_path):
    train, val, test = sets
    result = fit(train, val, small_model(), cfg(epochs=1), tmp_path, DATA, progress=False)
    model, meta = load_model(tmp_path / "best.pt", expected={"data": DATA})
    assert meta["model_config"]["arch"] == "unet" and meta["data"] == DATA
    a = predict_probs(result.model, test.images)
    b = predict_probs(model, test.images)
    assert torch.equal(a, b)


def test_interrupted_run_resumes_exactly(sets, tmp_path, monkeypatch):
    train, val, _ = sets
    run_cfg = cfg(epochs=3, augment=train_mod.AugmentConfig())
    straight = fit(train, val, small_model(), run_cfg, tmp_path / "a", DATA, progress=False)
    calls = {"n": 0}
    real_predict = train_mod.predict_probs

    def interrupt_in_epoch_2(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # e.g. a Colab disconnect during epoch 2's validation
        return real_predict(*args, **kwargs)

    monkeypatch.setattr(train_mod, "predict_probs", interrupt_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        fit(train, val, small_model(), run_cfg, tmp_path / "b", DATA, progress=False)
    assert read_checkpoint(tmp_path / "b" / "last.pt")["epoch"] == 1
    monkeypatch.setattr(train_mod, "predict_probs", real_predict)
    resumed = fit(train, val, small_model(), run_cfg, tmp_path / "b", DATA, progress=False)
    assert len(resumed.history) == 3
    assert [h["train_loss"] for h in resumed.history] == pytest.approx([h["train_loss"] for h in straight.history])
    best_a, best_b = read_checkpoint(tmp_path / "a" / "best.pt"), read_checkpoint(tmp_path / "b" / "best.pt")
    for k in best_a["state_dict"]:
        assert torch.allclose(best_a["state_dict"][k].float(), best_b["state_dict"][k].float(), atol=1e-5), k
    for run in ("a", "b"):  # a finished run keeps best.pt and its record, not last.pt
        assert not (tmp_path / run / "last.pt").exists() and (tmp_path / run / "fit.json").is_file()


def test_finished_run_is_reused_and_keep_none_leaves_no_checkpoint(sets, tmp_path):
    train, val, _ = sets
    first = fit(train, val, small_model(), cfg(epochs=1), tmp_path / "a", DATA, progress=False)
    again = fit(train, val, small_model(), cfg(epochs=1), tmp_path / "a", DATA, progress=False)
    assert again.history == first.history and again.best_val_dice == first.best_val_dice
    x = torch.from_numpy(val.images[:4]).float()
    assert torch.allclose(first.model(x), again.model(x), atol=1e-5)
    trial = fit(train, val, small_model(), cfg(epochs=1), tmp_path / "b", DATA, keep="none", progress=False)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["fit.json", "history.json"]
    reused = fit(train, val, small_model(), cfg(epochs=1), tmp_path / "b", DATA, keep="none", progress=False)
    assert reused.model is None and reused.best_val_dice == trial.best_val_dice
    with pytest.raises(ValueError, match="image_size"):
        fit(train, val, small_model(), cfg(epochs=1), tmp_path / "b", DATA | {"image_size": 64}, progress=False)


def test_fine_tuning_starts_from_the_given_model(sets, tmp_path):
    train, val, _ = sets
    pre = fit(train, val, small_model(), cfg(epochs=1), tmp_path / "pre", DATA, progress=False).model
    still = cfg(epochs=1, lr=1e-12, weight_decay=0.0)  # a step too small to move the weights
    fine = fit(train, val, small_model(), still, tmp_path / "fine", DATA, init=pre, progress=False).model
    fresh = fit(train, val, small_model(), replace(still, seed=1), tmp_path / "fresh", DATA, progress=False).model
    weights = lambda m: torch.cat([p.detach().flatten() for p in m.parameters()])  # noqa: E731
    assert torch.allclose(weights(fine), weights(pre), atol=1e-6)
    assert not torch.allclose(weights(fresh), weights(pre), atol=1e-3)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(sets, tmp_path, monkeypatch):
    train, val, _ = sets
    real_loss = train_mod.loss_fn(2)
    calls = {"n": 0, "epoch_1": int(np.ceil(len(train) / 8)) + 1}  # epoch 1's steps and its validation

    class NanAfterEpoch1(torch.nn.Module):
        def forward(self, logits, target):
            calls["n"] += 1
            return real_loss(logits, target) * (1.0 if calls["n"] <= calls["epoch_1"] else float("nan"))

    monkeypatch.setattr(train_mod, "loss_fn", lambda num_classes: NanAfterEpoch1())
    with pytest.raises(FloatingPointError, match="epoch 2"):
        fit(train, val, small_model(), cfg(epochs=2), tmp_path, DATA, progress=False)
    kept = read_checkpoint(tmp_path / "last.pt")
    assert kept["epoch"] == 1 and (tmp_path / "best.pt").is_file() and not (tmp_path / "fit.json").exists()
    assert all(torch.isfinite(v).all() for v in kept["state_dict"].values() if v.is_floating_point())


def test_checkpoint_of_other_architecture_or_data_is_refused(sets, tmp_path):
    train, val, _ = sets
    fit(train, val, small_model(), cfg(epochs=1), tmp_path, DATA, progress=False)
    with pytest.raises(ValueError, match="arch"):
        fit(train, val, ModelConfig(arch="fpn", encoder_depth=3), cfg(epochs=2), tmp_path, DATA, progress=False)
    split = {"train": ["p00"], "val": ["p03"], "test": ["p04"]}
    with pytest.raises(ValueError, match="another patient split .*may have seen this run's test patients"):
        load_model(tmp_path / "best.pt", expected={"data": {"split": split}})
    with pytest.raises(ValueError, match="image_size"):
        load_model(tmp_path / "best.pt", expected={"data": {"image_size": 64}})
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_model(tmp_path / "junk.pt")


def test_time_budget_stops_gracefully(sets, tmp_path):
    train, val, _ = sets
    result = fit(train, val, small_model(), cfg(epochs=50, time_budget_min=1e-6, warmup_steps=0), tmp_path, DATA,
                 progress=False)
    assert result.stopped == "time budget" and len(result.history) == 1
    assert (tmp_path / "best.pt").is_file()
    assert result.history[0]["lr"] == pytest.approx(0.01 * 3e-3)  # the budget is spent: fully decayed
    again = fit(train, val, small_model(), cfg(epochs=50, time_budget_min=1e-6, warmup_steps=0), tmp_path, DATA,
                progress=False)
    assert again.stopped == "time budget" and len(again.history) == 1  # resuming trains no further


def test_lr_schedule_warms_up_then_decays_by_steps_or_time():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.505)
    assert lr_factor(90, 100, 10, schedule="constant") == 1.0 and lr_factor(0, 100, 10, schedule="constant") == 0.1
    assert TrainConfig(optimizer="sgd").schedule == "poly" and TrainConfig(lr_schedule="constant").schedule == "constant"
    with pytest.raises(ValueError, match="unknown lr_schedule"):
        TrainConfig(lr_schedule="step")
    assert lr_factor(100, 100, 10) == pytest.approx(0.01)
    assert lr_factor(19, 100, 10, time_fraction=0.5) == pytest.approx(0.505)  # time runs out before steps do
    assert lr_factor(20, 100, 10, time_fraction=2.0) == pytest.approx(0.01)
    assert lr_factor(55, 100, 10, schedule="poly") == pytest.approx(0.5 ** 0.9)  # nnU-Net's poly decay
    assert lr_factor(100, 100, 10, schedule="poly") == pytest.approx(0.0)
    assert lr_factor(19, 100, 10, time_fraction=0.5, schedule="poly") == pytest.approx(0.5 ** 0.9)


def test_sgd_recipe_learns_and_fit_json_records_the_recipe(sets, tmp_path):
    train, val, _ = sets
    result = fit(train, val, small_model(), cfg(epochs=6, lr=1e-2, optimizer="sgd"), tmp_path, DATA, progress=False)
    assert result.best_val_dice > 0.5
    sgd = train_mod.make_optimizer(result.model.parameters(), cfg(optimizer="sgd")).param_groups[0]
    assert sgd["momentum"] == 0.99 and sgd["nesterov"]  # as nnU-Net
    assert read_checkpoint(tmp_path / "best.pt")["train_config"]["optimizer"] == "sgd"
    record = train_mod.read_json(tmp_path / "fit.json")
    assert record["train_config"]["optimizer"] == "sgd" and record["train_config"]["lr"] == 1e-2
    assert "CPU" in record["hardware"] and record["hardware"].endswith(("fp32", "bf16"))
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        cfg(optimizer="adam")


def test_autocast_follows_amp_dtype():
    cpu = torch.device("cpu")
    conv, x = torch.nn.Conv2d(1, 2, 3), torch.randn(1, 1, 8, 8)
    with autocast(cpu):
        assert conv(x).dtype == (amp_dtype(cpu) or torch.float32)
    with autocast(cpu, enabled=False):
        assert conv(x).dtype == torch.float32


def test_early_stopping(sets, tmp_path):
    train, val, _ = sets
    result = fit(train, val, small_model(), cfg(epochs=20, lr=1e-9, warmup_steps=1, patience=2), tmp_path, DATA,
                 progress=False)
    assert result.stopped == "early stopping" and len(result.history) < 20


def test_early_stopping_waits_for_its_minutes_of_training(sets, tmp_path):
    history = [{"epoch": e, "seconds": 30.0} for e in range(1, 9)]  # half a minute per epoch, best at epoch 2
    assert not out_of_patience(cfg(patience=3, patience_minutes=5.0), history, 8, 2)  # 3 minutes since the best
    assert out_of_patience(cfg(patience=3, patience_minutes=2.5), history, 8, 2)
    assert out_of_patience(cfg(patience=3), history, 5, 2) and not out_of_patience(cfg(patience=3), history, 4, 2)
    assert not out_of_patience(cfg(patience=None, patience_minutes=0.1), history, 8, 2)
    train, val, _ = sets
    waits = cfg(epochs=3, lr=1e-9, warmup_steps=1, patience=1, patience_minutes=10.0)
    result = fit(train, val, small_model(), waits, tmp_path, DATA, progress=False)
    assert result.stopped == "epochs" and len(result.history) == 3  # 10 minutes never pass


def test_bad_model_requests():
    with pytest.raises(KeyError, match="unknown architecture"):
        build_model(ModelConfig(arch="unetzz"))
    with pytest.raises(KeyError, match="unknown encoder"):
        build_model(ModelConfig(encoder_name="resnet9000"))
    with pytest.raises(ValueError, match="not divisible by 32"):
        check_image_size(ModelConfig(arch="unet"), 100)
    check_image_size(ModelConfig(arch="pspnet"), 72)  # PSPNet's default depth 3: stride 8


def test_imagenet_offline_is_explained(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="encoder_weights=None"):
        build_model(ModelConfig(encoder_weights="imagenet"))


def test_foreground_oversampling():
    masks = np.zeros((100, 4, 4), np.uint8)
    masks[:10, 0, 0] = 1
    idx = sample_indices(masks, 1000, 0.5, np.random.default_rng(0))
    share = (masks[idx].reshape(1000, -1).max(1) > 0).mean()
    assert 0.45 < share < 0.55


def test_patient_dice_3d():
    probs = torch.zeros(4, 2, 2, 2)
    probs[:, 0] = 1
    probs[0, :, 0, 0] = torch.tensor([0.0, 1.0])  # patient a predicts one voxel
    truth = np.zeros((4, 2, 2), np.uint8)
    truth[0, 0, 0] = truth[1, 0, 0] = 1  # patient a has two voxels
    out = patient_dice(probs, truth, np.array(["a", "a", "b", "b"]))
    assert out["a"] == pytest.approx(2 / 3) and np.isnan(out["b"])


def test_msdseg_amp_0_forces_fp32(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setenv("MSDSEG_AMP", "0")
    assert amp_dtype(cpu) is None and amp_dtype(gpu) is None
    with autocast(cpu):
        assert torch.nn.Linear(2, 2)(torch.ones(1, 2)).dtype == torch.float32


def test_slices_added_on_top_leave_the_real_batches_and_steps_unchanged(sets, tmp_path, monkeypatch):
    train, val, _ = sets
    seen: dict[str, list[torch.Tensor]] = {"plain": [], "on_top": []}
    real_loss = train_mod.loss_fn

    def spy(name):
        class Spy(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.loss = real_loss(2)

            def forward(self, logits, target):
                if torch.is_grad_enabled() and logits.requires_grad:  # training steps, not validation
                    seen[name].append(target.clone())
                return self.loss(logits, target)
        return lambda num_classes: Spy()

    run_cfg = cfg(epochs=2, augment=train_mod.AugmentConfig())
    monkeypatch.setattr(train_mod, "loss_fn", spy("plain"))
    fit(train, val, small_model(), run_cfg, tmp_path / "plain", DATA, progress=False)
    synthetic = train.subset(np.arange(5))
    monkeypatch.setattr(train_mod, "loss_fn", spy("on_top"))
    result = fit(train, val, small_model(), run_cfg, tmp_path / "on_top", DATA, synthetic=synthetic,
                 synthetic_per_batch=3, progress=False)
    assert len(seen["on_top"]) == len(seen["plain"]) > 1  # the same optimiser steps
    for plain, on_top in zip(seen["plain"], seen["on_top"]):
        assert len(on_top) == len(plain) + 3 and torch.equal(on_top[:len(plain)], plain)  # the same real batches
    assert result.history[0]["slices_per_s"] > 0
    with pytest.raises(ValueError, match="needs synthetic slices"):
        fit(train, val, small_model(), run_cfg, tmp_path / "x", DATA, synthetic_per_batch=2, progress=False)
    with pytest.raises(ValueError, match="do not match"):
        bad = train.subset(np.arange(2))
        bad = replace(bad, images=bad.images[:, :, :8, :8])
        fit(train, val, small_model(), run_cfg, tmp_path / "y", DATA, synthetic=bad, synthetic_per_batch=2,
            progress=False)


def test_last_checkpoint_is_written_only_every_checkpoint_minutes(sets, tmp_path, monkeypatch):
    train, val, _ = sets
    writes = []
    real_save = train_mod.save_checkpoint
    monkeypatch.setattr(train_mod, "save_checkpoint", lambda path, *a, **k: writes.append(Path(path).name)
                        or real_save(path, *a, **k))
    fit(train, val, small_model(), cfg(epochs=3, checkpoint_minutes=60), tmp_path / "a", DATA, progress=False)
    assert "last.pt" not in writes and "best.pt" in writes  # a short run never writes the resume file
    writes.clear()
    fit(train, val, small_model(), cfg(epochs=3), tmp_path / "b", DATA, progress=False)
    assert writes.count("last.pt") == 3
