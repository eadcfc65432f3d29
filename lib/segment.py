"""The segmentation workflow of notebooks 02-04: train, reload, test, show, compare.

Each model lives in ``<run_dir>/<name>/`` (checkpoints, history, curves, metrics,
predictions, figures); the notebooks only choose parameters and call these functions.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from lib.atomic import read_json
from lib.checkpoint import load_model
from lib.evaluate import evaluate
from lib.inference import predict_probs
from lib.models import ModelConfig, count_parameters
from lib.pipeline import Run
from lib.train import FitResult, TrainConfig, fit
from lib.viz import curves, patient_gif, patient_grid, save_figure


def model_config(run: Run, arch: str, encoder_name: str = "resnet18", encoder_depth: int | None = None,
                 decoder: dict[str, Any] | None = None, encoder_weights: str | None = None) -> ModelConfig:
    """A ModelConfig for this run's input channels (modalities x context slices) and classes."""
    return ModelConfig(arch, encoder_name, encoder_depth, encoder_weights, run.in_channels,
                       run.task.num_classes, dict(decoder or {}))


def train_model(run: Run, name: str, model_cfg: ModelConfig, train_cfg: TrainConfig, *, progress: bool = True) -> FitResult:
    """Train (or resume) the model ``name`` on the run's train split, validating on val."""
    result = fit(run.slices("train"), run.slices("val"), model_cfg, train_cfg, run.run_dir / name,
                 run.data_settings(), progress=progress)
    save_figure(curves(result.history, f"{name}: {model_cfg.arch} / {model_cfg.encoder_name}"),
                run.run_dir / name / "curves.png")
    return result


