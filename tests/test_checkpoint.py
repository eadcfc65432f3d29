"""Checkpoints from elsewhere: loaded with weights_only, so a pickled payload never runs;
malformed, foreign and other-version files get a one-line error naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lib.data.slices import SliceConfig, build_cache, load_slices
from lib.data.task import read_task
from lib.seg import train as train_mod
from lib.seg.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    load_model,
    read_checkpoint,
    save_checkpoint,
)
from lib.seg.models import ModelConfig, build_model
from lib.seg.train import TrainConfig, fit
from tests.helpers import make_task

DATA = {"image_size": 32, "num_classes": 2}


class Payload:
    """Unpickling this object creates ``marker``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def small_model() -> ModelConfig:
    return ModelConfig(arch="unet", encoder_name="resnet18", encoder_depth=3,
                       decoder={"decoder_channels": [32, 16, 8]})


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run folder holding best.pt and last.pt of an interrupted training (as resume finds it)."""
    root = tmp_path_factory.mktemp("ckpt")
    task = read_task(make_task(root / "t", 3, shape=(32, 32, 6)))
    cache = build_cache(task, root / "cache", SliceConfig(image_size=32), workers=1, progress=False)
    train, val = load_slices(cache, ["p00", "p01"]), load_slices(cache, ["p02"])
    real_predict, calls = train_mod.predict_probs, []

    def interrupt_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_predict(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(train_mod, "predict_probs", interrupt_in_epoch_2)
        fit(train, val, small_model(), train_config(), root / "run", DATA, progress=False)
    return root / "run"


def train_config() -> TrainConfig:
    return TrainConfig(epochs=2, batch_size=4, augment=None, device="cpu", patience=None, checkpoint_minutes=0)


def _poisoned(src: Path, dst: Path, marker: Path) -> Path:
    state = torch.load(src, map_location="cpu", weights_only=True)
    state["notes"] = Payload(marker)
    torch.save(state, dst)
    return dst


def test_the_projects_own_best_and_last_checkpoints_load_with_weights_only(trained):
    for name in ("best.pt", "last.pt"):
        state = torch.load(trained / name, map_location="cpu", weights_only=True)
        assert state["version"] == FORMAT_VERSION and state["kind"] == "segmentation"
    model, meta = load_model(trained / "best.pt")
    assert meta["data"] == DATA and not model.training


def test_a_checkpoint_with_a_code_payload_is_refused_and_the_payload_never_runs(trained, tmp_path):
    marker = tmp_path / "pwned"
    evil = _poisoned(trained / "best.pt", tmp_path / "evil.pt", marker)
    with pytest.raises(CheckpointError, match=r"evil\.pt: refused"):
        read_checkpoint(evil)
    with pytest.raises(CheckpointError, match=r"evil\.pt"):
        load_model(evil)
    assert not marker.exists()


def test_resuming_from_a_poisoned_last_checkpoint_is_refused_without_running_it(trained, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    marker = tmp_path / "pwned"
    _poisoned(trained / "last.pt", run / "last.pt", marker)
    task = read_task(make_task(tmp_path / "t", 3, shape=(32, 32, 6)))
    cache = build_cache(task, tmp_path / "cache", SliceConfig(image_size=32), workers=1, progress=False)
    with pytest.raises(CheckpointError, match=r"last\.pt: refused"):
        fit(load_slices(cache, ["p00", "p01"]), load_slices(cache, ["p02"]), small_model(), train_config(), run, DATA,
            progress=False)
    assert not marker.exists()


def _edited(trained: Path, tmp_path: Path, edit) -> Path:
    state = torch.load(trained / "best.pt", map_location="cpu", weights_only=True)
    edit(state)
    path = tmp_path / "edited.pt"
    torch.save(state, path)
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(version=FORMAT_VERSION + 1), rf"format {FORMAT_VERSION + 1}.*reads formats 1 and {FORMAT_VERSION}"),
    (lambda s: s.update(plan=["cpu"]), "malformed checkpoint, its plan is a list"),
    (lambda s: s.update(plan={"fields": {"image_size": 64}}), "its plan field 'image_size' lacks"),
    (lambda s: s.pop("version"), "format None"),
    (lambda s: s.pop("data"), "malformed checkpoint, no data"),
    (lambda s: s.update(model_config=s["model_config"] | {"colour": 3}), "unknown key.*'colour'"),
    (lambda s: s["state_dict"].pop(next(iter(s["state_dict"]))), "weights do not fit"),
    (lambda s: s.update(kind="vae"), "not a segmentation checkpoint"),
])
def test_malformed_checkpoints_get_one_line_errors_naming_the_file(trained, tmp_path, edit, message):
    path = _edited(trained, tmp_path, edit)
    with pytest.raises(CheckpointError, match=message) as err:
        load_model(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_format_1_checkpoints_without_a_plan_still_load(trained, tmp_path):
    path = _edited(trained, tmp_path, lambda s: s.update(version=1))
    model, meta = load_model(path)
    assert meta["version"] == 1 and "plan" not in meta and not model.training


def test_truncated_and_foreign_files_are_refused(tmp_path):
    model = build_model(small_model())
    path = save_checkpoint(tmp_path / "ok.pt", model, small_model(), DATA, metrics=np.float64(0.5).item())
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match=r"cut\.pt: not a readable checkpoint"):
        read_checkpoint(tmp_path / "cut.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="kind 'list'"):
        read_checkpoint(tmp_path / "list.pt")
