"""Tables, statistics and figures of the synthetic-data study (notebook 05), from its records.

**Statistics**: :func:`study_conclusions` pairs each condition with real only by seed and
test patient, with the training subset (seed) as the unit: a t-interval over the seeds and a
crossed bootstrap of seeds and test patients (:mod:`lib.common.statistics`). Records only: no
torch, so publishing uses it without a model.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from lib.common.atomic import write_json
from lib.common.statistics import (
    crossed_bootstrap,
    seed_sd,
    seed_t_interval,
    seeds_for_power,
    variance_components,
)
from lib.study.design import StudyDesign


def setting_label(r: dict[str, Any] | pd.Series) -> str:
    """A readable name of a record's condition."""
    strategy, gen = r["strategy"], r["generator"]
    if strategy == "real":
        return "real only"
    if strategy == "latent":
        return "VAE latent segmenter"
    if strategy == "pretrain":
        return f"{gen} pre-training, real fine-tuning"
    if strategy == "synthetic_only":
        return f"{gen} only"
    notes = ["deformed shapes"] * (r["shapes"] == "deformed") + ["unfiltered"] * (not r["filtered"])
    on_top = " on top" if strategy == "add" else ""  # "mix": synthetic slices take the place of real ones
    return f"real + {gen} x{r['ratio']:g}{on_top}" + (f" ({', '.join(notes)})" if notes else "")


def study_table(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Mean, sd, min and max over seeds of the mean test Dice, per n_real and setting (empty
    without records)."""
    if not records:
        return pd.DataFrame(columns=["mean", "std", "min", "max", "seeds"],
                            index=pd.MultiIndex.from_tuples([], names=["n_real", "setting"]))
    df = pd.DataFrame(records)
    df["setting"] = df.apply(setting_label, axis=1)
    table = df.groupby(["n_real", "setting"])["mean_dice"].agg(["mean", "std", "min", "max", "count"])
    return table.rename(columns={"count": "seeds"})


def _differences(matched: list[tuple[dict[str, Any], dict[str, Any]]]) -> np.ndarray:
    """The (seeds x test patients) matrix of per-patient Dice differences of each seed's record
    against real only of the same seed (same training subset); NaN where a patient is missing."""
    patients = sorted({p for r, b in matched for p in set(r["test_dice"]) & set(b["test_dice"])})
    return np.array([[r["test_dice"].get(p, np.nan) - b["test_dice"].get(p, np.nan) for p in patients]
                     for r, b in matched], dtype=float)


def _verdict(primary: dict[str, Any], secondary: dict[str, Any], seeds: int, min_seeds: int) -> str:
    """"helps" or "hurts" only when both intervals exclude 0 on the same side."""
    if seeds < min_seeds:
        return "too few seeds"
    both = {primary["verdict"], secondary["verdict"]}
    return {"higher": "helps", "lower": "hurts"}.get(both.pop(), "no clear difference") if len(both) == 1 \
        else "no clear difference"


def study_conclusions(records: list[dict[str, Any]], n_boot: int = 10_000, seed: int = 0,
                      min_seeds: int = 3, baseline: str = "real only") -> pd.DataFrame:
    """Each setting against ``baseline`` (a :func:`setting_label`; "real only" unless another
    contrast is asked, such as adding against replacing) at the same n_real, with the training
    subset (seed) as the unit: the mean paired difference in per-patient test Dice (paired by seed and test patient),
    a 95 % t-interval over the seeds' mean differences (primary: ``ci_low``, ``ci_high``;
    :func:`lib.common.statistics.seed_t_interval`) and a 95 % bootstrap interval that resamples
    seeds and test patients crossed, as every seed is scored on the same patients (secondary:
    ``boot_low``, ``boot_high``; :func:`lib.common.statistics.crossed_bootstrap`).

    The verdict is "helps" only when both intervals are above 0, "hurts" only when both are below
    0, otherwise "no clear difference"; with fewer than ``min_seeds`` seeds it says "too few
    seeds". Differences are in Dice points (x100).
    """
    columns = ["n_real", "setting", "delta_dice_points", "ci_low", "ci_high", "boot_low", "boot_high", "seeds",
               "pairs", "verdict"]
    if not records:
        return pd.DataFrame(columns=columns).set_index(["n_real", "setting"])
    df = pd.DataFrame(records)
    df["setting"] = df.apply(setting_label, axis=1)
    base = {(r["n_real"], r["seed"]): r for r in records if setting_label(r) == baseline}
    rows = []
    for (n, setting), group in df[df["setting"] != baseline].groupby(["n_real", "setting"]):
        matched = [(r, base[(n, r["seed"])]) for r in group.to_dict("records") if (n, r["seed"]) in base]
        diff = _differences(matched)
        if not diff.size or not np.isfinite(diff).any():
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a seed without any finite difference
            primary = seed_t_interval(np.nanmean(diff, axis=1))
        secondary = crossed_bootstrap(diff, n_boot=n_boot, seed=seed)
        rows.append({"n_real": n, "setting": setting, "delta_dice_points": 100 * primary["mean"],
                     "ci_low": 100 * primary["low"], "ci_high": 100 * primary["high"],
                     "boot_low": 100 * secondary["low"], "boot_high": 100 * secondary["high"], "seeds": len(matched),
                     "pairs": secondary["n"], "verdict": _verdict(primary, secondary, len(matched), min_seeds)})
    return pd.DataFrame(rows, columns=columns).set_index(["n_real", "setting"])


QUALITY = ("frechet_ratio", "sharpness_ratio", "mask_agreement_ratio")  # the quality table's ratios to real


def _number(value: Any) -> float:
    """A measure as a float; NaN where it was not measured (None: too few pairs for the quality table)."""
    return np.nan if value is None else float(value)


def generator_cells(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per condition with a generator and a real-only record of the same seed: its
    paired difference to real only (Dice points, mean over the test patients), its generator's
    row of the quality table against the validation patients (ratios to real: Fréchet, sharpness,
    mask agreement), and the share of drawn pairs the filter kept and of pairs that are unique."""
    base = {(r["n_real"], r["seed"]): r for r in records if r["strategy"] == "real"}
    rows = []
    for r in records:
        quality = r.get("generator_quality")
        if not quality or (r["n_real"], r["seed"]) not in base:
            continue
        diff = _differences([(r, base[(r["n_real"], r["seed"])])])
        rows.append({"n_real": r["n_real"], "setting": setting_label(r), "seed": r["seed"],
                     "delta_dice_points": 100 * float(np.nanmean(diff))}
                    | {k: _number(quality.get(k)) for k in QUALITY}
                    | {"kept_share": _number(r.get("synthetic_kept_share")),
                       "unique_share": _number(r.get("synthetic_unique_share"))})
    return pd.DataFrame(rows, columns=["n_real", "setting", "seed", "delta_dice_points", *QUALITY, "kept_share",
                                       "unique_share"])


