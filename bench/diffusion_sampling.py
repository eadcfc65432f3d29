"""How the diffusion model's sampler settings change the quality of its pairs.

    python bench/diffusion_sampling.py RUN_DIR [--settings ddim:100 dpmpp_2m:15 dpmpp_2m:20 dpmpp_2m:25] \
        [--steps 20 50 100 --eta 0 1] [--n 128] [--out bench/diffusion_samplers_cpu_2threads.json] \
        [--data TASK_DIR --train-minutes 20 --image-size 128]

Loads the trained diffusion model (``generators/diffusion``) and the reference U-Net (``unet``)
of a notebook-05 run folder, draws ``--n`` new masks from the shape model fitted as the notebook
does (training patients of the run's split, seed 0), generates their images (same masks, same
noise seed) with every sampler setting and scores all of them in one quality table
(:func:`lib.synth.quality.quality_table`, against the run's validation and test slices), with
the seconds each setting took. With ``--data``, a run folder without them is prepared first
(split seed 0) and both are trained: the diffusion model with notebook 05's real-data settings
for ``--train-minutes``, the U-Net for a third of that. A setting is ``SAMPLER:STEPS`` (``DiffusionConfig.sampler``:
``ddim`` or ``dpmpp_2m``) or ``ddim:STEPS:ETA`` (eta 0: deterministic DDIM, the model's sampler;
1: DDPM-like noise at every step); ``--steps`` with ``--eta`` adds every DDIM combination of
them (the grid of ``diffusion_sampling_cpu_2threads.json``). Default: 100 DDIM steps against
DPM-Solver++(2M) at 15, 20 and 25. Sampling only: nothing is trained. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from monai.networks.schedulers import DDIMScheduler

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib.common.atomic import read_json, write_json  # noqa: E402
from lib.common.env import hardware  # noqa: E402
from lib.data.run import prepare_run  # noqa: E402
from lib.data.slices import concat  # noqa: E402
from lib.seg import workflow  # noqa: E402
from lib.seg.train import TrainConfig  # noqa: E402
from lib.synth import diffusion, quality, shapes  # noqa: E402

STEP = DDIMScheduler.step


def with_eta(eta: float, seed: int) -> None:
    """Make every DDIM step add the noise of ``eta`` (drawn from one seeded CPU generator)."""
    generator = torch.Generator().manual_seed(seed)
    DDIMScheduler.step = lambda self, out, t, x: STEP(self, out, t, x, eta=eta, generator=generator if eta else None)


def parse_setting(text: str) -> tuple[str, int, float]:
    """``SAMPLER:STEPS`` or ``ddim:STEPS:ETA`` -> (sampler, steps, eta)."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or parts[0] not in diffusion.SAMPLERS or (len(parts) == 3 and parts[0] != "ddim"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected SAMPLER:STEPS (SAMPLER one of "
                                         f"{', '.join(diffusion.SAMPLERS)}) or ddim:STEPS:ETA")
    try:
        return parts[0], int(parts[1]), float(parts[2]) if len(parts) == 3 else 0.0
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: STEPS must be an integer, ETA a number") from None


def setting_name(sampler: str, steps: int, eta: float) -> str:
    name = f"{diffusion.SAMPLERS[sampler]} {steps} steps"
    return f"{name}, eta {eta:g}" if sampler == "ddim" else name


