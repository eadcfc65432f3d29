"""Tables of a run's trained models (notebooks 02-04): the comparison of their test scores, paired
differences with bootstrap intervals, a cross-validation's per-patient table and a recommendation.

They read the models' ``metrics.json`` records only: no torch, so publishing uses them without
a model.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lib.common.atomic import read_json
from lib.common.statistics import paired_bootstrap

MODEL_ORDER = ("pspnet", "fpn", "unet")  # the notebooks' models first in tables, then the rest by name


def trained_models(run_dir: str | Path) -> list[str]:
    """The model folders of a run that hold test scores (``<name>/metrics.json``)."""
    names = [p.parent.name for p in Path(run_dir).glob("*/metrics.json")]
    return sorted(names, key=lambda n: (MODEL_ORDER.index(n) if n in MODEL_ORDER else len(MODEL_ORDER), n))


def comparison_table(run_dir: str | Path, names: list[str] | None = None) -> pd.DataFrame:
    """One row per trained model from its metrics.json: Dice, HD95, time, parameters.

    Args:
        names: the model folders to compare (default: every one with test scores).
    """
    rows = {}
    for name in trained_models(run_dir) if names is None else names:
        path = Path(run_dir) / name / "metrics.json"
        if not path.is_file():
            continue
        m = read_json(path)
        rows[name] = {
            "arch": m["model_config"]["arch"],
            "encoder": m["model_config"]["encoder_name"],
            "test_dice": m["mean"]["dice"],
            "test_dice_std": m["std"]["dice"],
            "test_hd95": m["mean"]["hd95"],
            "hd95_unit": m.get("hd95_unit", "mm"),
            "val_dice": m["best_val_dice"],
            "epochs": m["epochs_trained"],
            "train_min": (m["train_seconds"] or 0) / 60,
            "infer_s_per_volume": m["mean"]["inference_seconds_per_volume"],
            "params_M": m["parameters"] / 1e6,
        }
    return pd.DataFrame.from_dict(rows, orient="index")


def paired_differences(run_dir: str | Path, reference: str | None = None, names: list[str] | None = None,
                       key: str = "dice") -> pd.DataFrame:
    """Each model against ``reference`` (default: the best validation Dice) on the same test patients:
    the mean paired difference in per-patient ``key`` with a 95 % bootstrap interval and a verdict
    (:func:`lib.common.statistics.paired_bootstrap`). Empty with fewer than two models."""
    table = comparison_table(run_dir, names)
    if len(table) < 2:
        return pd.DataFrame()
    reference = reference or str(table["val_dice"].idxmax())
    cases = {n: read_json(Path(run_dir) / n / "metrics.json")["cases"] for n in table.index}
    rows = {}
    for name in table.index.drop(reference):
        common = sorted(set(cases[name]) & set(cases[reference]))
        diffs = [cases[name][c][key] - cases[reference][c][key] for c in common]
        rows[f"{name} − {reference}"] = paired_bootstrap(diffs)
    return pd.DataFrame.from_dict(rows, orient="index").rename(columns=lambda c: f"{key}_{c}" if c != "n" else c)


def cross_validation_table(fold_dirs: list[str | Path], name: str) -> pd.DataFrame:
    """One row per test patient of a cross-validation (each fold's ``<name>/metrics.json``),
    with its fold, test Dice (as the notebook reports it) and HD95, the Dice without TTA or
    component filtering (``dice_plain``; NaN where not measured) and with flip TTA and the
    largest component (``dice_tta``)."""
    rows = {}
    for fold, fold_dir in enumerate(map(Path, fold_dirs)):
        metrics = read_json(fold_dir / name / "metrics.json")
        variants = read_json(fold_dir / name / "postprocessing.json")
        tta, plain = variants["tta+lcc"]["cases"], variants.get("plain", {}).get("cases", {})
        for case_id, m in metrics["cases"].items():
            rows[case_id] = {"fold": fold, "dice": m["dice"], "hd95_mm": m["hd95"],
                             "dice_plain": plain.get(case_id, {}).get("dice", float("nan")),
                             "dice_tta": tta[case_id]["dice"], "val_dice": metrics["best_val_dice"],
                             "epochs": metrics["epochs_trained"]}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("patient")


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
        f"HD95 {row['test_hd95']:.1f} {row.get('hd95_unit', 'mm')}, {row['train_min']:.1f} min training, "
        f"{row['infer_s_per_volume']:.2f} s per volume, {row['params_M']:.1f} M parameters. "
        f"Ranking by validation Dice: {', '.join(f'{n} {v:.3f}' for n, v in ranked['val_dice'].items())}. "
        f"Caveat: {len(table)} models on one split and one seed; differences below the patient-to-patient "
        "spread (the ± above) are not conclusive."
    )
