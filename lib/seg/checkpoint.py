"""Checkpoints that rebuild their own model: weights + architecture + data settings + metrics,
and the settings plan they were trained with (:mod:`lib.data.plan`).

Files are written atomically, so an interrupted save keeps the previous checkpoint. Format 2
may carry a ``plan``; format 1 files (no plan) are still read.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lib.common.atomic import atomic_path
from lib.data.plan import plan_problem
from lib.seg.models import ModelConfig, build_model

FORMAT_VERSION = 2  # 2: may carry the settings plan
READ_VERSIONS = (1, 2)
KIND = "segmentation"


def save_checkpoint(path: str | Path, model: nn.Module, model_cfg: ModelConfig, data: dict[str, Any], **extra: Any) -> Path:
    """Atomically save ``model`` with what is needed to rebuild and check it.

    Args:
        path: destination ``.pt`` file.
        model_cfg: the architecture.
        data: data settings the model was trained for (image_size, slice settings key,
            in_channels, num_classes, labels, task name).
        **extra: anything else (metrics, epoch, optimizer state, history, the settings ``plan``...).
    """
    state = {
        "kind": KIND,
        "version": FORMAT_VERSION,
        "model_config": model_cfg.to_dict(),
        "data": data,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **extra,
    }
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(state, tmp)
    return Path(path)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupt, foreign, unsafe or malformed."""


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message (its type name when it has none), for one-line errors."""
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict with ``weights_only=True`` (tensors and plain Python values only,
    never code), and check its kind, format version, required fields and plan (when it has one).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: one line naming the file and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused, the file holds objects other than tensors and plain values, which could run code "
            f"when loaded ({str(err).splitlines()[-1].strip() or 'unsupported global'}); only load checkpoints "
            "written by this project") from err
    except Exception as err:  # torch raises many types for corrupt or truncated files
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or state.get("kind") != KIND:
        kind = state.get("kind") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: not a segmentation checkpoint (kind {kind!r})")
    version = state.get("version")
    if version not in READ_VERSIONS:
        raise CheckpointError(f"{path}: written in checkpoint format {version!r}, this version of the project reads "
                              f"formats {' and '.join(map(str, READ_VERSIONS))}; retrain, or use the project version "
                              "that wrote it")
    missing = [key for key in ("model_config", "data", "state_dict") if not isinstance(state.get(key), dict)]
    if missing:
        raise CheckpointError(f"{path}: malformed checkpoint, no {', '.join(missing)}")
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(state["model_config"]) - known)
    if unknown:
        raise CheckpointError(f"{path}: model_config has unknown key(s) {', '.join(map(repr, unknown))} "
                              "(written by another version of the project?)")
    if "plan" in state and (problem := plan_problem(state["plan"])):
        raise CheckpointError(f"{path}: malformed checkpoint, its plan {problem}")
    return state


def _plain(value: Any) -> Any:
    """``value`` as JSON would give it back (tuples become lists, keys strings)."""
    return json.loads(json.dumps(value, default=str))


def check_compatible(state: dict[str, Any], expected: dict[str, Any], source: str = "checkpoint") -> None:
    """Raise ValueError if the checkpoint's model or data settings differ from ``expected``.

    ``expected`` may hold "model_config" and/or "data" entries; only keys given are compared.
    A different patient split gets its own message: a model trained on another split may
    have seen this run's test patients, so scoring it would be meaningless.
    """
    problems = []
    for section in ("model_config", "data"):
        for key, want in expected.get(section, {}).items():
            have = state.get(section, {}).get(key)
            if _plain(have) == _plain(want):
                continue
            if section == "data" and key == "split":
                problems.append(
                    f"it was trained on another patient split ({_describe_split(have)}) than this run's "
                    f"split.json ({_describe_split(want)}), so it may have seen this run's test patients. "
                    "Use a new run_dir for the new split, or pass the checkpoint's split as split_file")
            else:
                problems.append(f"{section}.{key}: checkpoint has {have!r}, expected {want!r}")
    if problems:
        raise ValueError(f"{source}: incompatible with this run: " + "; ".join(problems))


def _describe_split(split: Any) -> str:
    if not isinstance(split, dict):
        return "not recorded"
    return "; ".join(f"{name} {', '.join(split.get(name, []))}" for name in ("train", "val", "test"))


def load_model(path: str | Path, device: str | torch.device = "cpu", expected: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model saved at ``path`` and load its weights.

    Args:
        expected: optional settings the checkpoint must match (see :func:`check_compatible`).

    Returns:
        The model in eval mode on ``device``, in the channels-last layout it was trained in,
        and the checkpoint dict (without weights).
    """
    state = read_checkpoint(path)
    if expected:
        check_compatible(state, expected, str(path))
    # The checkpoint holds every weight: never fetch pretrained ones (works offline).
    try:
        model = build_model(replace(ModelConfig(**state["model_config"]), encoder_weights=None))
        model.load_state_dict(state.pop("state_dict"))
    except (TypeError, ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"{path}: its weights do not fit the model it describes ({first_line(err)})") from err
    return model.to(device, memory_format=torch.channels_last).eval(), state