def reload_model(run: Run, name: str, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild ``<name>/best.pt``, checking it was trained for this run's data settings."""
    return load_model(run.run_dir / name / "best.pt", device, expected={"data": run.data_settings()})


def max_prediction_difference(a: torch.nn.Module, b: torch.nn.Module, images: np.ndarray) -> float:
    """Largest absolute difference between two models' probabilities on ``images``."""
    return float((predict_probs(a, images) - predict_probs(b, images)).abs().max())


def test_model(run: Run, name: str, model: torch.nn.Module, meta: dict[str, Any], *, tta: bool = False,
               largest_component: bool = True, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Score the model on the test patients; writes ``<name>/metrics.json`` and predictions."""
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
        "split": {k: run.split[k] for k in ("train", "val", "test")},
    }
    return evaluate(model, run.slices("test"), run.labels, run.run_dir / name, device=device, tta=tta,
                    largest_component=largest_component, extra=extra)


def show_patient(run: Run, name: str, model: torch.nn.Module, case_id: str | None = None, *,
                 device: str | torch.device = "cpu") -> tuple[Any, Path, str]:
    """Segment one test patient: a contour grid figure and a GIF through its slices.

    Returns:
        The figure, the GIF path and the patient id (default: first test patient).
    """
    case_id = case_id or run.split["test"][0]
    sl = run.slices("test").patient(case_id)
    pred = predict_probs(model, sl.images, device=device).argmax(1).numpy()
    images = sl.centre_images()
    fig = patient_grid(images, sl.masks, pred, title=f"{name} on test patient {case_id}", slice_index=sl.slice_index)
    save_figure(fig, run.run_dir / name / f"patient_{case_id}.png")
    gif = patient_gif(images, sl.masks, pred, run.run_dir / name / f"patient_{case_id}.gif")
    return fig, gif, case_id


def comparison_table(run_dir: str | Path, names: list[str]) -> pd.DataFrame:
    """One row per trained model from its metrics.json: Dice, HD95, time, parameters."""
    rows = {}
    for name in names:
        path = Path(run_dir) / name / "metrics.json"
        if not path.is_file():
            continue
        m = read_json(path)
        rows[name] = {
            "arch": m["model_config"]["arch"],
            "encoder": m["model_config"]["encoder_name"],
            "test_dice": m["mean"]["dice"],
            "test_dice_std": m["std"]["dice"],
            "test_hd95_mm": m["mean"]["hd95"],
            "val_dice": m["best_val_dice"],
            "epochs": m["epochs_trained"],
            "train_min": (m["train_seconds"] or 0) / 60,
            "infer_s_per_volume": m["mean"]["inference_seconds_per_volume"],
            "params_M": m["parameters"] / 1e6,
        }
    return pd.DataFrame.from_dict(rows, orient="index")


def cross_validation_table(fold_dirs: list[str | Path], name: str) -> pd.DataFrame:
    """One row per test patient of a cross-validation (each fold's ``<name>/metrics.json``),
    with its fold, test Dice (reported post-processing) and HD95, and the Dice with flip TTA."""
    rows = {}
    for fold, fold_dir in enumerate(map(Path, fold_dirs)):
        metrics = read_json(fold_dir / name / "metrics.json")
        tta = read_json(fold_dir / name / "postprocessing.json")["tta+lcc"]["cases"]
        for case_id, m in metrics["cases"].items():
            rows[case_id] = {"fold": fold, "dice": m["dice"], "hd95_mm": m["hd95"], "dice_tta": tta[case_id]["dice"],
                             "val_dice": metrics["best_val_dice"], "epochs": metrics["epochs_trained"]}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("patient")


def choose_learning_rate(run: Run, model_cfg: ModelConfig, train_cfg: TrainConfig, lrs: list[float],
                         epochs: int) -> pd.DataFrame:
    """Short trainings at each learning rate, scored on the validation split only.

    Returns:
        A table indexed by learning rate with the best validation Dice and minutes.
    """
    rows = {}
    for lr in lrs:
        cfg = replace(train_cfg, lr=lr, epochs=epochs, patience=None)
        result = fit(run.slices("train"), run.slices("val"), model_cfg, cfg, run.run_dir / "hp" / f"lr_{lr:g}",
                     run.data_settings(), progress=False)
        rows[lr] = {"val_dice": result.best_val_dice, "minutes": result.train_seconds / 60}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("lr")


def architecture_study(run: Run, base: ModelConfig, train_cfg: TrainConfig, variants: dict[str, dict[str, Any]],
                       *, epochs: int | None = None, device: str | torch.device = "cpu") -> pd.DataFrame:
    """Train and test each U-Net variant (changes applied to ``base``) as ``unet_<variant>``.

    Args:
        epochs: epochs of each variant (default: ``train_cfg.epochs``).
    """
    train_cfg = replace(train_cfg, epochs=epochs or train_cfg.epochs)
    for variant, change in variants.items():
        cfg = replace(base, **change)
        name = f"unet_{variant}"
        train_model(run, name, cfg, train_cfg, progress=False)
        model, meta = reload_model(run, name, device)
        test_model(run, name, model, meta, device=device, largest_component=True)
    return comparison_table(run.run_dir, ["unet", *[f"unet_{v}" for v in variants]])


def comparison_figure(table: pd.DataFrame):
    """Bar charts of test Dice (± std over patients), HD95, training time and size."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    names = list(table.index)
    axes[0].bar(names, table["test_dice"], yerr=table["test_dice_std"], capsize=3)
    axes[0].set(title="test Dice (mean ± sd over patients)", ylim=(0, 1))
    axes[1].bar(names, table["test_hd95_mm"])
    axes[1].set(title="test HD95 (mm, lower is better)")
    axes[2].bar(names, table["train_min"])
    axes[2].set(title="training time (min)")
    axes[3].bar(names, table["params_M"])
    axes[3].set(title="parameters (millions)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=60)
    fig.tight_layout()
    return fig


def recommend(table: pd.DataFrame, tolerance: float = 0.01, faster: float = 0.9) -> str:
    """A recommendation justified by the numbers in ``table``.

    The model with the best **validation** Dice wins; a model within ``tolerance`` of it
    that trains in at most ``faster`` times its minutes and has no more parameters is
    preferred. Test Dice is reported, never used.
    """
    if table.empty:
        return "No trained models found in this run folder."
    ranked = table.sort_values("val_dice", ascending=False)
    best = ranked.loc[ranked.index[0]]
    cheaper = ranked[(ranked["val_dice"] >= best["val_dice"] - tolerance)
                     & (ranked["train_min"] <= faster * best["train_min"]) & (ranked["params_M"] <= best["params_M"])]
    choice = cheaper.sort_values(["train_min", "params_M"]).index[0] if len(cheaper) else best.name
    row = table.loc[choice]
    why = ("best validation Dice" if choice == best.name else
           f"within {tolerance:.2f} validation Dice of {best.name}, trains in {row['train_min'] / best['train_min']:.0%} "
           f"of its time and is no larger")
    return (
        f"Recommendation: {choice} ({row['arch']} / {row['encoder']}): {why}. "
        f"Validation Dice {row['val_dice']:.3f}, test Dice {row['test_dice']:.3f} ± {row['test_dice_std']:.3f}, "
        f"HD95 {row['test_hd95_mm']:.1f} mm, {row['train_min']:.1f} min training, "
        f"{row['infer_s_per_volume']:.2f} s per volume, {row['params_M']:.1f} M parameters. "
        f"Ranking by validation Dice: {', '.join(f'{n} {v:.3f}' for n, v in ranked['val_dice'].items())}. "
        f"Caveat: {len(table)} models on one split and one seed; differences below the patient-to-patient "
        "spread (the ± above) are not conclusive."
    )


def predict_masks_fn(model: torch.nn.Module, device: str | torch.device = "cpu"):
    """A function (N, C, H, W) float -> (N, H, W) uint8 masks, for scoring synthetic pairs."""
    return lambda images: predict_probs(model, images, device=device).argmax(1).numpy().astype(np.uint8)
