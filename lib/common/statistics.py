"""Statistics of paired comparisons: a bootstrap interval of paired differences, a t-interval
over training runs (seeds), a crossed bootstrap of runs and test patients, the variance
components of runs and patients, and the runs a study needs for a given power.

NumPy and SciPy only (no torch), so tables and published summaries use them without a model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def paired_bootstrap(differences: Sequence[float], n_boot: int = 10_000, level: float = 0.95,
                     seed: int = 0) -> dict[str, Any]:
    """Mean of paired differences (e.g. per-patient Dice of model A minus model B on the same
    patients) with a percentile bootstrap interval that resamples the pairs.

    The verdict is "higher" only when the whole interval is above 0, "lower" only when it is
    below 0, otherwise "no clear difference". Non-finite differences are left out.

    Raises:
        ValueError: no finite difference to resample.
    """
    d = np.asarray(differences, dtype=float)
    d = d[np.isfinite(d)]
    if d.size == 0:
        raise ValueError("paired_bootstrap: no finite paired differences")
    means = d[np.random.default_rng(seed).integers(0, d.size, (n_boot, d.size))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    verdict = "higher" if low > 0 else "lower" if high < 0 else "no clear difference"
    return {"mean": float(d.mean()), "low": float(low), "high": float(high), "n": int(d.size), "verdict": verdict}


def seed_t_interval(seed_means: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """A t-interval of the mean over training runs (seeds), each run one value (its mean paired
    difference over the test patients): the run is the unit, as in a study over training subsets.

    Returns:
        mean, low, high, n (runs with a finite value) and verdict ("higher", "lower" or
        "no clear difference"); low/high are NaN with fewer than two runs.
    """
    from scipy import stats

    values = np.asarray(seed_means, dtype=float)
    values = values[np.isfinite(values)]
    if values.size < 2:
        mean = float(values.mean()) if values.size else float("nan")
        return {"mean": mean, "low": float("nan"), "high": float("nan"), "n": int(values.size),
                "verdict": "no clear difference"}
    half = stats.t.ppf((1 + level) / 2, values.size - 1) * values.std(ddof=1) / math.sqrt(values.size)
    low, high = values.mean() - half, values.mean() + half
    return {"mean": float(values.mean()), "low": float(low), "high": float(high), "n": int(values.size),
            "verdict": "higher" if low > 0 else "lower" if high < 0 else "no clear difference"}


def crossed_bootstrap(differences: np.ndarray, n_boot: int = 10_000, level: float = 0.95,
                      seed: int = 0) -> dict[str, Any]:
    """Interval of the mean of a (runs x test patients) matrix of paired differences in which
    every run is scored on the same patients: runs and patients are resampled independently
    (crossed, not nested), so both the spread between training runs and the spread between test
    patients count. With a handful of runs percentiles of the bootstrap means are too narrow, so
    the interval is the mean +- the bootstrap standard error times Student's t quantile with
    runs - 1 degrees of freedom (95 % coverage or more in simulations with 5 runs and a zero
    effect, ``tests/test_metrics.py``). NaN entries (a patient a run could not score) are left out.

    Returns:
        mean, low, high, n (finite differences) and verdict, as :func:`seed_t_interval`.
    """
    from scipy import stats

    diff = np.asarray(differences, dtype=float)
    if diff.ndim != 2 or not np.isfinite(diff).any():
        raise ValueError("crossed_bootstrap: needs a (runs x patients) matrix with a finite value")
    if diff.shape[0] < 2:  # one training run says nothing about the spread between runs
        return {"mean": float(np.nanmean(diff)), "low": float("nan"), "high": float("nan"),
                "n": int(np.isfinite(diff).sum()), "verdict": "no clear difference"}
    rng = np.random.default_rng(seed)
    runs = rng.integers(0, diff.shape[0], (n_boot, diff.shape[0]))
    patients = rng.integers(0, diff.shape[1], (n_boot, diff.shape[1]))
    finite, values = np.isfinite(diff), np.nan_to_num(diff)
    means = np.empty(n_boot)
    for b in range(n_boot):  # one (runs x patients) resample at a time: small matrices, no memory blow-up
        rows, cols = runs[b][:, None], patients[b][None, :]
        count = finite[rows, cols].sum()
        means[b] = values[rows, cols].sum() / count if count else np.nan
    mean = float(np.nanmean(diff))
    half = stats.t.ppf((1 + level) / 2, diff.shape[0] - 1) * float(np.nanstd(means, ddof=1))
    low, high = mean - half, mean + half
    return {"mean": mean, "low": low, "high": high, "n": int(finite.sum()),
            "verdict": "higher" if low > 0 else "lower" if high < 0 else "no clear difference"}


def variance_components(differences: np.ndarray) -> dict[str, float]:
    """Split the spread of a (runs x test patients) matrix of paired differences, every run scored
    on the same patients, into the part between runs (training subsets) and the residual
    (run-by-patient interaction and noise), by the two-way analysis of variance without
    replication: ``var_run = max(0, (MS_runs - MS_residual) / patients)``. The patients' own
    effect is common to every run, so a run mean over ``p`` of them spreads with variance
    ``var_run + var_residual / p`` (:func:`seed_sd`). Patients a run could not score are left out.

    Raises:
        ValueError: fewer than 2 runs or 2 patients scored by every run.
    """
    diff = np.asarray(differences, dtype=float)
    diff = diff[:, np.isfinite(diff).all(axis=0)] if diff.ndim == 2 else diff
    if diff.ndim != 2 or diff.shape[0] < 2 or diff.shape[1] < 2:
        raise ValueError(f"variance_components: needs >= 2 runs x >= 2 patients scored by every run, got {diff.shape}")
    runs, patients = diff.shape
    grand, row, col = diff.mean(), diff.mean(axis=1, keepdims=True), diff.mean(axis=0, keepdims=True)
    ms_runs = patients * float(((row - grand) ** 2).sum()) / (runs - 1)
    ms_res = float(((diff - row - col + grand) ** 2).sum()) / ((runs - 1) * (patients - 1))
    return {"var_run": max(0.0, (ms_runs - ms_res) / patients), "var_residual": ms_res, "runs": runs,
            "patients": patients}


def seed_sd(components: dict[str, float], patients: int) -> float:
    """Standard deviation of a run's mean paired difference over ``patients`` test patients, from
    :func:`variance_components` of another study (a larger test set averages the residual away,
    not the spread between training subsets)."""
    return math.sqrt(components["var_run"] + components["var_residual"] / patients)


def seeds_for_power(sd: float, effect: float, power: float = 0.8, level: float = 0.95, most: int = 200) -> int:
    """Training runs needed for a two-sided one-sample t-test at ``level`` to detect a mean paired
    difference of ``effect`` with ``power``, when run means spread with standard deviation
    ``sd`` (noncentral t); ``most`` + 1 when even ``most`` runs do not suffice."""
    from scipy import stats

    for n in range(2, most + 1):
        crit = stats.t.ppf((1 + level) / 2, n - 1)
        shift = effect / (sd / math.sqrt(n))
        if stats.nct.sf(crit, n - 1, shift) + stats.nct.cdf(-crit, n - 1, shift) >= power:
            return n
    return most + 1