def generator_quality_table(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Per n_real and setting, the mean over its cells of :func:`generator_cells` (the worst
    Fréchet ratio and unique share beside the means), so each verdict can be read against the
    quality of the generators behind it."""
    cells = generator_cells(records)
    groups = cells.groupby(["n_real", "setting"])
    table = groups[["delta_dice_points", *QUALITY, "kept_share", "unique_share"]].mean()
    table.insert(2, "frechet_ratio_max", groups["frechet_ratio"].max())
    table["unique_share_min"] = groups["unique_share"].min()
    return table.assign(seeds=groups.size())


def provenance_table(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Where the records were made: per patient count, commit (``code``) and machine with its
    precision (``hardware``), the conditions and cells recorded there, and how many of those cells
    also hold records made elsewhere (``mixed_cells``: a cell resumed on another machine, whose
    paired differences then also carry the change of machine or precision)."""
    rows = pd.DataFrame([{"n_real": r["n_real"], "seed": r["seed"], "code": r.get("code") or "?",
                          "hardware": r.get("hardware") or "?"} for r in records],
                        columns=["n_real", "seed", "code", "hardware"])
    rows["mixed"] = (rows.groupby(["n_real", "seed"])["hardware"].transform("nunique") > 1).astype(bool)
    keys = ["n_real", "code", "hardware"]
    table = rows.groupby(keys).agg(conditions=("seed", "size"), cells=("seed", "nunique"))
    mixed = rows[rows["mixed"]].groupby(keys)["seed"].nunique()
    return table.assign(mixed_cells=mixed.reindex(table.index, fill_value=0).astype(int))


def quality_figure(records: list[dict[str, Any]]) -> Figure:
    """Each cell's paired difference to real only against its generator's Fréchet ratio and mask
    agreement ratio (to real), one colour per setting and one marker per patient count."""
    cells = generator_cells(records)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    markers = dict(zip(sorted(cells["n_real"].unique()), "os^DvP*X"))
    for ax, key, label in zip(axes, ("frechet_ratio", "mask_agreement_ratio"),
                              ("Fréchet ratio to real (lower is closer)", "mask agreement ratio to real")):
        for i, (setting, rows) in enumerate(cells.groupby("setting")):
            for n, part in rows.groupby("n_real"):
                ax.scatter(part[key], part["delta_dice_points"], color=f"C{i}", marker=markers[n],
                           label=f"{setting}, {n} real")
        ax.axhline(0, color="k", lw=0.8)
        ax.set(xlabel=label)
    axes[0].set_ylabel("Dice points vs real only (one cell)")
    if len(cells):
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def power_table(records: list[dict[str, Any]], setting: str = "real + spade_gan x1", effect: float = 0.03,
                power: float = 0.8, test_patients: int | None = None) -> pd.DataFrame:
    """How many seeds (training subsets) a study needs, from the records of an earlier one: per
    patient count, the spread (sd) of the seeds' mean paired differences of ``setting`` against
    real only, and the seeds a t-test needs to detect ``effect`` (Dice, 0.03 = 3 points) with
    ``power`` at the 5 % level (:func:`lib.common.statistics.seeds_for_power`). With
    ``test_patients``, the spread is projected to a test set of that size from the records'
    variance components (:func:`lib.common.statistics.variance_components`): between training
    subsets, and the residual that more test patients average away."""
    rows = {}
    base = {(r["n_real"], r["seed"]): r for r in records if r["strategy"] == "real"}
    for n in sorted({r["n_real"] for r in records}):
        matched = [(r, base[(n, r["seed"])]) for r in records
                   if r["n_real"] == n and r["strategy"] != "real" and setting_label(r) == setting and (n, r["seed"]) in base]
        if len(matched) < 2:
            continue
        diff = _differences(matched)
        means = np.nanmean(diff, axis=1)
        sd = float(np.std(means, ddof=1))
        row = {"seeds": len(matched), "test_patients": diff.shape[1],
               "mean_difference_points": 100 * float(np.mean(means)), "sd_points": 100 * sd}
        if test_patients is not None:
            parts = variance_components(diff)
            sd = seed_sd(parts, test_patients)
            row |= {"sd_subsets_points": 100 * math.sqrt(parts["var_run"]),
                    "sd_residual_points": 100 * math.sqrt(parts["var_residual"]),
                    f"sd_points_at_{test_patients}_test": 100 * sd}
        rows[n] = row | {"seeds_needed": seeds_for_power(sd, effect, power)}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("n_real")


def study_figure(records: list[dict[str, Any]], conclusions: pd.DataFrame) -> Figure:
    """Left: mean test Dice (± sd over seeds) against the number of real patients. Right: each
    setting's paired difference to real only with its 95 % interval. Settings are spread
    sideways around each patient count."""
    if not records:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.text(0.5, 0.5, "no study records (study_n_real is empty)", ha="center", va="center")
        ax.axis("off")
        return fig
    table = study_table(records).reset_index()
    ticks = sorted(table["n_real"].unique())
    where = {n: i for i, n in enumerate(ticks)}
    settings = sorted(table["setting"].unique())
    spread = {s: (i - (len(settings) - 1) / 2) * 0.6 / max(len(settings), 1) for i, s in enumerate(settings)}
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8))
    for setting, rows in table.groupby("setting"):
        x = rows["n_real"].map(where) + spread[setting]
        ax.errorbar(x, rows["mean"], yerr=rows["std"].fillna(0), marker="o", capsize=3, label=setting,
                    lw=2.5 if setting == "real only" else 1.2)
    ax.set(xlabel="real training patients", ylabel="mean test Dice (± sd over seeds)", ylim=(0, 1))
    ax.legend(fontsize=7, loc="lower right")
    for setting, rows in conclusions.reset_index().groupby("setting"):
        x = rows["n_real"].map(where) + spread[setting]
        mean = rows["delta_dice_points"]
        bx.errorbar(x, mean, yerr=[mean - rows["ci_low"], rows["ci_high"] - mean], marker="o", capsize=3,
                    label=setting, color=f"C{settings.index(setting)}")
    bx.axhline(0, color="k", lw=0.8)
    bx.set(xlabel="real training patients", ylabel="Dice points vs real only (95 % interval)")
    for axis in (ax, bx):
        axis.set_xticks(range(len(ticks)), [str(t) for t in ticks])
        axis.set_xlim(-0.5, len(ticks) - 0.5)
    fig.tight_layout()
    return fig


