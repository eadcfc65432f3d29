"""What the synthetic-data study trains, counted in units whose time ``bench/study_cost.py``
measures (segmenter epochs, latent-segmenter steps, generator and VAE slices), and the
wall-clock of its jobs on a number of workers.
"""

from __future__ import annotations

from typing import Any

from lib.study.design import StudyDesign


def study_workload(records: list[dict[str, Any]], steps: dict[int, dict[str, Any]]) -> dict[str, int]:
    """What a study trained, counted from its records and ``steps.json``: segmenter epochs
    (calibration included; every epoch is ``samples_per_epoch`` slices plus one validation pass),
    latent-segmenter steps, the scored conditions, and the slices that each cell's image
    generator and VAE trained on (once per cell, shared by its conditions). Times per unit
    (``bench/study_cost.py``) turn it into the study's cost on other hardware."""
    per_epoch = {n: int(s["curve"][0][0]) for n, s in steps.items()}
    out = {"segmenter_epochs": sum(len(s["curve"]) for s in steps.values()), "latent_steps": 0,
           "conditions": len(records), "generator_slices": 0, "vae_slices": 0}
    trained: set[tuple[str, int, int]] = set()
    for r in records:
        if r["strategy"] == "latent":
            out["latent_steps"] += r["steps"]
        else:
            out["segmenter_epochs"] += r["steps"] // per_epoch[r["n_real"]]
        kind = "vae" if r["strategy"] == "latent" else "generator"
        if r.get("generator_epochs") and (kind, r["n_real"], r["seed"]) not in trained:
            trained.add((kind, r["n_real"], r["seed"]))
            out[f"{kind}_slices"] += r["generator_epochs"] * r["n_real_slices"]
    return out


def grid_workload(design: StudyDesign, steps: dict[int, dict[str, Any]], generator_samples: int) -> dict[str, int]:
    """:func:`study_workload` of the whole grid, before it has run: what the design will train
    with the calibrated ``steps`` (each cell's generators see about ``generator_samples`` slices)."""
    out = calibration_workload(steps)
    for n, _ in design.cells():
        for key, count in cell_workload(design, n, steps, generator_samples).items():
            out[key] += count
    return out


def calibration_workload(steps: dict[int, dict[str, Any]]) -> dict[str, int]:
    """The work of :func:`calibrate_steps`: run first, once, before any cell."""
    return {"segmenter_epochs": sum(len(s["curve"]) for s in steps.values()), "latent_steps": 0, "conditions": 0,
            "generator_slices": 0, "vae_slices": 0}


def cell_workload(design: StudyDesign, n: int, steps: dict[int, dict[str, Any]], generator_samples: int
                  ) -> dict[str, int]:
    """The work of one cell with ``n`` real patients (the unit of the engine's jobs)."""
    conditions = design.conditions(n)
    latent = [c for c in conditions if c.strategy == "latent"]
    return {"segmenter_epochs": steps[n]["epochs"] * (len(conditions) - len(latent)),
            "latent_steps": steps[n]["steps"] * len(latent), "conditions": len(conditions),
            "generator_slices": generator_samples * any(c.synthetic for c in conditions),
            "vae_slices": generator_samples * bool(latent)}


def makespan(durations: list[float], workers: int) -> float:
    """Wall-clock of independent jobs of ``durations`` on ``workers`` equal workers, longest job
    first to the first free worker (how the engine's queue fills a cluster)."""
    free = [0.0] * max(1, workers)
    for d in sorted(durations, reverse=True):
        free[free.index(min(free))] += d
    return max(free)
