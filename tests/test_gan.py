import numpy as np
import pytest

from lib.synth import gan
from lib.synth.generative import TrainingCollapsed
from tests.helpers import make_discs

SIZE = 32


def cfg(**kw):
    base = dict(image_size=SIZE, channels=(8, 16), z_dim=8, spade_channels=8, disc_channels=8, disc_layers=2,
                epochs=3, batch_size=8, lr=2e-3, disc_lr=2e-3, ema_decay=0.9)
    return gan.SPADEGANConfig(**(base | kw))


@pytest.fixture(scope="module")
def data():
    return make_discs(48, SIZE, seed=0)


def test_reconstruction_improves_and_images_follow_the_masks(data, tmp_path):
    images, masks = data
    model, history = gan.train_gan(images, masks, cfg(epochs=6), out_dir=tmp_path, progress=False)
    assert history[-1]["l1"] < history[0]["l1"]
    assert {"loss", "d_loss", "adv", "feature_match", "l1", "kl", "seconds"} <= set(history[0])
    fake = gan.generate_images(model, masks, seed=0)
    assert fake.shape == images.shape and fake.dtype == np.float32 and np.isfinite(fake).all()
    inside = fake[:, 0][masks == 1].mean()
    outside = fake[:, 0][masks == 0].mean()
    assert inside > outside + 0.5  # the discs are bright in the real data, so in the generated images too
    assert not np.allclose(gan.generate_images(model, masks[:4], seed=1), gan.generate_images(model, masks[:4], seed=2))


def test_reload_gives_identical_images_and_resume_equals_a_straight_run(data, tmp_path):
    images, masks = data
    straight, h1 = gan.train_gan(images, masks, cfg(epochs=3), out_dir=tmp_path / "a", progress=False)
    gan.train_gan(images, masks, cfg(epochs=1), out_dir=tmp_path / "b", progress=False)
    resumed, h2 = gan.train_gan(images, masks, cfg(epochs=3), out_dir=tmp_path / "b", progress=False)
    assert [r["loss"] for r in h1] == pytest.approx([r["loss"] for r in h2], rel=1e-4)
    loaded, loaded_cfg, history = gan.load_gan(tmp_path / "a" / "spade_gan.pt")
    assert loaded_cfg == cfg(epochs=3) and len(history) == 3
    a = gan.generate_images(straight, masks[:4], seed=3)
    assert np.allclose(a, gan.generate_images(loaded, masks[:4], seed=3), atol=1e-5)
    assert np.allclose(a, gan.generate_images(resumed, masks[:4], seed=3), atol=1e-4)


def test_a_winning_discriminator_stops_training_only_when_the_generator_stalls():
    model = gan.SPADEGAN(cfg(collapse_d_loss=0.01, collapse_patience=3, l1_weight=10.0))
    row = lambda epoch, d, l1, fm: {"epoch": epoch, "d_loss": d, "l1": l1, "feature_match": fm, "adv": 1.0}  # noqa: E731
    improving = [row(1, 0.005, 0.12, 0.15), row(2, 0.004, 0.11, 0.14)]
    model.check_epoch(row(3, 0.003, 0.10, 0.13), improving)  # the generator still learns: go on
    model.check_epoch(row(3, 0.003, 0.12, 0.13), improving)  # feature matching still falls: go on
    model.check_epoch(row(3, 0.5, 0.2, 0.2), improving)  # the discriminator no longer wins
    model.check_epoch(row(2, 0.003, 0.2, 0.2), improving[:1])  # not yet `collapse_patience` epochs
    with pytest.raises(TrainingCollapsed, match="discriminator wins .*feature match from 0.150 to 0.160, l1 from "
                                                "0.120 to 0.125\\) at epoch 3; .*keeps epoch 2"):
        model.check_epoch(row(3, 0.003, 0.125, 0.16), improving)
    unweighted = gan.SPADEGAN(cfg(collapse_d_loss=0.01, collapse_patience=3, l1_weight=0.0))
    with pytest.raises(TrainingCollapsed, match="feature match from 0.150 to 0.160\\) at epoch 3"):
        unweighted.check_epoch(row(3, 0.003, 0.10, 0.16), improving)  # an L1 it does not optimise does not count


def test_untrained_generator_and_bad_sizes_are_refused():
    with pytest.raises(RuntimeError, match="untrained"):
        gan.generate_images(gan.SPADEGAN(cfg()), np.zeros((1, SIZE, SIZE), np.uint8))
    with pytest.raises(ValueError, match="divisible"):
        gan.SPADEGAN(cfg(image_size=34))
