"""What a synthetic-data study (notebook 05, ``msdseg-study``) costs on this machine, in fp32 and in bf16.

    python bench/study_cost.py RUN_DIR [RUN_DIR ...] [--device cuda] [--threads 1] [--workers 1 2 4 8 16 32] \
        [--out bench/study_cost_cpu_2threads.json]

For each run folder holding a study (``study/spec.json``, ``design.json``, ``steps.json``, and
``results.json`` once cells have run), it times the units of work on the study's own slices
(the cell of the smallest patient count, seed 0) with the study's own settings and code paths:
one segmenter epoch (``samples_per_epoch`` slices and the validation pass), scoring one
condition on the test patients, one slice of training and one generated pair of each image
generator of the design (its sampler and steps), one slice of VAE training and one
latent-segmenter step. It multiplies them by :func:`lib.study.cost.study_workload` of the
records (what the study trained so far, calibration included) and by
:func:`lib.study.cost.grid_workload` (the whole grid, before it has run). The sample filter
and the quality table of each pool are not timed (a few per cent). ``--workers``: the grid's
wall-clock when its cells run as jobs of :mod:`lib.common.engine` on that many workers of
``--threads`` torch threads each (the calibration first, then the cells longest first,
:func:`lib.study.cost.makespan`), assuming each worker has its own cores, as on a machine with
``workers x threads`` cores or a cluster. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib.common.atomic import read_json, write_json  # noqa: E402
from lib.common.env import hardware  # noqa: E402
from lib.data.run import prepare_run  # noqa: E402
from lib.seg.forward import predict_probs  # noqa: E402
from lib.seg.train import fit  # noqa: E402
from lib.study import latent  # noqa: E402
from lib.study.cost import (  # noqa: E402
    calibration_workload,
    cell_workload,
    grid_workload,
    makespan,
    study_workload,
)
from lib.study.design import StudyDesign  # noqa: E402
from lib.study.run import IMAGE_GENERATORS, read_steps  # noqa: E402
from lib.study.spec import load_spec, spec_path  # noqa: E402
from lib.synth import vae  # noqa: E402


def timed(fn, device: str) -> float:
    t0 = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def generator_units(name: str, cfg, images: np.ndarray, masks: np.ndarray, device: str) -> dict[str, float]:
    """Seconds per training slice and per generated pair of image generator ``name``."""
    train_fn, generate, _ = IMAGE_GENERATORS[name]
    t0 = time.perf_counter()
    model = train_fn(images, masks, replace(cfg, epochs=1, time_budget_min=None), device=device, progress=False)[0]
    train_s = time.perf_counter() - t0
    sample = masks[:16]
    generate(model, sample[:2], seed=0, device=device)  # warm-up
    sample_s = timed(lambda: generate(model, sample, seed=1, device=device), device)
    return {f"generator_slices:{name}": train_s / len(images), f"generated_pairs:{name}": sample_s / len(sample)}


def unit_seconds(run_dir: Path, device: str) -> dict[str, float]:
    """Seconds of each unit of the study's work (keys as :mod:`lib.study.cost` counts them), on
    the cell (smallest patient count, seed 0) of the study in ``run_dir``."""
    spec = load_spec(spec_path(run_dir))
    design: StudyDesign = spec["design"]
    prepare = spec["prepare"]
    run = prepare_run(prepare["data"], run_dir, None, prepare["image_size"], prepare["seed"],
                      ct_window=tuple(prepare["ct_window"]) if prepare["ct_window"] else None, progress=False)
    srun = replace(run, split=design.split())
    train, val, test = srun.slices("train"), srun.slices("val"), srun.slices("test")
    real = train.subset(np.flatnonzero(np.isin(train.case_ids, design.subset(min(design.n_real), 0))))
    images, masks = real.images.astype(np.float32), real.masks
    cfg = replace(spec["train"], epochs=2, patience=None, device=device, checkpoint_minutes=1e9)
    model_cfg = spec["model"]
    generators = {design.generator: spec["generator"]} | ({design.arm: spec["arm"]} if design.arm else {})
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        result = fit(real, val, model_cfg, replace(cfg, epochs=1), Path(tmp) / "warm", srun.data_settings(),
                     keep="none", progress=False)
        out["segmenter_epochs"] = timed(lambda: fit(real, val, model_cfg, cfg, Path(tmp) / "seg", srun.data_settings(),
                                                    keep="none", progress=False), device) / cfg.epochs
        out["conditions"] = timed(lambda: predict_probs(result.model, test.images, device=device), device)
        for name, gen_cfg in generators.items():
            out |= generator_units(name, gen_cfg, images, masks, device)
        vae_cfg = replace(spec["vae"], epochs=1, time_budget_min=None)
        vae_model = {}
        out["vae_slices"] = timed(lambda: vae_model.update(m=vae.train_vae(images, masks, vae_cfg, device=device,
                                                                           progress=False)[0]), device) / len(real)
        out["latent_steps"] = timed(lambda: latent.train_latent_segmenter(
            vae_model["m"], images, masks, steps=20, batch_size=cfg.batch_size, device=device, progress=False),
            device) / 20
    return out


def cost(work: dict[str, float], unit: dict[str, float]) -> float:
    """Hours of ``work`` at ``unit`` seconds per unit."""
    return sum(count * unit[key] for key, count in work.items()) / 3600


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--kept-share", type=float, default=0.5, help="share of drawn pairs the filter keeps (for "
                        "the grid before it has run; the records say what it kept)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (on a GPU: fp32 and the GPU's autocast dtype)")
    parser.add_argument("--threads", type=int, help="torch threads per worker (default: torch's)")
    parser.add_argument("--workers", type=int, nargs="*", default=[], help="wall-clock of the grid on these many "
                        "workers of --threads threads each")
    parser.add_argument("--out", type=Path, default=Path("bench/study_cost_cpu_2threads.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    report: dict = {"threads": torch.get_num_threads(), "studies": {}}
    for run_dir in args.run_dirs:
        spec = load_spec(spec_path(run_dir))
        design = spec["design"]
        records = read_json(run_dir / "study" / "results.json") if (run_dir / "study" / "results.json").is_file() else []
        steps = read_steps(run_dir / "study" / "steps.json")
        meta = read_json(run_dir / "run.json")
        run = prepare_run(meta["task_dir"], run_dir, image_size=meta["image_size"], seed=0, progress=False)
        slices = run.slices("train")
        per_patient = len(slices) / len(set(slices.case_ids))
        grid = {"generator_samples": spec["generator_samples"], "slices_per_patient": per_patient,
                "kept_share": args.kept_share}
        work = {"recorded": study_workload(records, steps), "full grid": grid_workload(design, steps, **grid)}
        entry = {"dataset": design.dataset, "design": design.id, "workload": work, "grid": grid}
        for name, amp in [("fp32", "0"), ("bf16", "1")]:
            os.environ["MSDSEG_AMP"] = amp
            unit = unit_seconds(run_dir, args.device)
            hours = {k: cost(w, unit) for k, w in work.items()}
            entry[name] = {"hardware": hardware(), "unit_seconds": unit} | {f"hours, {k}": h for k, h in hours.items()}
            if args.workers:
                calibration = cost(calibration_workload(steps), unit)
                cells = [cost(cell_workload(design, n, steps, **grid), unit) for n, _ in design.cells()]
                entry[name]["wall-clock hours of the full grid by workers"] = {
                    w: calibration + makespan(cells, w) for w in args.workers}
            print(run_dir.name, name, json.dumps(entry[name], indent=1))
        report["studies"][run_dir.name] = entry
    write_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