def train_missing(run_dir: Path, data: str, image_size: int, minutes: float) -> None:
    """Prepare ``run_dir`` from ``data`` and train what the comparison needs and the folder lacks."""
    run = prepare_run(data, run_dir, image_size=image_size, seed=0, progress=False)
    train = run.slices("train")
    if not (run_dir / "unet" / "best.pt").is_file():
        workflow.train_model(run, "unet", workflow.model_config(run, "unet"),
                             TrainConfig(epochs=1000, time_budget_min=minutes / 3, patience=None, seed=0), progress=False)
    cfg = diffusion.DiffusionConfig(image_size=image_size, in_channels=run.in_channels, num_classes=run.task.num_classes,
                                    epochs=10_000, base_channels=16, batch_size=16, lr=2e-3, time_budget_min=minutes)
    diffusion.train_diffusion(train.images.astype(np.float32), train.masks, cfg, out_dir=run_dir / "generators" / "diffusion",
                              progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--settings", type=parse_setting, nargs="+", metavar="SAMPLER:STEPS[:ETA]",
                        help="sampler settings to compare (default: ddim:100 dpmpp_2m:15 dpmpp_2m:20 dpmpp_2m:25)")
    parser.add_argument("--steps", type=int, nargs="+", default=[], help="DDIM steps, each with every --eta")
    parser.add_argument("--eta", type=float, nargs="+", default=[0.0])
    parser.add_argument("--n", type=int, default=128, help="new masks (pairs) per setting")
    parser.add_argument("--shape-variance", type=float, default=0.95, help="the notebook's shape_variance")
    parser.add_argument("--out", type=Path, default=Path("bench/diffusion_samplers_cpu_2threads.json"))
    parser.add_argument("--data", help="task folder to prepare RUN_DIR from and train the diffusion model and U-Net on")
    parser.add_argument("--train-minutes", type=float, default=20.0, help="the diffusion model's budget with --data")
    parser.add_argument("--image-size", type=int, default=128, help="slice size with --data")
    args = parser.parse_args()
    if args.data:
        train_missing(args.run_dir, args.data, args.image_size, args.train_minutes)
    settings = list(args.settings or []) + [("ddim", steps, eta) for eta in args.eta for steps in args.steps]
    if not settings:
        settings = [("ddim", 100, 0.0), ("dpmpp_2m", 15, 0.0), ("dpmpp_2m", 20, 0.0), ("dpmpp_2m", 25, 0.0)]
    meta = read_json(args.run_dir / "run.json")
    run = prepare_run(meta["task_dir"], args.run_dir, image_size=meta["image_size"], seed=0, progress=False)
    train, held = run.slices("train"), concat(run.slices("val"), run.slices("test"))
    images, masks = train.images.astype(np.float32), train.masks
    shape_model = shapes.ShapeModel.fit(masks, run.task.num_classes,
                                        shapes.ShapeModelConfig(variance_kept=args.shape_variance, seed=0))
    new_masks = shape_model.sample(args.n, seed=0)
    model, cfg, history = diffusion.load_diffusion(args.run_dir / "generators" / "diffusion" / diffusion.CHECKPOINT_NAME)
    unet, _ = workflow.reload_model(run, "unet", "cpu", single_slice=True)
    model.cfg = replace(cfg, sample_steps=1)  # untimed warm-up: the first batch sets up the kernels
    diffusion.generate_images(model, new_masks[:64], seed=0)
    pairs, seconds, described = {}, {}, {}
    for sampler, steps, eta in settings:
        name = setting_name(sampler, steps, eta)
        model.cfg = replace(cfg, sampler=sampler, sample_steps=steps)
        with_eta(eta, seed=1)
        t0 = time.perf_counter()
        pairs[name] = (diffusion.generate_images(model, new_masks, seed=0), new_masks)
        seconds[name] = time.perf_counter() - t0
        described[name] = {"sampler": sampler, "steps": steps, "eta": eta if sampler == "ddim" else None}
        print(f"{name}: {seconds[name]:.0f} s", flush=True)
    DDIMScheduler.step = STEP
    table = quality.quality_table((images, masks), (held.images.astype(np.float32), held.masks), pairs,
                                  workflow.predict_masks_fn(unet, "cpu"), unet.encoder, new_masks=set(pairs))
    for name, row in table.items():
        row["sample_seconds"] = seconds.get(name)
        print(name, {k: round(v, 3) for k, v in row.items() if isinstance(v, float)})
    write_json(args.out, {"run_dir": str(args.run_dir), "dataset": run.dataset_name, "hardware": hardware(),
                          "threads": torch.get_num_threads(), "n_masks": args.n,
                          "trained_epochs": len(history),
                          "trained_minutes": sum(r["seconds"] for r in history) / 60, "settings": described,
                          "table": table})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
