"""What the synthetic-data study trains and generates, counted in units whose time
``bench/study_cost.py`` measures (segmenter epochs, latent-segmenter steps, scored conditions,
slices each image generator and the VAE train on, synthetic pairs each image generator draws),
and the wall-clock of its jobs on a number of workers.

Segmenter epochs are counted in epochs of real only: an epoch with ``ratio`` x the batch added
on top ("add") counts ``1 + ratio``. Generator work is keyed by the generator's name
(``generator_slices:diffusion``, ``generated_pairs:diffusion``), because a diffusion model's
pair costs a sampler's worth of network evaluations where a GAN's costs one.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from lib.study.design import Condition, StudyDesign


def _epochs(cond: Condition, epochs: int) -> float:
    return epochs * (1 + cond.ratio if cond.strategy == "add" else 1)


def study_workload(records: list[dict[str, Any]], steps: dict[int, dict[str, Any]]) -> dict[str, float]:
    """What a study trained, counted from its records and ``steps.json``: segmenter epochs
    (calibration included; every epoch is ``samples_per_epoch`` slices plus one validation pass),
    latent-segmenter steps, the scored conditions, the slices that each cell's image generators
    and VAE trained on (once per cell and generator, shared by its conditions) and the synthetic
    pairs they drew (the pairs a pool kept over the filter's kept share, once per pool). Times
    per unit (``bench/study_cost.py``) turn it into the study's cost on other hardware."""
    per_epoch = {n: int(s["curve"][0][0]) for n, s in steps.items()}
    out: Counter = Counter(segmenter_epochs=sum(len(s["curve"]) for s in steps.values()), conditions=len(records))
    trained: set[tuple] = set()
    pools: dict[tuple, float] = {}
    for r in records:
        epochs = r["steps"] // per_epoch[r["n_real"]]
        if r["strategy"] == "latent":
            out["latent_steps"] += r["steps"]
        else:
            out["segmenter_epochs"] += epochs * (1 + r["ratio"] if r["strategy"] == "add" else 1)
        name = r.get("generator")
        if r.get("generator_epochs") and name and (name, r["n_real"], r["seed"]) not in trained:
            trained.add((name, r["n_real"], r["seed"]))
            key = "vae_slices" if name == "vae" else f"generator_slices:{name}"
            out[key] += r["generator_epochs"] * r["n_real_slices"]
        if r.get("n_synthetic_slices") and name:
            pool = (name, r["n_real"], r["seed"], r["shapes"], r["filtered"])
            drawn = r["n_synthetic_slices"] / max(r.get("synthetic_kept_share") or 1.0, 1e-3)
            pools[pool] = max(pools.get(pool, 0.0), drawn)
    for (name, *_), drawn in pools.items():
        out[f"generated_pairs:{name}"] += drawn
    return dict(out)


def grid_workload(design: StudyDesign, steps: dict[int, dict[str, Any]], generator_samples: int,
                  slices_per_patient: float, kept_share: float = 0.5) -> dict[str, float]:
    """:func:`study_workload` of the whole grid, before it has run: what the design will train
    with the calibrated ``steps`` (each cell's generators see about ``generator_samples``
    slices; a patient has about ``slices_per_patient`` slices; the filter keeps ``kept_share``
    of the pairs drawn)."""
    out = Counter(calibration_workload(steps))
    for n, _ in design.cells():
        out.update(cell_workload(design, n, steps, generator_samples, slices_per_patient, kept_share))
    return dict(out)


def calibration_workload(steps: dict[int, dict[str, Any]]) -> dict[str, float]:
    """The work of :func:`calibrate_steps`: run first, once, before any cell."""
    return {"segmenter_epochs": sum(len(s["curve"]) for s in steps.values())}


def cell_workload(design: StudyDesign, n: int, steps: dict[int, dict[str, Any]], generator_samples: int,
                  slices_per_patient: float, kept_share: float = 0.5) -> dict[str, float]:
    """The work of one cell with ``n`` real patients (the unit of the engine's jobs)."""
    conditions = design.conditions(n)
    out: Counter = Counter(conditions=len(conditions))
    out["segmenter_epochs"] = sum(_epochs(c, steps[n]["epochs"]) for c in conditions if c.strategy != "latent")
    out["latent_steps"] = steps[n]["steps"] * sum(c.strategy == "latent" for c in conditions)
    out["vae_slices"] = generator_samples * any(c.strategy == "latent" for c in conditions)
    synthetic = [c for c in conditions if c.synthetic]
    for name in {c.arm or design.generator for c in synthetic}:
        out[f"generator_slices:{name}"] += generator_samples
    pools = {(c.arm or design.generator, c.shapes, bool(c.filtered)) for c in synthetic}
    for name, shapes, filtered in pools:
        ratio = max(c.ratio for c in synthetic if (c.arm or design.generator, c.shapes, bool(c.filtered))
                    == (name, shapes, filtered))
        out[f"generated_pairs:{name}"] += ratio * n * slices_per_patient / (kept_share if filtered else 1.0)
    return {k: v for k, v in out.items() if v}


def makespan(durations: list[float], workers: int) -> float:
    """Wall-clock of independent jobs of ``durations`` on ``workers`` equal workers, longest job
    first to the first free worker (how the engine's queue fills a cluster)."""
    free = [0.0] * max(1, workers)
    for d in sorted(durations, reverse=True):
        free[free.index(min(free))] += d
    return max(free)