def steps_figure(steps: dict[int, dict[str, Any]]) -> Figure:
    """Real only's validation Dice against optimiser steps for each patient count, with the
    steps chosen for the study marked."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for n, s in sorted(steps.items()):
        x, y = zip(*s["curve"])
        line, = ax.plot(x, y, marker=".", label=f"{n} real patient{'s' * (n > 1)}")
        ax.axvline(s["steps"], color=line.get_color(), ls="--", lw=1)
    ax.set(xlabel="optimiser steps", ylabel="validation Dice (real only)", ylim=(0, 1),
           title="steps of every condition: where real only reaches its plateau (dashed)")
    if steps:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_summary(study_dir: Path, design: StudyDesign, conclusions: pd.DataFrame,
                  steps: dict[int, dict[str, Any]], records: list[dict[str, Any]] | None = None) -> Path:
    """``summary.json`` in ``study_dir``: the design, the steps per patient count, every paired
    comparison and, with ``records``, the quality of the generators behind each comparison."""
    rows = conclusions.reset_index().to_dict("records")
    generators = generator_quality_table(records or []).reset_index().to_dict("records")
    return write_json(Path(study_dir) / "summary.json",
                      {"design": asdict(design) | {"id": design.id},
                       "steps": {str(n): {k: v for k, v in s.items() if k != "curve"} for n, s in steps.items()},
                       "comparisons": rows, "generators": generators})
