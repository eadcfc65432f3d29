"""What the two generative models (lib.vae, lib.diffusion) share: foreground
oversampling, config round trips and typed checkpoint reading."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, TypeVar

import numpy as np
import torch

T = TypeVar("T")


def epoch_indices(has_fg: np.ndarray, fg_fraction: float | None, generator: torch.Generator) -> torch.Tensor:
    """Indices for one epoch of ``len(has_fg)`` draws, oversampling foreground slices when
    they are rarer than ``fg_fraction`` (drawn with replacement)."""
    n = len(has_fg)
    p_fg = float(has_fg.mean()) if n else 0.0
    if not fg_fraction or p_fg in (0.0, 1.0) or p_fg >= fg_fraction:
        return torch.randperm(n, generator=generator)
    weights = np.where(has_fg, fg_fraction / p_fg, (1 - fg_fraction) / (1 - p_fg))
    return torch.multinomial(torch.from_numpy(weights), n, replacement=True, generator=generator)


def config_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild a config dataclass; unknown keys raise ValueError, missing ones take defaults."""
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {unknown}")
    return cls(**data)


def read_checkpoint(path: str | os.PathLike, kind: str, version: int, label: str) -> dict[str, Any]:
    """Load a checkpoint dict of ``kind``; ValueError naming ``path`` if unusable."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # torch raises many types for corrupt files
        raise ValueError(f"{path}: not a readable {label} checkpoint ({type(err).__name__}: {err})") from err
    found = ckpt.get("kind") if isinstance(ckpt, dict) else type(ckpt).__name__
    if found != kind:
        raise ValueError(f"{path}: checkpoint kind is {found!r}, expected {kind!r}")
    if ckpt.get("version") != version:
        raise ValueError(f"{path}: unsupported checkpoint version {ckpt.get('version')!r}")
    return ckpt
