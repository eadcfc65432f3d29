"""One trainer for every generative model (VAE, VAE-GAN, mask-conditioned GAN, diffusion).

A generator is a :class:`Generative` module that knows its loss and optimiser steps for
one batch (:meth:`Generative.train_step`); :func:`train_generator` does the rest for all
of them: data checks, foreground oversampling, per-epoch seeding (a resumed run equals a
straight one), an exponential moving average of the weights (torch's ``AveragedModel``),
a time budget, a progress bar, a NaN guard, collapse checks, and an atomic checkpoint
after every epoch that a re-run resumes from. :func:`load_generator` rebuilds a trained
generator for sampling and refuses untrained, mismatched or unreadable checkpoints.

Checkpoint (``<out_dir>/<KIND>.pt``): ``kind``, ``version``, ``config``, ``state_dict``
(the weights to sample with: the EMA where there is one), ``history``, ``epoch``,
``data_fingerprint`` (the training slices' hash: a checkpoint trained on other patients
is never resumed) and ``train_state`` (raw weights, optimisers, EMA, step) for resuming.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from lib.common.atomic import atomic_path
from lib.common.env import grad_scaler

T = TypeVar("T")
G = TypeVar("G", bound="Generative")
RESUMABLE_FIELDS = frozenset({"epochs", "time_budget_min", "sample_steps", "sampler"})


class TrainingCollapsed(RuntimeError):
    """Training has failed in a way more epochs will not repair (NaN, a winning discriminator)."""


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


@dataclass
class GeneratorConfig:
    """Settings every generator shares: its data, its training run and its sampling weights.

    Each generator's config subclasses this, adds its architecture and loss settings, and
    may give these fields other defaults.
    """

    image_size: int = 64
    in_channels: int = 1
    num_classes: int = 2
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    time_budget_min: float | None = None  # stop gracefully after this many minutes (None: no limit)
    foreground_fraction: float | None = 0.5  # share of each epoch's slices that hold foreground (None: as in the data)
    ema_decay: float | None = None  # EMA of the sampling weights (None: off)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON- and checkpoint-safe)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        """Inverse of ``to_dict``; missing keys take defaults, unknown keys raise."""
        return config_from_dict(cls, data)


def budget_for(budget: float | dict[str, float] | None, kind: str) -> float | None:
    """Minutes of training for generator ``kind``: one number (or None) for every generator,
    or a dict by generator kind (``{"spade_gan": 30, "vae": 10}``) that must name ``kind``."""
    if not isinstance(budget, dict):
        return budget
    if kind not in budget:
        raise KeyError(f"time budget: no entry for generator {kind!r} in {budget}")
    return budget[kind]


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


def data_fingerprint(images: np.ndarray, masks: np.ndarray) -> str:
    """A hash of the training slices: resuming or sharing a generator across other data is refused."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str((images.shape, masks.shape)).encode())
    h.update(memoryview(np.ascontiguousarray(images, dtype=np.float32)).cast("B"))
    h.update(memoryview(np.ascontiguousarray(masks, dtype=np.uint8)).cast("B"))
    return h.hexdigest()


def check_pairs(images: np.ndarray, masks: np.ndarray, image_size: int, channels: int, classes: int) -> None:
    """ValueError unless images are (N>0, C, S, S) finite floats and masks (N, S, S) class ids."""
    expected = (channels, image_size, image_size)
    if images.ndim != 4 or images.shape[1:] != expected or len(images) == 0:
        raise ValueError(f"images must have shape (N>0, {channels}, {image_size}, {image_size}), got {images.shape}")
    if masks.shape != (images.shape[0], image_size, image_size):
        raise ValueError(f"masks must have shape (N, H, W) matching images, got {masks.shape}")
    if masks.min() < 0 or masks.max() >= classes:
        raise ValueError(f"mask values must be in [0, {classes - 1}], got [{masks.min()}, {masks.max()}]")
    if not np.isfinite(images).all():
        raise ValueError("images contain NaN or inf")


