"""One training loop for every segmentation notebook.

Dice + BCE (binary) or Dice + cross-entropy (multi-class), AdamW with warm-up and
cosine decay (over the epochs, or over the time budget when that ends sooner) or nnU-Net's
SGD (Nesterov momentum 0.99) with poly decay, batched
on-device augmentation, mixed precision (bf16 on GPUs and on CPUs with native bf16) and
channels-last memory layout,
validation every epoch on per-patient 3D Dice, best-checkpoint keeping, early
stopping, a time budget, and resume from ``last.pt`` after an interruption.

Run folders stay lean: ``last.pt`` (weights, optimiser, RNG states) exists only while a
run is unfinished. A finished run leaves ``fit.json`` (how it ended), ``history.json`` and
``best.pt`` (or no checkpoint at all with ``keep="none"``), and a re-run reuses it.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lib.common.atomic import read_json, write_json
from lib.common.env import autocast, get_device, grad_scaler, hardware, seed_everything
from lib.data.slices import SliceSet
from lib.seg.augment import AugmentConfig, augment_batch
from lib.seg.checkpoint import check_compatible, read_checkpoint, save_checkpoint
from lib.seg.forward import predict_probs
from lib.seg.metrics import dice_from_counts
from lib.seg.models import ModelConfig, build_model

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "poly", "constant")


@dataclass
class TrainConfig:
    """Training hyperparameters.

    Attributes:
        epochs: maximum number of epochs.
        samples_per_epoch: slices drawn per epoch (None: as many as training slices); fix it
            to compare training sets of different sizes at the same number of steps.
        time_budget_min: stop gracefully once this many minutes of training are spent.
        foreground_share: expected share of sampled slices that contain foreground
            (nnU-Net oversamples foreground too); None samples uniformly.
        patience: early stopping after this many epochs without a better val Dice.
        patience_minutes: early stopping also waits until this many minutes of training have
            passed without a better val Dice (None: epochs alone), so a run of fast epochs
            does not stop in the first minutes of a long budget.
        augment: augmentation settings, or None for no augmentation.
        amp: mixed precision where :func:`lib.common.env.amp_dtype` gives a dtype for the device.
        channels_last: NHWC memory layout (faster convolutions on GPUs and with oneDNN on CPUs).
        optimizer: "adamw" (cosine decay) or "sgd" (nnU-Net's recipe: Nesterov momentum 0.99,
            poly decay ``(1 - progress) ** 0.9``; nnU-Net starts it at lr 0.01).
        lr_schedule: None (the optimizer's), "cosine", "poly" or "constant" (after the warm-up:
            a flattening validation curve then shows learning, not the schedule's end).
        checkpoint_minutes: ``last.pt`` (weights, optimiser and RNG state: what resuming needs)
            is written after an epoch once this many minutes have passed since the last write
            (0: after every epoch). An interrupted run loses at most that much training; a short
            run never writes the file (a third of the disk it would need at its peak).
    """

    epochs: int = 30
    time_budget_min: float | None = None
    samples_per_epoch: int | None = None
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    foreground_share: float | None = 0.5
    patience: int | None = 15
    patience_minutes: float | None = None
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)
    amp: bool = True
    channels_last: bool = True
    seed: int = 0
    device: str = "auto"
    eval_batch_size: int = 64
    optimizer: str = "adamw"
    lr_schedule: str | None = None
    checkpoint_minutes: float = 5.0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {OPTIMIZERS}")
        if self.lr_schedule not in (None, *SCHEDULES):
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; choose one of {SCHEDULES} or None")

    @property
    def schedule(self) -> str:
        """The learning-rate schedule: ``lr_schedule``, else poly decay for SGD and cosine for AdamW."""
        return self.lr_schedule or ("poly" if self.optimizer == "sgd" else "cosine")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FitResult:
    """What :func:`fit` returns: the best model, its history and timings."""

    model: nn.Module | None  # None for a finished run that kept no checkpoint
    history: list[dict[str, Any]]
    best_epoch: int
    best_val_dice: float
    stopped: str
    train_seconds: float
    out_dir: Path


def loss_fn(num_classes: int, softmax: bool = False) -> nn.Module:
    """The segmentation loss of every segmenter (smp losses): Dice + BCE on one sigmoid channel
    for binary tasks, Dice + cross-entropy on ``num_classes`` softmax channels for multi-class
    ones, or for binary ones too with ``softmax`` (a head with a channel per class)."""
    if num_classes == 2 and not softmax:
        dice = smp.losses.DiceLoss(smp.losses.BINARY_MODE, from_logits=True)
        return _Sum(dice, lambda logits, y: F.binary_cross_entropy_with_logits(logits[:, 0], y.float()))
    dice = smp.losses.DiceLoss(smp.losses.MULTICLASS_MODE, from_logits=True)
    return _Sum(dice, F.cross_entropy)


class _Sum(nn.Module):
    def __init__(self, dice: nn.Module, ce: Any) -> None:
        super().__init__()
        self.dice, self.ce = dice, ce

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.dice(logits.float(), target) + self.ce(logits.float(), target)


def sample_indices(masks: np.ndarray, n: int, share: float | None, rng: np.random.Generator) -> np.ndarray:
    """Draw ``n`` slice indices with about ``share`` of them containing foreground."""
    if share is None:
        return rng.permutation(len(masks))[:n] if n <= len(masks) else rng.integers(0, len(masks), n)
    has_fg = masks.reshape(len(masks), -1).max(axis=1) > 0
    fg, bg = np.flatnonzero(has_fg), np.flatnonzero(~has_fg)
    if len(fg) == 0 or len(bg) == 0:
        return rng.integers(0, len(masks), n)
    n_fg = rng.binomial(n, share)
    return rng.permutation(np.concatenate([rng.choice(fg, n_fg), rng.choice(bg, n - n_fg)]))


def patient_dice(probs: torch.Tensor, truth: np.ndarray, case_ids: np.ndarray) -> dict[str, float]:
    """Per-patient 3D Dice from slice probabilities (mean over foreground classes).

    Args:
        probs: (N, K, H, W) class probabilities of the slices.
        truth: (N, H, W) true class ids.
        case_ids: (N,) patient of each slice.
    """
    pred = probs.argmax(1).numpy()
    out: dict[str, float] = {}
    for cid in dict.fromkeys(case_ids.tolist()):
        sel = case_ids == cid
        p, t = pred[sel], truth[sel]
        scores = [
            dice_from_counts(int(((p == k) & (t == k)).sum()), int((p == k).sum()), int((t == k).sum()))
            for k in range(1, probs.shape[1])
        ]
        out[cid] = float(np.nanmean(scores)) if not np.all(np.isnan(scores)) else float("nan")
    return out


def lr_factor(step: int, total_steps: int, warmup: int, time_fraction: float = 0.0, schedule: str = "cosine") -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to 1% of the peak, or
    nnU-Net's poly decay ``(1 - progress) ** 0.9`` (``schedule="poly"``), or the peak rate to
    the end (``schedule="constant"``).

    Progress is the larger of the share of steps done and ``time_fraction`` (the share of
    a time budget spent), so a run cut short by its budget still ends at a low rate.
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, max((step - warmup) / max(1, total_steps - warmup), time_fraction))
    if schedule == "poly":
        return (1 - progress) ** 0.9
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))


def out_of_patience(cfg: TrainConfig, history: list[dict[str, Any]], epoch: int, best_epoch: int) -> bool:
    """True when ``cfg.patience`` epochs, and ``cfg.patience_minutes`` minutes of training (the
    epochs' ``seconds`` in ``history``), have passed since the best val Dice at ``best_epoch``
    (never without ``patience``)."""
    if not cfg.patience or epoch - best_epoch < cfg.patience:
        return False
    waited = sum(row["seconds"] for row in history if row["epoch"] > best_epoch) / 60
    return waited >= (cfg.patience_minutes or 0.0)


def make_optimizer(params: Any, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, or SGD with Nesterov momentum 0.99 as nnU-Net trains (``cfg.optimizer``)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.99, nesterov=True, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def fit(
    train: SliceSet,
    val: SliceSet,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    out_dir: str | Path,
    data: dict[str, Any],
    *,
    keep: str = "best",
    attach: dict[str, Any] | None = None,
    init: nn.Module | None = None,
    synthetic: SliceSet | None = None,
    synthetic_per_batch: int = 0,
    progress: bool = True,
) -> FitResult:
    """Train (or resume, or reuse a finished run of) a model in ``out_dir``.

    Args:
        train, val: training and validation slices (different patients).
        model_cfg: architecture; checked against ``data["image_size"]``.
        cfg: hyperparameters.
        out_dir: run folder of this model; holds checkpoints and history.
        data: data settings stored with the checkpoints (image_size, labels, split...).
        keep: "best" keeps ``best.pt`` when training ends; "none" keeps only the record
            (``fit.json``, ``history.json``), for trials whose model is not used again: the best
            weights stay in memory (and in ``last.pt`` for resuming), never in a file of their own.
        attach: stored in every checkpoint as is (e.g. the region-of-interest stage the
            model needs for prediction).
        init: a model of the same architecture whose weights a new run starts from
            (fine-tuning); a resumed run continues from its own ``last.pt`` instead.
        synthetic, synthetic_per_batch: slices added *on top of* every batch of ``train``
            (``synthetic_per_batch`` of them, drawn and augmented with random streams of their
            own), so the real batches, their augmentation and the steps are exactly those of a
            run without them.

    Raises:
        FloatingPointError: the loss became NaN/inf; ``last.pt`` still holds the last
            finished epoch.
        ValueError: ``out_dir`` holds a run of another model or data setting (split included).
    """
    if keep not in ("best", "none"):
        raise ValueError(f"keep={keep!r}: use 'best' or 'none'")
    if len(val) == 0:
        raise ValueError("validation set is empty: the split needs at least one val patient")
    if synthetic_per_batch and (synthetic is None or len(synthetic) == 0):
        raise ValueError(f"synthetic_per_batch={synthetic_per_batch} needs synthetic slices")
    if synthetic is not None and synthetic.images.shape[1:] != train.images.shape[1:]:
        raise ValueError(f"synthetic slices of shape {synthetic.images.shape[1:]} do not match the training "
                         f"slices' {train.images.shape[1:]}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    last, done = out_dir / "last.pt", out_dir / "fit.json"
    if done.is_file() and not last.exists():
        return _finished(done, model_cfg, data)
    seed_everything(cfg.seed)
    run = _Trainer(model_cfg, cfg, data, steps_per_epoch=max(1, math.ceil((cfg.samples_per_epoch or len(train)) / cfg.batch_size)),
                   pretrained=not last.exists(), attach=attach, best_file=keep == "best")
    if last.exists():
        run.restore(last)
    elif init is not None:
        run.model.load_state_dict(init.state_dict())
    train_x = torch.from_numpy(train.images).to(run.device)
    train_y = torch.from_numpy(train.masks).to(run.device)
    extra = None
    if synthetic_per_batch:
        extra = (torch.from_numpy(synthetic.images).to(run.device), torch.from_numpy(synthetic.masks).to(run.device),
                 synthetic.masks, synthetic_per_batch)
    origin = time.perf_counter() - run.spent  # when training began, counting earlier sessions
    t_start, stopped = time.perf_counter(), "epochs"
    if run.spent >= run.budget_s:  # resumed after the budget was spent
        stopped = "time budget"
    elif run.best_epoch and out_of_patience(cfg, run.history, run.epoch, run.best_epoch):
        stopped = "early stopping"
    while stopped == "epochs" and run.epoch < cfg.epochs:
        row, out_of_time = run.train_epoch(train_x, train_y, train.masks, origin, last, progress, extra)
        row |= run.validate(val)
        run.spent += time.perf_counter() - t_start
        t_start = time.perf_counter()
        run.record(row, out_dir)
        if progress:
            print(f"epoch {row['epoch']}: train loss {row['train_loss']:.4f}  val loss {row['val_loss']:.4f}  "
                  f"val Dice {row['val_dice']:.4f}")
        if out_of_time:
            stopped = "time budget"
        elif out_of_patience(cfg, run.history, run.epoch, run.best_epoch):
            stopped = "early stopping"
    best = out_dir / "best.pt"
    run.model.load_state_dict(read_checkpoint(best)["state_dict"] if keep == "best" else run.best_state)
    run.model.eval()
    write_json(done, {"stopped": stopped, "best_epoch": run.best_epoch, "best_val_dice": run.best_dice,
                      "train_seconds": run.spent, "epochs": run.epoch, "model_config": model_cfg.to_dict(),
                      "data": data, "train_config": cfg.to_dict(), "hardware": hardware(run.device)})
    last.unlink(missing_ok=True)
    if keep == "none":
        best.unlink(missing_ok=True)  # of an earlier "best" try of the same run
    return FitResult(run.model, run.history, run.best_epoch, run.best_dice, stopped, run.spent, out_dir)


def _finished(done: Path, model_cfg: ModelConfig, data: dict[str, Any]) -> FitResult:
    """The result of a run that already finished in ``done.parent`` (same model and data)."""
    record = read_json(done)
    check_compatible(record, {"model_config": model_cfg.to_dict(), "data": data}, str(done))
    out_dir = done.parent
    model = None
    if (out_dir / "best.pt").is_file():
        model = build_model(replace(model_cfg, encoder_weights=None), data["image_size"])
        model.load_state_dict(read_checkpoint(out_dir / "best.pt")["state_dict"])
        model = model.to(memory_format=torch.channels_last).eval()
    print(f"{out_dir} already finished (stopped by {record['stopped']}): reused; delete the folder to train again")
    return FitResult(model, read_json(out_dir / "history.json"), record["best_epoch"], record["best_val_dice"],
                     record["stopped"], record["train_seconds"], out_dir)


class _Trainer:
    """The mutable state of one training run: model, optimiser, schedule, RNGs, history."""

    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, data: dict[str, Any], steps_per_epoch: int,
                 pretrained: bool = True, attach: dict[str, Any] | None = None, best_file: bool = True) -> None:
        self.model_cfg, self.cfg, self.data, self.steps = model_cfg, cfg, data, steps_per_epoch
        self.best_file = best_file  # False: the best weights are kept in memory (and last.pt), not in best.pt
        self.best_state: dict[str, torch.Tensor] | None = None
        self.attach = attach or {}
        self.device = get_device(cfg.device)
        # A resumed run loads its weights from last.pt: no pretrained download needed.
        built = model_cfg if pretrained else replace(model_cfg, encoder_weights=None)
        self.model = build_model(built, data["image_size"]).to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = make_optimizer(self.model.parameters(), cfg)
        self.budget_s = cfg.time_budget_min * 60 if cfg.time_budget_min else math.inf
        self.scaler = grad_scaler(self.device, cfg.amp)
        self.criterion = loss_fn(model_cfg.num_classes)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        # slices added on top of the real batches draw from streams of their own: the real batches stay as without them
        self.extra_gen = torch.Generator().manual_seed(cfg.seed + 7919)
        self.extra_rng = np.random.default_rng([cfg.seed, 7919])
        self.history: list[dict[str, Any]] = []
        self.best_dice, self.best_epoch, self.epoch, self.spent, self.step = -1.0, 0, 0, 0.0, 0
        self.saved_at = time.monotonic()  # when last.pt was last written (or training began)

    def restore(self, last: Path) -> None:
        """Continue from ``last.pt`` (same model and data settings, else ValueError)."""
        state = read_checkpoint(last)
        check_compatible(state, {"model_config": self.model_cfg.to_dict(), "data": self.data}, str(last))
        self.model.load_state_dict(state["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.gen.set_state(state["generator"])
        self.rng.bit_generator.state = state["rng"]
        if "extra_rng" in state:  # written since slices can be added on top of the batches
            self.extra_gen.set_state(state["extra_generator"])
            self.extra_rng.bit_generator.state = state["extra_rng"]
        self.history, self.best_dice, self.best_epoch = state["history"], state["best_val_dice"], state["best_epoch"]
        self.best_state = state.get("best_state")
        self.epoch, self.spent, self.step = state["epoch"], state["train_seconds"], state["step"]
        print(f"resuming from {last} at epoch {self.epoch}")

    def train_epoch(self, train_x: torch.Tensor, train_y: torch.Tensor, masks: np.ndarray, origin: float,
                    last: Path, progress: bool, extra: tuple | None = None) -> tuple[dict[str, Any], bool]:
        """One epoch of optimiser steps; stops early (returning True) once the time budget,
        counted from ``origin`` (a ``time.perf_counter`` value), is spent. ``extra``: (images,
        masks, masks as numpy, per batch) of slices added on top of each batch."""
        cfg, epoch = self.cfg, self.epoch + 1
        self.model.train()
        t_epoch, wait, losses, out_of_time = time.perf_counter(), 0.0, [], False
        idx = torch.from_numpy(sample_indices(masks, self.steps * cfg.batch_size, cfg.foreground_share, self.rng))
        if extra is not None:
            extra_x, extra_y, extra_masks, k = extra
            extra_idx = torch.from_numpy(sample_indices(extra_masks, self.steps * k, cfg.foreground_share,
                                                        self.extra_rng))
        bar = tqdm(range(self.steps), desc=f"epoch {epoch}/{cfg.epochs}", disable=not progress, leave=False)
        for step in bar:
            t0 = time.perf_counter()
            sel = idx[step * cfg.batch_size:(step + 1) * cfg.batch_size].to(self.device)
            x, y = train_x[sel].float(), train_y[sel].long()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            wait += time.perf_counter() - t0
            if cfg.augment is not None:
                x, y = augment_batch(x, y, cfg.augment, self.gen)
            if extra is not None:
                sel = extra_idx[step * k:(step + 1) * k].to(self.device)
                ex, ey = extra_x[sel].float(), extra_y[sel].long()
                if cfg.augment is not None:
                    ex, ey = augment_batch(ex, ey, cfg.augment, self.extra_gen)
                x, y = torch.cat([x, ex]), torch.cat([y, ey])
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            lr = cfg.lr * lr_factor(self.step, cfg.epochs * self.steps, cfg.warmup_steps,
                                    (time.perf_counter() - origin) / self.budget_s,
                                    cfg.schedule)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            with autocast(self.device, cfg.amp):
                loss = self.criterion(self.model(x), y)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss is {loss.item()} at epoch {epoch}, step {step}: training stopped. {last} still holds "
                    f"epoch {self.epoch}; lower the learning rate or check the data.")
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.step += 1
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if time.perf_counter() - origin > self.budget_s:
                out_of_time = True
                break
        seconds = time.perf_counter() - t_epoch
        per_step = cfg.batch_size + (extra[3] if extra is not None else 0)
        row = {"epoch": epoch, "train_loss": float(np.mean(losses)), "lr": self.optimizer.param_groups[0]["lr"],
               "seconds": seconds, "data_wait_share": wait / seconds,
               "slices_per_s": len(losses) * per_step / seconds}
        return row, out_of_time

    def validate(self, val: SliceSet) -> dict[str, float]:
        """Validation loss and mean per-patient 3D Dice."""
        probs = predict_probs(self.model, val.images, device=self.device, batch_size=self.cfg.eval_batch_size,
                              amp=self.cfg.amp)
        val_loss = float(self.criterion(_logits_like(probs, self.model_cfg), torch.from_numpy(val.masks).long()))
        dices = list(patient_dice(probs, val.masks, val.case_ids).values())
        return {"val_loss": val_loss, "val_dice": float(np.nanmean(dices)) if dices else float("nan")}

    def record(self, row: dict[str, Any], out_dir: Path) -> None:
        """Append the epoch to the history; save best.pt (if better), history.json, and last.pt
        when ``checkpoint_minutes`` have passed since its last write."""
        self.epoch = row["epoch"]
        self.history.append(row)
        meta = {"history": self.history, "train_seconds": self.spent, "train_config": self.cfg.to_dict(), **self.attach}
        if row["val_dice"] > self.best_dice:
            self.best_dice, self.best_epoch = row["val_dice"], self.epoch
            if self.best_file:
                save_checkpoint(out_dir / "best.pt", self.model, self.model_cfg, self.data, epoch=self.epoch,
                                best_val_dice=self.best_dice, **meta)
            else:
                self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        write_json(out_dir / "history.json", self.history)
        if time.monotonic() - self.saved_at < 60 * self.cfg.checkpoint_minutes:
            return
        self.saved_at = time.monotonic()
        save_checkpoint(
            out_dir / "last.pt", self.model, self.model_cfg, self.data, epoch=self.epoch,
            best_val_dice=self.best_dice, best_epoch=self.best_epoch, optimizer=self.optimizer.state_dict(),
            step=self.step, scaler=self.scaler.state_dict(), generator=self.gen.get_state(),
            rng=self.rng.bit_generator.state, extra_generator=self.extra_gen.get_state(),
            extra_rng=self.extra_rng.bit_generator.state,
            **({} if self.best_file else {"best_state": self.best_state}), **meta,
        )


def _logits_like(probs: torch.Tensor, model_cfg: ModelConfig) -> torch.Tensor:
    """Turn probabilities back into logits for the validation loss."""
    probs = probs.clamp(1e-6, 1 - 1e-6)
    if model_cfg.out_channels == 1:
        p = probs[:, 1:2]
        return torch.log(p) - torch.log1p(-p)
    return torch.log(probs)
