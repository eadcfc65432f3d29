"""The segmentation workflow of notebooks 02-04: train, reload, test, show.

Each model lives in ``<run_dir>/<name>/`` (checkpoints, history, curves, metrics,
predictions, figures); the notebooks only choose parameters and call these functions.
The comparison of the trained models is in :mod:`lib.seg.tables` and :mod:`lib.seg.figures`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from lib.common.atomic import read_json
from lib.common.env import get_device
from lib.common.viz import curves, patient_gif, patient_grid, save_figure
from lib.data.run import Run
from lib.seg.checkpoint import check_compatible, load_model
from lib.seg.evaluate import evaluate
from lib.seg.forward import predict_probs
from lib.seg.models import ModelConfig, count_parameters
from lib.seg.postprocess import keep_largest_component, remove_small_pieces
from lib.seg.roi import LOCATOR_SIZE, locator_config, locator_slices
from lib.seg.tables import comparison_table
from lib.seg.train import FitResult, TrainConfig, fit


def model_config(run: Run, arch: str, encoder_name: str = "resnet18", encoder_depth: int | None = None,
                 decoder: dict[str, Any] | None = None, encoder_weights: str | None = None) -> ModelConfig:
    """A ModelConfig for this run's input channels (modalities x context slices) and classes."""
    return ModelConfig(arch, encoder_name, encoder_depth, encoder_weights, run.in_channels,
                       run.task.num_classes, dict(decoder or {}))


def train_model(run: Run, name: str, model_cfg: ModelConfig, train_cfg: TrainConfig, *, keep: str = "best",
                progress: bool = True) -> FitResult:
    """Train (or resume) the model ``name`` on the run's train split, validating on val.

    ``keep``: "best" keeps ``best.pt`` after training, "none" only the record (see :func:`fit`).
    The checkpoints carry the run's region-of-interest stage and its settings plan.
    """
    attach = ({"locator": run.locator.state()} if run.locator else {}) | ({"plan": run.plan} if run.plan else {})
    result = fit(run.slices("train"), run.slices("val"), model_cfg, train_cfg, run.run_dir / name,
                 run.data_settings(), keep=keep, attach=attach, progress=progress)
    save_figure(curves(result.history, f"{name}: {model_cfg.arch} / {model_cfg.encoder_name}"),
                run.run_dir / name / "curves.png")
    return result


def train_locator(run: Run, train_cfg: TrainConfig, minutes: float, *, progress: bool = True) -> FitResult | None:
    """Train (or reuse) the run's region-of-interest stage in ``<run_dir>/locator/`` and set
    it on the run (:meth:`lib.data.run.Run.use_locator`); nothing without ``roi``.

    The locator segments the structure (all classes as one) on the whole canvas at
    ``LOCATOR_SIZE`` pixels for ``minutes``; it is shared by every model of the run.
    """
    if not run.slice_cfg.roi:
        return None
    data = run.data_settings(0) | {"image_size": LOCATOR_SIZE, "num_classes": 2, "labels": {"0": "background",
                                                                                              "1": "structure"}}
    result = fit(locator_slices(run.canvas_slices("train", 0)), locator_slices(run.canvas_slices("val", 0)),
                 locator_config(run.task.channels), replace(train_cfg, time_budget_min=minutes, patience=None),
                 run.run_dir / "locator", data, progress=progress)
    run.use_locator(result.model, get_device(train_cfg.device))
    return result