class ImageScaling(nn.Module):
    """Maps z-scored intensities onto [-1, 1] per channel (the training set's 0.5-99.5
    percentile range), the range of a generator's ``tanh`` output, and back."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("lo", -torch.ones(channels))
        self.register_buffer("hi", torch.ones(channels))

    def fit(self, images: np.ndarray, max_pixels: int = 2_000_000, seed: int = 0) -> None:
        """Set the clip range from (a subsample of) the training images (N, C, H, W)."""
        flat = np.moveaxis(np.asarray(images, np.float32), 1, 0).reshape(images.shape[1], -1)
        if flat.shape[1] > max_pixels:
            flat = flat[:, np.random.default_rng(seed).choice(flat.shape[1], max_pixels, replace=False)]
        lo, hi = np.percentile(flat, [0.5, 99.5], axis=1)
        self.lo.copy_(torch.from_numpy(lo).float())
        self.hi.copy_(torch.from_numpy(np.maximum(hi, lo + 1e-3)).float())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        lo, hi = self.lo.view(1, -1, 1, 1), self.hi.view(1, -1, 1, 1)
        return ((images - lo) / (hi - lo) * 2 - 1).clamp(-1, 1)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.lo.view(1, -1, 1, 1), self.hi.view(1, -1, 1, 1)
        return (x.float() + 1) / 2 * (hi - lo) + lo


def one_hot(masks: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, H, W) class ids -> (N, K, H, W) float one-hot maps."""
    return torch.nn.functional.one_hot(masks.long(), num_classes).permute(0, 3, 1, 2).float()


@dataclass
class Step:
    """What :meth:`Generative.train_step` gets besides the batch."""

    optimizers: dict[str, torch.optim.Optimizer]
    scaler: torch.amp.GradScaler
    epoch: int  # 1-based
    step: int  # optimiser steps before this batch, over the whole run
    noise: torch.Generator  # seeded per epoch, on the data's device


