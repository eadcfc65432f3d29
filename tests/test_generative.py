"""The shared generative trainer, on a toy generator (the real ones have their own tests)."""

from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
from torch import nn

from lib.synth import generative
from lib.synth.generative import (
    Generative,
    GeneratorConfig,
    Step,
    TrainingCollapsed,
    budget_for,
    load_generator,
    train_generator,
)
from tests.helpers import make_discs


@dataclass
class ToyConfig(GeneratorConfig):
    image_size: int = 16
    epochs: int = 3
    batch_size: int = 8
    lr: float = 1e-2
    ema_decay: float | None = 0.9


class Toy(Generative):
    """Maps a one-hot mask to an image with one convolution (a tiny mask-to-image generator)."""

    KIND = "toy"
    CONFIG = ToyConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        self.net = nn.Conv2d(cfg.num_classes + 1, cfg.in_channels, 3, padding=1)
        self.register_buffer("offset", torch.zeros(1))

    def fit_data(self, images, masks):
        self.offset.fill_(float(images.mean()))

    def make_optimizers(self):
        return {"g": torch.optim.Adam(self.net.parameters(), lr=self.cfg.lr)}

    def ema_module(self):
        return self.net

    def forward(self, masks, noise):
        onehot = nn.functional.one_hot(masks, self.cfg.num_classes).permute(0, 3, 1, 2).float()
        return self.net(torch.cat([onehot, noise], 1)) + self.offset

    def train_step(self, images, masks, step: Step):
        noise = torch.randn(images[:, :1].shape, generator=step.noise, device=images.device)
        loss = nn.functional.mse_loss(self(masks, noise), images)
        step.optimizers["g"].zero_grad()
        loss.backward()
        step.optimizers["g"].step()
        return {"loss": loss}

    @torch.no_grad()
    def sample(self, masks, seed):
        noise = torch.randn((len(masks), 1, *masks.shape[1:]), generator=torch.Generator().manual_seed(seed))
        return self(torch.from_numpy(masks).long(), noise).numpy()


@pytest.fixture(scope="module")
def data():
    return make_discs(48, 16, seed=0, margin=5, radius=(2, 4))


def test_loss_falls_and_sampling_weights_are_the_average(data, tmp_path):
    images, masks = data
    model, history = train_generator(Toy, images, masks, ToyConfig(epochs=6), out_dir=tmp_path, progress=False)
    assert history[-1]["loss"] < history[0]["loss"] and model.trained_epochs == 6
    assert model.offset.item() == pytest.approx(float(images.mean()), rel=1e-5)
    state = torch.load(tmp_path / "toy.pt", weights_only=True)
    assert "train_state" not in state  # the sampling checkpoint holds no optimiser state
    raw = torch.load(tmp_path / "toy.train.pt", weights_only=True)["train_state"]["model"]["net.weight"]
    assert torch.equal(state["state_dict"]["net.weight"], model.net.weight.detach())  # EMA weights sample
    assert not torch.equal(raw, model.net.weight.detach())


def test_resume_equals_a_straight_run_and_reload_samples_identically(data, tmp_path, monkeypatch):
    images, masks = data
    straight, h1 = train_generator(Toy, images, masks, ToyConfig(epochs=4), out_dir=tmp_path / "a", progress=False)
    train_generator(Toy, images, masks, ToyConfig(epochs=2), out_dir=tmp_path / "b", progress=False)
    resumed, h2 = train_generator(Toy, images, masks, ToyConfig(epochs=4), out_dir=tmp_path / "b", progress=False)
    assert [r["loss"] for r in h1] == pytest.approx([r["loss"] for r in h2], rel=1e-5)
    assert np.allclose(straight.sample(masks[:4], 1), resumed.sample(masks[:4], 1), atol=1e-5)
    loaded, cfg, history = load_generator(Toy, tmp_path / "a" / "toy.pt")
    assert cfg == ToyConfig(epochs=4) and len(history) == 4
    assert np.allclose(loaded.sample(masks[:4], 1), straight.sample(masks[:4], 1), atol=1e-6)


