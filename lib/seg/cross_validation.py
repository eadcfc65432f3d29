"""Patient-level k-fold cross-validation of a segmentation notebook, its folds run as jobs.

Each fold is notebook 04 (or another) executed by papermill into ``<root>/fold_<i>/`` with the
fold's split (:func:`lib.data.splits.make_folds`: every patient is tested once). The folds are
independent jobs of :mod:`lib.common.engine`: side by side on the cores or GPUs of this machine,
or on a Ray cluster, or one after the other (``engine="serial"``). A fold already scored is skipped;
an interrupted one resumes from its ``last.pt``; a fold that fails is named and the others go on.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from lib.common.atomic import read_json, write_json, write_with
from lib.common.engine import EngineConfig, Job, run_jobs
from lib.common.paths import PROJECT_ROOT
from lib.data.source import resolve_task
from lib.data.splits import make_folds
from lib.seg.tables import cross_validation_table

NOTEBOOKS = PROJECT_ROOT / "notebooks"


def scored(fold_dir: Path, name: str, test: list[str]) -> bool:
    """Whether ``fold_dir`` already holds test scores of ``name`` on exactly ``test``."""
    metrics, post = fold_dir / name / "metrics.json", fold_dir / name / "postprocessing.json"
    return (metrics.is_file() and post.is_file() and sorted(read_json(metrics)["cases"]) == sorted(test)
            and "cases" in read_json(post)["tta+lcc"])


def run_fold(notebook: Path, fold_dir: Path, data: str, papermill_args: list[str]) -> str:
    """Execute ``notebook`` by papermill into ``fold_dir`` with the fold's ``split_file.json``; its
    kernel gets this job's torch threads. Returns the fold folder."""
    import torch

    env = os.environ | {"OMP_NUM_THREADS": str(torch.get_num_threads())}
    done = subprocess.run(
        [sys.executable, "-m", "papermill", "--cwd", str(notebook.parent), "-k", "python3", "--log-level", "WARNING",
         str(notebook), str(fold_dir / notebook.name), "-p", "data", data, "-p", "run_dir", str(fold_dir),
         "-p", "split_file", str(fold_dir / "split_file.json"), *papermill_args],
        env=env, capture_output=True, text=True)
    if done.returncode:
        last = [line for line in done.stderr.strip().splitlines() if line.strip()][-3:]
        raise RuntimeError(f"{notebook.name} failed in {fold_dir} (see {fold_dir / notebook.name}): "
                           + " | ".join(last))
    return str(fold_dir)


def fold_jobs(data: str | Path, root: str | Path, *, folds: int = 5, seed: int = 0,
              start_split: dict[str, Any] | None = None, only: list[int] | None = None,
              notebook: str | Path = "04_unet", name: str = "unet", papermill_args: list[str] = ()
              ) -> tuple[list[Path], list[Job]]:
    """The fold folders of a cross-validation (those scored or to train) and one job per fold
    still to train; writes each fold's ``split_file.json``.

    Args:
        data: an MSD task folder, archive, task name or "demo".
        start_split: a split that becomes fold 0 (its val: fold 1's test).
        only: train just these folds (a screen); the others count only once scored.
        notebook: a notebook of ``notebooks/`` by name, or a path.
        papermill_args: further papermill arguments (``["-p", "preset", "cpu"]``).
    """
    data = str(Path(data).resolve()) if Path(data).exists() else str(data)  # papermill runs in notebooks/
    task = resolve_task(data)
    path = Path(notebook) if Path(notebook).suffix == ".ipynb" else NOTEBOOKS / f"{notebook}.ipynb"
    fold_dirs, jobs = [], []
    for i, split in enumerate(make_folds([c.case_id for c in task.cases], folds, seed, start_split)):
        fold_dir = (Path(root) / f"fold_{i}").resolve()
        if scored(fold_dir, name, split["test"]):
            fold_dirs.append(fold_dir)
            continue
        if only is not None and i not in only:
            continue
        fold_dirs.append(fold_dir)
        write_json(fold_dir / "split_file.json", split)
        jobs.append(Job(f"fold {i} (test {', '.join(split['test'])})", run_fold,
                        {"notebook": path.resolve(), "fold_dir": fold_dir, "data": data,
                         "papermill_args": list(papermill_args)}))
    return fold_dirs, jobs


def run_folds(root: str | Path, fold_dirs: list[Path], jobs: list[Job], name: str = "unet",
              engine: EngineConfig | None = None, progress: bool = True) -> pd.DataFrame:
    """Run the folds' ``jobs`` on ``engine`` and write ``<root>/cross_validation.csv``: one row per
    test patient of the folds scored (:func:`lib.seg.tables.cross_validation_table`).

    Raises:
        RuntimeError: naming every fold that failed, after the others finished.
    """
    failed = run_jobs(jobs, engine or EngineConfig(), lambda job, result: None, shared_dir=root,
                      desc="cross-validation folds", progress=progress)
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(jobs)} fold(s) failed (the others are kept; run again to retry): "
                           + "; ".join(f"{fold}: {err}" for fold, err in failed.items()))
    table = cross_validation_table(fold_dirs, name)
    write_with(Path(root) / "cross_validation.csv", lambda p: table.to_csv(p))
    return table
