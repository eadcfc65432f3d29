"""What a synthetic-data study (notebook 05) costs on this machine, in fp32 and in bf16.

    python bench/study_cost.py RUN_DIR [RUN_DIR ...] [--device cuda] [--threads 1] [--workers 1 2 4 8 16 32] \
        [--out bench/study_cost_cpu_2threads.json]

For each run folder holding a study (``study/design.json``, ``steps.json``, ``results.json``)
and the generators of notebook 05 (their settings are the study's), it times the units of
work on the study's own slices with the real code paths: one segmenter epoch
(``samples_per_epoch`` slices and the validation pass), scoring one condition on the test
patients, one slice of image-generator and of VAE training, and one latent-segmenter step.
It multiplies them by :func:`lib.study.cost.study_workload` of the records (what the study trained,
calibration included), which gives the study's cost for the conditions recorded so far and, scaled
by the design's number of conditions, for the whole grid. Sampling and filtering the synthetic
pairs are not timed (a few per cent). ``--workers``: the grid's wall-clock when its cells run as
jobs of :mod:`lib.common.engine` on that many workers of ``--threads`` torch threads each (the
calibration first, then the cells longest first, :func:`lib.study.cost.makespan`), assuming each
worker has its own cores, as on a machine with ``workers x threads`` cores or a cluster.
Not part of the test suite.
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
from lib.seg import workflow  # noqa: E402
from lib.seg.forward import predict_probs  # noqa: E402
from lib.seg.train import TrainConfig, fit  # noqa: E402
from lib.study import latent  # noqa: E402
from lib.study.cost import (  # noqa: E402
    calibration_workload,
    cell_workload,
    grid_workload,
    makespan,
    study_workload,
)
from lib.study.design import StudyDesign, read_design  # noqa: E402
from lib.study.run import read_steps  # noqa: E402
from lib.synth import gan, vae  # noqa: E402

UNITS = {"segmenter_epochs": "segmenter_epoch", "conditions": "condition_scoring", "generator_slices": "generator_slice",
         "vae_slices": "vae_slice", "latent_steps": "latent_step"}  # workload count: its unit time


def timed(fn, device: str) -> float:
    t0 = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def unit_seconds(run_dir: Path, design: StudyDesign, samples_per_epoch: int, device: str) -> dict[str, float]:
    """Seconds of each unit of the study's work, on the cell (1 real patient, seed 0) of ``run_dir``."""
    meta = read_json(run_dir / "run.json")
    run = prepare_run(meta["task_dir"], run_dir, image_size=meta["image_size"], seed=0, progress=False)
    srun = replace(run, split=design.split())
    train, val, test = srun.slices("train"), srun.slices("val"), srun.slices("test")
    real = train.subset(np.flatnonzero(np.isin(train.case_ids, design.subset(1, 0))))
    images, masks = real.images.astype(np.float32), real.masks
    gan_cfg = gan.load_gan(run_dir / "generators" / "spade_gan" / "spade_gan.pt")[1]
    vae_model, vae_cfg, _ = vae.load_vae(run_dir / "generators" / "vae" / vae.CHECKPOINT_NAME)
    cfg = TrainConfig(samples_per_epoch=samples_per_epoch, epochs=2, patience=None, device=device)
    model_cfg = workflow.model_config(srun, "unet")
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        result = fit(real, val, model_cfg, replace(cfg, epochs=1), Path(tmp) / "warm", srun.data_settings(),
                     keep="none", progress=False)
        out["segmenter_epoch"] = timed(lambda: fit(real, val, model_cfg, cfg, Path(tmp) / "seg", srun.data_settings(),
                                                   keep="none", progress=False), device) / cfg.epochs
        out["condition_scoring"] = timed(lambda: predict_probs(result.model, test.images, device=device), device)
        out["generator_slice"] = timed(lambda: gan.train_gan(images, masks, replace(gan_cfg, epochs=1, time_budget_min=None),
                                                             device=device, progress=False), device) / len(real)
        out["vae_slice"] = timed(lambda: vae.train_vae(images, masks, replace(vae_cfg, epochs=1, time_budget_min=None),
                                                       device=device, progress=False), device) / len(real)
        out["latent_step"] = timed(lambda: latent.train_latent_segmenter(
            vae_model, images, masks, steps=20, batch_size=cfg.batch_size, device=device, progress=False),
            device) / 20
    return out


def cost(work: dict[str, int], unit: dict[str, float]) -> float:
    """Hours of ``work`` at ``unit`` seconds per unit."""
    return sum(work[u] * unit[s] for u, s in UNITS.items()) / 3600


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--samples-per-epoch", type=int, default=128, help="the study's study_samples_per_epoch")
    parser.add_argument("--generator-samples", type=int, default=8000, help="the study's study_generator_samples")
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
        design = read_design(run_dir / "study" / "design.json")
        records = read_json(run_dir / "study" / "results.json") if (run_dir / "study" / "results.json").is_file() else []
        steps = read_steps(run_dir / "study" / "steps.json")
        work = {"recorded": study_workload(records, steps),
                "full grid": grid_workload(design, steps, args.generator_samples)}
        entry = {"dataset": design.dataset, "design": design.id, "workload": work}
        for name, amp in [("fp32", "0"), ("bf16", "1")]:
            os.environ["MSDSEG_AMP"] = amp
            unit = unit_seconds(run_dir, design, args.samples_per_epoch, args.device)
            hours = {k: cost(w, unit) for k, w in work.items()}
            entry[name] = {"hardware": hardware(), "unit_seconds": unit} | {f"hours, {k}": h for k, h in hours.items()}
            if args.workers:
                calibration = cost(calibration_workload(steps), unit)
                cells = [cost(cell_workload(design, n, steps, args.generator_samples), unit)
                         for n, _ in design.cells()]
                entry[name]["wall-clock hours of the full grid by workers"] = {
                    w: calibration + makespan(cells, w) for w in args.workers}
            print(run_dir.name, name, json.dumps(entry[name], indent=1))
        report["studies"][run_dir.name] = entry
    write_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