class Generative(nn.Module):
    """Base class of the generators :func:`train_generator` trains.

    Subclasses set ``KIND`` (checkpoint kind and file name), ``CONFIG`` (their config
    dataclass with ``image_size``, ``in_channels``, ``num_classes``, ``epochs``,
    ``batch_size``, ``seed``, ``time_budget_min``, ``foreground_fraction`` and optionally
    ``ema_decay``) and implement :meth:`make_optimizers` and :meth:`train_step`. Data-fitted
    buffers (intensity scaling, mask banks) belong in :meth:`fit_data` and the state dict.
    """

    KIND: ClassVar[str]
    VERSION: ClassVar[int] = 1
    CONFIG: ClassVar[type]

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self.trained_epochs = 0

    def fit_data(self, images: np.ndarray, masks: np.ndarray) -> None:
        """Set data-dependent buffers from the training slices (called once, before training)."""

    def make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The optimisers, by name (saved and restored with the checkpoint)."""
        raise NotImplementedError

    def ema_module(self) -> nn.Module | None:
        """The sub-module whose weights are averaged for sampling (None: no EMA)."""
        return None

    def train_step(self, images: torch.Tensor, masks: torch.Tensor, step: Step) -> dict[str, torch.Tensor]:
        """Losses and optimiser steps for one batch; returns the loss terms ("loss" first)."""
        raise NotImplementedError

    def check_epoch(self, row: dict[str, float], history: list[dict[str, Any]]) -> None:
        """Raise :class:`TrainingCollapsed` when an epoch shows a failure (default: none)."""

    def require_trained(self) -> None:
        """RuntimeError for an untrained generator (nothing to sample from)."""
        if self.trained_epochs <= 0:
            raise RuntimeError(f"the {self.KIND} generator is untrained (0 epochs); train it or load a checkpoint")


def _warm_ema(decay: float):
    """EMA update whose decay warms up as ``min(decay, (1 + n) / (10 + n))`` after n updates, so
    a short run does not sample with weights still close to the untrained ones."""
    def update(ema_params, params, num_averaged):
        n = int(num_averaged)
        get_ema_multi_avg_fn(min(decay, (1 + n) / (10 + n)))(ema_params, params, num_averaged)
    return update


def _budget_spent(budget_min: float | None, t_start: float, history: list[dict], first: int) -> bool:
    """True if another epoch (of the mean length so far) would overrun the time budget.

    The epochs of earlier sessions (``history[:first]``) count: a resumed run continues its
    budget rather than getting a new one (raise ``time_budget_min`` to train longer).
    """
    if budget_min is None or not history:
        return False
    before = sum(r["seconds"] for r in history[:first])
    mean_epoch = sum(r["seconds"] for r in history) / len(history)
    return before + time.monotonic() - t_start + mean_epoch > 60 * budget_min


def _checkpoint_path(cls: type[Generative], out_dir: str | os.PathLike | None) -> Path | None:
    return Path(out_dir) / f"{cls.KIND}.pt" if out_dir is not None else None


def train_state_path(path: Path) -> Path:
    """The file beside a generator checkpoint that holds what resuming needs (weights before
    averaging, optimisers, EMA, step): ``<kind>.train.pt``."""
    return path.with_suffix(".train.pt")


def train_generator(
    cls: type[G],
    images: np.ndarray,
    masks: np.ndarray,
    cfg: GeneratorConfig,
    *,
    device: str | torch.device = "cpu",
    out_dir: str | os.PathLike | None = None,
    keep_train_state: bool = True,
    progress: bool = True,
) -> tuple[G, list[dict[str, Any]]]:
    """Train (or resume) a generator of class ``cls`` on paired slices.

    Args:
        images: float32 (N, C, H, W), z-scored.
        masks: uint8 (N, H, W), class ids 0..K-1.
        cfg: the generator's config; ``cfg.seed`` makes runs deterministic on one device.
        out_dir: if given, ``<KIND>.pt`` (sampling weights) and ``<KIND>.train.pt`` (what
            resuming needs) are written atomically after every epoch and a re-run resumes from
            them (same config apart from epochs, time budget and sampling settings, and the same
            training slices; ValueError otherwise).
        keep_train_state: False removes ``<KIND>.train.pt`` when training ends (two thirds of
            the disk): the generator can be sampled and reused, not trained further.
        progress: a progress bar over epochs.

    Returns:
        The generator in eval mode with its sampling (EMA) weights, and one history row per
        epoch: the mean of each loss term and the epoch's seconds.

    Raises:
        TrainingCollapsed: a loss became NaN/inf, or ``check_epoch`` found a collapse; the
            checkpoint keeps the last good epoch.
    """
    check_pairs(images, masks, cfg.image_size, cfg.in_channels, cfg.num_classes)
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    model = cls(cfg)
    model.fit_data(images, masks)
    model.to(device)
    optimizers = model.make_optimizers()
    decay = cfg.ema_decay
    target = model.ema_module()
    ema = AveragedModel(target, multi_avg_fn=_warm_ema(decay)) if decay and target is not None else None
    fingerprint = data_fingerprint(images, masks)
    path = _checkpoint_path(cls, out_dir)
    history: list[dict[str, Any]] = []
    step = 0
    trainable = True  # False: a finished generator whose training state was not kept
    if path is not None and path.exists():
        history, step, trainable = _resume(path, cls, cfg, fingerprint, model, optimizers, ema)
    scaler = grad_scaler(device)
    x_all = torch.from_numpy(np.ascontiguousarray(images, np.float32)).to(device)
    m_all = torch.from_numpy(np.ascontiguousarray(masks, np.uint8)).to(device)
    has_fg = masks.reshape(len(masks), -1).any(axis=1)
    t_start, first = time.monotonic(), len(history)
    bar = tqdm(range(first + 1, cfg.epochs + 1), desc=cls.KIND, disable=not progress)
    for epoch in bar:
        if _budget_spent(cfg.time_budget_min, t_start, history, first):
            bar.write(f"{cls.KIND}: time budget of {cfg.time_budget_min} min spent after epoch {epoch - 1}")
            break
        if not trainable:
            raise ValueError(f"{path} was kept without its training state (keep_train_state=False): it can be "
                             f"sampled from, not trained beyond epoch {epoch - 1}; delete it to train from scratch")
        row, step = _train_epoch(model, ema, x_all, m_all, has_fg, optimizers, scaler, epoch, step)
        model.check_epoch(row, history)
        history.append(row)
        model.trained_epochs = epoch
        if path is not None:
            _save(path, model, ema, optimizers, history, step, fingerprint)
        bar.set_postfix({k: f"{v:.4f}" for k, v in row.items() if k not in ("epoch", "seconds")})
    bar.close()
    if path is not None and not keep_train_state:
        train_state_path(path).unlink(missing_ok=True)
    if ema is not None and trainable:
        target.load_state_dict(ema.module.state_dict())
    return model.eval(), history


def _train_epoch(model: Generative, ema: AveragedModel | None, x_all: torch.Tensor, m_all: torch.Tensor,
                 has_fg: np.ndarray, optimizers: dict[str, torch.optim.Optimizer], scaler: torch.amp.GradScaler,
                 epoch: int, step: int) -> tuple[dict[str, float], int]:
    """One epoch, seeded by (seed, epoch) so that a resumed run repeats a straight one."""
    cfg = model.cfg
    seed = cfg.seed * 1_000_003 + epoch
    torch.manual_seed(seed)
    idx = epoch_indices(has_fg, cfg.foreground_fraction, torch.Generator().manual_seed(seed))
    noise = torch.Generator(x_all.device).manual_seed(seed + 1)
    model.train()
    tic, sums, n_batches = time.monotonic(), {}, 0
    for start in range(0, len(idx), cfg.batch_size):
        b = idx[start:start + cfg.batch_size].to(x_all.device)
        terms = model.train_step(x_all[b], m_all[b].long(), Step(optimizers, scaler, epoch, step, noise))
        values = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in terms.items()}
        if not all(math.isfinite(v) for v in values.values()):
            raise TrainingCollapsed(
                f"{model.KIND}: non-finite loss {values} at epoch {epoch}, batch {n_batches + 1}; training "
                f"stopped, the checkpoint keeps epoch {epoch - 1}. Try a lower learning rate.")
        step += 1
        if ema is not None:
            ema.update_parameters(model.ema_module())
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        n_batches += 1
    row = {"epoch": epoch, **{k: v / max(n_batches, 1) for k, v in sums.items()}}
    return row | {"seconds": time.monotonic() - tic}, step


def _cpu(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in state.items()}


def _sampling_state(model: Generative, ema: AveragedModel | None) -> dict[str, torch.Tensor]:
    """The model's weights with the EMA's in place of the averaged sub-module's."""
    state = _cpu(model.state_dict())
    if ema is not None:
        prefix = next(name for name, mod in model.named_modules() if mod is model.ema_module())
        state |= {f"{prefix}.{k}" if prefix else k: v for k, v in _cpu(ema.module.state_dict()).items()}
    return state


