"""The job engine on this machine: a chunk of the synthetic-data study and a cross-validation,
each run with ``engine="serial"`` (one job after the other, every core to its torch threads)
and with Ray (one job per core, one thread each), wall-clock and CPU use side by side.

    MSDSEG_AMP=0 python bench/engine_speedup.py --root runs/engine_bench [--out bench/engine_speedup_cpu_2cores_fp32.json]

Study chunk: Task04_Hippocampus at 64 px, 40 test and 10 validation cases held out as in the
published study, ``--seeds`` cells of 1 case each with real only and real + SPADE GAN x1 (the
steps calibrated once, before both runs and not timed). Cross-validation: Task02_Heart_dev,
5 folds of notebook 04 with a fixed number of epochs (no time budget, no early stopping, no
time-based locator), so both engines do the same work. CPU use is read from ``/proc/stat``
(every process of the machine: run it with nothing else running). Run it with ``MSDSEG_AMP=0``
for fp32, as the diary reports it. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib.common.atomic import write_json  # noqa: E402
from lib.common.engine import EngineConfig  # noqa: E402
from lib.common.env import git_sha, hardware  # noqa: E402
from lib.common.paths import PROJECT_ROOT  # noqa: E402
from lib.data.run import prepare_run  # noqa: E402
from lib.seg import workflow  # noqa: E402
from lib.seg.cross_validation import fold_jobs, run_folds  # noqa: E402
from lib.seg.train import TrainConfig  # noqa: E402
from lib.study.analysis import setting_label  # noqa: E402
from lib.study.design import design_run, make_design  # noqa: E402
from lib.study.run import calibrate_steps  # noqa: E402
from lib.study.spec import run_spec, write_spec  # noqa: E402
from lib.synth import gan, vae  # noqa: E402
from lib.synth.shapes import ShapeModelConfig  # noqa: E402

SHARED = PROJECT_ROOT.parent / "shared" / "data"
CV_ARGS = ["-p", "preset", "cpu", "-p", "roi", "False", "-p", "image_size", "128", "-p", "epochs", "3",
           "-p", "time_budget_min", "600", "-p", "patience", "0"]


def cpu_seconds() -> float:
    """User + system CPU seconds of the whole machine since boot."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    return (int(fields[0]) + int(fields[1]) + int(fields[2])) / os.sysconf("SC_CLK_TCK")


def measured(fn) -> tuple[object, dict[str, float]]:
    cpu, t0 = cpu_seconds(), time.perf_counter()
    result = fn()
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu
    return result, {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                    "cpu_use": round(cpu / (wall * os.cpu_count()), 3)}


ENGINES = ("serial", "ray")


def engines(cores: int, names: list[str]) -> dict[str, EngineConfig]:
    known = {"serial": EngineConfig("serial", num_cpus=cores), "ray": EngineConfig("ray", num_cpus=1)}
    return {name: known[name] for name in names}


def study_chunk(root: Path, seeds: int, generator_samples: int, cores: int, names: list[str]) -> dict:
    """The chunk run by each engine in its own run folder, the steps calibrated once (not timed)."""
    out, steps_file = {}, None
    for name, engine in engines(cores, names).items():
        folder = root / f"study_{name}"
        shutil.rmtree(folder, ignore_errors=True)
        run = prepare_run(str(SHARED / "Task04_Hippocampus"), folder, image_size=64, seed=0, progress=False)
        design = make_design(run, n_test=40, n_val=10, n_real=[1], seeds=[seeds], strategies=["real", "mix"],
                             ablations=False)
        srun = design_run(run, design)
        common = {"image_size": 64, "in_channels": 1, "num_classes": run.task.num_classes}
        model_cfg, train_cfg = workflow.model_config(srun, "unet"), TrainConfig(samples_per_epoch=128, patience=None)
        spec = write_spec(run, design, model_cfg, train_cfg, gan.SPADEGANConfig(**common, epochs=1),
                          vae.VAEConfig(**common, epochs=1), shape_cfg=ShapeModelConfig(),
                          generator_samples=generator_samples, max_epochs=10, device="cpu")
        if steps_file is None:
            calibrate_steps(srun, design, model_cfg, train_cfg, max_epochs=10, progress=False)
            steps_file = folder / "study" / "steps.json"
        else:
            shutil.copy(steps_file, folder / "study" / "steps.json")
        (_, _, records), usage = measured(lambda spec=spec, engine=engine: run_spec(spec, engine,
                                                                                    progress=False))
        by_setting: dict[str, list[float]] = {}
        for r in records:
            by_setting.setdefault(setting_label(r), []).append(r["mean_dice"])
        out[name] = usage | {"threads_per_job": int(engine.num_cpus), "cells": seeds, "records": len(records),
                             "mean_test_dice": {k: round(float(np.mean(v)), 4) for k, v in by_setting.items()}}
        print("study", name, out[name], flush=True)
    return out


def cross_validation(root: Path, cores: int, names: list[str]) -> dict:
    """Task02_Heart_dev, 5 folds of notebook 04 with a fixed amount of work, by each engine."""
    out = {}
    for name, engine in engines(cores, names).items():
        folder = root / f"cv_{name}"
        shutil.rmtree(folder, ignore_errors=True)
        fold_dirs, jobs = fold_jobs(SHARED / "Task02_Heart_dev", folder, folds=5, papermill_args=CV_ARGS)
        table, usage = measured(lambda f=folder, d=fold_dirs, j=jobs, e=engine: run_folds(f, d, j, engine=e,
                                                                                         progress=False))
        out[name] = usage | {"threads_per_job": int(engine.num_cpus), "folds": len(fold_dirs),
                             "mean_test_dice": round(float(table["dice"].mean()), 4)}
        print("cross-validation", name, out[name], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path("runs/engine_bench"))
    parser.add_argument("--seeds", type=int, default=4, help="cells of the study chunk (1 case, one seed each)")
    parser.add_argument("--generator-samples", type=int, default=1000, help="slices each cell's GAN trains on")
    parser.add_argument("--only", choices=["study", "cv"], help="run one of the two")
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES),
                        help="engines to measure (a measurement split over two sittings: one each)")
    parser.add_argument("--out", type=Path, default=Path("bench/engine_speedup_cpu_2cores_fp32.json"))
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    report = {"hardware": hardware(), "cores": cores, "commit": git_sha(), "precision": "fp32" if os.environ.get("MSDSEG_AMP") == "0"
              else "autocast where the hardware has it (MSDSEG_AMP unset)",
              "command": "python bench/engine_speedup.py " + " ".join(sys.argv[1:]), "cv_arguments": CV_ARGS}
    if args.only != "cv":
        report["study_chunk"] = study_chunk(args.root, args.seeds, args.generator_samples, cores, args.engines)
    if args.only != "study":
        report["cross_validation"] = cross_validation(args.root, cores, args.engines)
    write_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