def test_a_generator_kept_without_its_training_state_is_reused_not_trained_further(data, tmp_path):
    images, masks = data
    model, _ = train_generator(Toy, images, masks, ToyConfig(epochs=2), out_dir=tmp_path, keep_train_state=False,
                               progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy.pt"]
    again, history = train_generator(Toy, images, masks, ToyConfig(epochs=2), out_dir=tmp_path, progress=False)
    assert len(history) == 2 and np.allclose(again.sample(masks[:4], 1), model.sample(masks[:4], 1), atol=1e-6)
    with pytest.raises(ValueError, match="without its training state.*beyond epoch 2"):
        train_generator(Toy, images, masks, ToyConfig(epochs=3), out_dir=tmp_path, progress=False)


def test_time_budget_and_mismatched_resume(data, tmp_path):
    images, masks = data
    _, history = train_generator(Toy, images, masks, ToyConfig(epochs=50, time_budget_min=1e-6),
                                 out_dir=tmp_path, progress=False)
    assert len(history) == 1  # one epoch always runs; the budget stops the rest
    _, history = train_generator(Toy, images, masks, ToyConfig(epochs=50, time_budget_min=1e-6),
                                 out_dir=tmp_path, progress=False)
    assert len(history) == 1  # resumed: the budget was spent by the earlier session, no new epoch
    _, history = train_generator(Toy, images, masks, ToyConfig(epochs=50, time_budget_min=1e-6 + 1),
                                 out_dir=tmp_path, progress=False)
    assert len(history) == 50  # a larger budget trains on
    with pytest.raises(ValueError, match="different config .*lr"):
        train_generator(Toy, images, masks, ToyConfig(lr=0.5), out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="other images/masks"):
        train_generator(Toy, images[:40], masks[:40], ToyConfig(), out_dir=tmp_path, progress=False)


def test_nan_and_collapse_stop_and_keep_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    images, masks = data
    train_generator(Toy, images, masks, ToyConfig(epochs=1), out_dir=tmp_path, progress=False)
    good = torch.load(tmp_path / "toy.pt", weights_only=True)["state_dict"]["net.weight"]
    monkeypatch.setattr(Toy, "train_step", lambda self, x, m, step: {"loss": torch.tensor(float("nan"))})
    with pytest.raises(TrainingCollapsed, match="non-finite loss .*epoch 2"):
        train_generator(Toy, images, masks, ToyConfig(epochs=2), out_dir=tmp_path, progress=False)
    monkeypatch.undo()

    def collapse(self, row, history):
        raise TrainingCollapsed("discriminator wins")

    monkeypatch.setattr(Toy, "check_epoch", collapse)
    with pytest.raises(TrainingCollapsed, match="discriminator wins"):
        train_generator(Toy, images, masks, ToyConfig(epochs=2), out_dir=tmp_path, progress=False)
    kept = torch.load(tmp_path / "toy.pt", weights_only=True)
    assert kept["epoch"] == 1 and torch.equal(kept["state_dict"]["net.weight"], good)


def test_loading_refuses_untrained_mismatched_and_broken_checkpoints(data, tmp_path):
    images, masks = data
    train_generator(Toy, images, masks, ToyConfig(epochs=1), out_dir=tmp_path, progress=False)
    ckpt = torch.load(tmp_path / "toy.pt", weights_only=True)
    torch.save(ckpt | {"epoch": 0}, tmp_path / "untrained.pt")
    with pytest.raises(RuntimeError, match="untrained"):
        load_generator(Toy, tmp_path / "untrained.pt")
    torch.save(ckpt | {"kind": "pair_vae"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="kind is 'pair_vae'"):
        load_generator(Toy, tmp_path / "other.pt")
    torch.save(ckpt | {"config": ckpt["config"] | {"num_classes": 3}}, tmp_path / "mismatch.pt")
    with pytest.raises(ValueError, match="inconsistent Toy checkpoint"):
        load_generator(Toy, tmp_path / "mismatch.pt")
    (tmp_path / "half.pt").write_bytes((tmp_path / "toy.pt").read_bytes()[:200])
    with pytest.raises(ValueError, match="half.pt: not a readable"):
        load_generator(Toy, tmp_path / "half.pt")


def test_bad_data_is_refused():
    images, masks = make_discs(4, 16)
    with pytest.raises(ValueError, match="mask values"):
        generative.check_pairs(images, masks + 5, 16, 1, 2)
    with pytest.raises(ValueError, match="N>0"):
        generative.check_pairs(images[:0], masks[:0], 16, 1, 2)
    assert replace(ToyConfig(), seed=1).seed == 1


def test_time_budget_per_generator():
    assert budget_for(15.0, "vae") == 15.0 and budget_for(None, "vae") is None
    assert budget_for({"vae": 10, "spade_gan": 30}, "spade_gan") == 30
    with pytest.raises(KeyError, match="no entry for generator 'diffusion'"):
        budget_for({"vae": 10}, "diffusion")