def _save(path: Path, model: Generative, ema: AveragedModel | None, optimizers: dict[str, torch.optim.Optimizer],
          history: list[dict[str, Any]], step: int, fingerprint: str) -> None:
    """The training state first, then the sampling checkpoint: a kill between the two leaves a
    training state that is not ahead of the sampling weights."""
    head = {"kind": model.KIND, "version": model.VERSION, "config": dataclasses.asdict(model.cfg),
            "history": list(history), "epoch": model.trained_epochs, "data_fingerprint": fingerprint}
    train_state = {"model": _cpu(model.state_dict()), "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                   "ema": _cpu(ema.state_dict()) if ema is not None else None, "step": step}
    with atomic_path(train_state_path(path), suffix=".pt") as tmp:
        torch.save(head | {"train_state": train_state}, tmp)
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(head | {"state_dict": _sampling_state(model, ema)}, tmp)


def _resume(path: Path, cls: type[Generative], cfg: Any, fingerprint: str, model: Generative,
            optimizers: dict[str, torch.optim.Optimizer], ema: AveragedModel | None) -> tuple[list[dict], int, bool]:
    """Restore weights, optimisers and EMA from a matching checkpoint; returns (history, step,
    trainable). Without its training state file (``keep_train_state=False``) the sampling weights
    are loaded and ``trainable`` is False."""
    ckpt = read_checkpoint(path, cls.KIND, cls.VERSION, cls.__name__)
    saved, wanted = config_from_dict(cls.CONFIG, ckpt["config"]), dataclasses.asdict(cfg)
    diff = {k: (getattr(saved, k), v) for k, v in wanted.items() if k not in RESUMABLE_FIELDS and getattr(saved, k) != v}
    if diff:
        raise ValueError(f"{path} was trained with a different config (field: (saved, requested)) {diff}; "
                         "use another out_dir or delete the checkpoint to start over")
    if ckpt.get("data_fingerprint") != fingerprint:
        raise ValueError(f"{path} was trained on other images/masks (other patients?); use another out_dir")
    train_file = train_state_path(path)
    if not train_file.is_file():
        model.load_state_dict(ckpt["state_dict"])
        model.trained_epochs = int(ckpt["epoch"])
        return list(ckpt["history"]), 0, False
    train = read_checkpoint(train_file, cls.KIND, cls.VERSION, cls.__name__)
    if train.get("data_fingerprint") != fingerprint:
        raise ValueError(f"{train_file} was trained on other images/masks than {path}; delete both to start over")
    state = train["train_state"]
    model.load_state_dict(state["model"])
    for name, opt in optimizers.items():
        opt.load_state_dict(state["optimizers"][name])
    if ema is not None and state["ema"] is not None:
        ema.load_state_dict(state["ema"])
    model.trained_epochs = int(train["epoch"])
    print(f"{cls.KIND}: resuming from {train_file} at epoch {model.trained_epochs}")
    return list(train["history"]), int(state["step"]), True


def load_generator(cls: type[G], path: str | os.PathLike, device: str | torch.device = "cpu"
                   ) -> tuple[G, Any, list[dict[str, Any]]]:
    """Rebuild ``(model, cfg, history)`` from a checkpoint of ``cls`` (eval mode, sampling weights).

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        ValueError: another kind or version, a config or weights that do not fit ``cls``,
            or an unreadable (e.g. half-written) file.
        RuntimeError: the checkpoint holds an untrained generator.
    """
    ckpt = read_checkpoint(path, cls.KIND, cls.VERSION, cls.__name__)
    try:
        cfg = config_from_dict(cls.CONFIG, ckpt["config"])
        model = cls(cfg)
        model.load_state_dict(ckpt["state_dict"])
    except (KeyError, RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: inconsistent {cls.__name__} checkpoint ({err})") from err
    model.trained_epochs = int(ckpt["epoch"])
    model.require_trained()
    return model.to(device).eval(), cfg, list(ckpt["history"])