def reload_model(run: Run, name: str, device: str | torch.device = "cpu", *,
                 single_slice: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild ``<name>/best.pt``, checking it was trained for this run's data and split.

    Args:
        single_slice: return a model that takes single slices (N, C, H, W) even when it was
            trained with context slices (2.5D): each slice is repeated as its own neighbours,
            as edge slices are in training. For data without neighbours, e.g. synthetic pairs.
    """
    model, meta = load_model(run.run_dir / name / "best.pt", device)
    context = meta["data"].get("context_slices", 0)
    check_compatible(meta, {"data": run.data_settings(context if single_slice else None)},
                     str(run.run_dir / name / "best.pt"))
    if single_slice and context:
        model = SingleSlice(model, 2 * context + 1)
    return model, meta


class SingleSlice(nn.Module):
    """Feeds a 2.5D model single slices by repeating each slice as its own neighbours.

    ``encoder`` is wrapped the same way, so encoder features work on single slices too.
    """

    def __init__(self, model: nn.Module, copies: int) -> None:
        super().__init__()
        self.model, self.copies = model, copies
        self.encoder = _Repeat(model.encoder, copies)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.repeat(1, self.copies, 1, 1))


class _Repeat(nn.Module):
    def __init__(self, module: nn.Module, copies: int) -> None:
        super().__init__()
        self.module, self.copies = module, copies

    def forward(self, x: torch.Tensor) -> Any:
        return self.module(x.repeat(1, self.copies, 1, 1))


def max_prediction_difference(a: torch.nn.Module, b: torch.nn.Module, images: np.ndarray) -> float:
    """Largest absolute difference between two models' probabilities on ``images``."""
    return float((predict_probs(a, images) - predict_probs(b, images)).abs().max())


def test_model(run: Run, name: str, model: torch.nn.Module, meta: dict[str, Any], *, tta: bool = False,
               largest_component: bool | None = None, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Score the model on the test patients; writes ``<name>/metrics.json`` and predictions.

    ``largest_component``: True keeps each class's largest connected component, False
    nothing; None drops the pieces smaller than the training patients allow
    (:attr:`Run.piece_thresholds`: one-piece classes keep about their largest piece).
    """
    if run.slice_cfg.roi and run.locator is None:
        raise RuntimeError("this run crops a region of interest: call workflow.train_locator(run, ...) first")
    history = read_json(run.run_dir / name / "history.json")
    extra = {
        "model": name,
        "model_config": meta["model_config"],
        "parameters": count_parameters(model),
        "train_seconds": sum(h["seconds"] for h in history),
        "epochs_trained": len(history),
        "best_epoch": meta.get("epoch"),
        "best_val_dice": meta.get("best_val_dice"),
        "image_size": run.slice_cfg.image_size,
        "hd95_unit": run.task.distance_unit,
        "split": {k: run.split[k] for k in ("train", "val", "test")},
    }
    return evaluate(model, run.canvas_slices("test"), run.labels, run.run_dir / name, device=device, tta=tta,
                    largest_component=largest_component is not False,
                    pieces=run.piece_thresholds if largest_component is None else None, swap=run.mirror_pairs,
                    locator=run.locator, extra=extra)


def show_patient(run: Run, name: str, model: torch.nn.Module, case_id: str | None = None, *, tta: bool = False,
                 largest_component: bool | None = None, device: str | torch.device = "cpu") -> tuple[Any, Path, str]:
    """Segment one test patient: a contour grid figure and a GIF through its slices. In a 2D
    image folder, where each image is its own patient, the first 12 test images instead.
    ``tta`` and ``largest_component`` as in :func:`test_model`, so the figure shows what was scored.

    Returns:
        The figure, the GIF path and the patient id (default: first test patient).
    """
    case_id = case_id or run.split["test"][0]
    if run.task.is_2d:
        sl = run.slices("test")
        sl = sl.subset(np.arange(min(12, len(sl))))
        title = f"{name} on the first {len(sl)} test images (each its own patient)"
    else:
        sl = run.slices("test").patient(case_id)
        title = f"{name} on test patient {case_id}"
    pred = predict_probs(model, sl.images, device=device, tta=tta, swap=run.mirror_pairs).argmax(1).numpy()
    if largest_component is not False:
        pieces = None if largest_component else run.piece_thresholds
        clean = keep_largest_component if pieces is None else (lambda m: remove_small_pieces(m, pieces))
        pred = np.stack([clean(p) for p in pred]) if run.task.is_2d else clean(pred)
    images = sl.centre_images()
    classes = {k: v for k, v in run.task.labels.items() if k != 0}
    fig = patient_grid(images, sl.masks, pred, title=title, slice_index=None if run.task.is_2d else sl.slice_index,
                       class_names=classes)
    save_figure(fig, run.run_dir / name / f"patient_{case_id}.png")
    gif = patient_gif(images, sl.masks, pred, run.run_dir / name / f"patient_{case_id}.gif", class_names=classes)
    return fig, gif, case_id


def choose_learning_rate(run: Run, model_cfg: ModelConfig, train_cfg: TrainConfig, lrs: list[float],
                         epochs: int, *, progress: bool = True) -> pd.DataFrame:
    """Short trainings at each learning rate, scored on the validation split only.

    The trials keep their records (``hp/lr_<lr>/fit.json``, ``history.json``) but no
    checkpoints. An empty ``lrs`` trains nothing and returns an empty table.

    Returns:
        A table indexed by learning rate with the best validation Dice and minutes.
    """
    rows = {}
    for lr in tqdm(lrs, desc="learning-rate trials", disable=not progress or not lrs):
        cfg = replace(train_cfg, lr=lr, epochs=epochs, patience=None)
        result = fit(run.slices("train"), run.slices("val"), model_cfg, cfg, run.run_dir / "hp" / f"lr_{lr:g}",
                     run.data_settings(), keep="none", progress=False)
        rows[lr] = {"val_dice": result.best_val_dice, "minutes": result.train_seconds / 60}
    return pd.DataFrame.from_dict(rows, orient="index", columns=["val_dice", "minutes"]).rename_axis("lr")


def architecture_study(run: Run, name: str, base: ModelConfig, train_cfg: TrainConfig,
                       variants: dict[str, dict[str, Any]], *, epochs: int | None = None,
                       device: str | torch.device = "cpu", keep_checkpoints: bool = False,
                       progress: bool = True) -> pd.DataFrame:
    """Train and test each variant of model ``name`` (changes applied to ``base``) as
    ``<name>_<variant>``, with the same budget; a variant already scored is skipped.

    Args:
        epochs: epochs of each variant (default: ``train_cfg.epochs``).
        keep_checkpoints: keep each variant's ``best.pt`` (default: metrics only).

    Returns:
        The comparison table of ``name`` and its variants (empty without variants).
    """
    train_cfg = replace(train_cfg, epochs=epochs or train_cfg.epochs)
    for variant, change in tqdm(variants.items(), desc="architecture variants", disable=not progress or not variants):
        cfg, folder = replace(base, **change), f"{name}_{variant}"
        if (run.run_dir / folder / "metrics.json").is_file():
            continue
        result = train_model(run, folder, cfg, train_cfg, keep="best" if keep_checkpoints else "none", progress=False)
        meta = {"model_config": cfg.to_dict(), "epoch": result.best_epoch, "best_val_dice": result.best_val_dice}
        test_model(run, folder, result.model, meta, device=device)
    return comparison_table(run.run_dir, [name, *[f"{name}_{v}" for v in variants]]) if variants else pd.DataFrame()


def predict_masks_fn(model: nn.Module, device: str | torch.device = "cpu"):
    """A function (N, C, H, W) float -> (N, H, W) uint8 masks, for scoring synthetic pairs."""
    return lambda images: predict_probs(model, images, device=device).argmax(1).numpy().astype(np.uint8)
