"""How the diffusion model's DDIM sampler settings change the quality of its pairs.

    python bench/diffusion_sampling.py RUN_DIR [--steps 20 50 100] [--eta 0] [--n 128] \
        [--out bench/diffusion_sampling_cpu_2threads.json]

Loads the trained diffusion model (``generators/diffusion``) and the reference U-Net (``unet``)
of a notebook-05 run folder, draws ``--n`` new masks from the shape model fitted as the notebook
does (training patients of the run's split, seed 0), generates their images with every
combination of ``--steps`` (DDIM steps) and ``--eta`` (0: deterministic DDIM, the model's
sampler; 1: DDPM-like noise at every step) and scores all of them in one quality table
(:func:`lib.synth.quality.quality_table`, against the run's validation and test slices), with
the seconds each setting took. Sampling only: nothing is trained. Not part of the test suite.
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
from lib.synth import diffusion, quality, shapes  # noqa: E402

STEP = DDIMScheduler.step


def with_eta(eta: float, seed: int) -> None:
    """Make every DDIM step add the noise of ``eta`` (drawn from one seeded CPU generator)."""
    generator = torch.Generator().manual_seed(seed)
    DDIMScheduler.step = lambda self, out, t, x: STEP(self, out, t, x, eta=eta, generator=generator if eta else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 50, 100])
    parser.add_argument("--eta", type=float, nargs="+", default=[0.0])
    parser.add_argument("--n", type=int, default=128, help="new masks (pairs) per setting")
    parser.add_argument("--shape-variance", type=float, default=0.95, help="the notebook's shape_variance")
    parser.add_argument("--out", type=Path, default=Path("bench/diffusion_sampling_cpu_2threads.json"))
    args = parser.parse_args()
    meta = read_json(args.run_dir / "run.json")
    run = prepare_run(meta["task_dir"], args.run_dir, image_size=meta["image_size"], seed=0, progress=False)
    train, held = run.slices("train"), concat(run.slices("val"), run.slices("test"))
    images, masks = train.images.astype(np.float32), train.masks
    shape_model = shapes.ShapeModel.fit(masks, run.task.num_classes,
                                        shapes.ShapeModelConfig(variance_kept=args.shape_variance, seed=0))
    new_masks = shape_model.sample(args.n, seed=0)
    model, cfg, history = diffusion.load_diffusion(args.run_dir / "generators" / "diffusion" / diffusion.CHECKPOINT_NAME)
    unet, _ = workflow.reload_model(run, "unet", "cpu", single_slice=True)
    pairs, seconds = {}, {}
    for eta in args.eta:
        for steps in args.steps:
            name = f"{steps} steps, eta {eta:g}"
            model.cfg = replace(cfg, sample_steps=steps)
            with_eta(eta, seed=1)
            t0 = time.perf_counter()
            pairs[name] = (diffusion.generate_images(model, new_masks, seed=0), new_masks)
            seconds[name] = time.perf_counter() - t0
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
                          "trained_minutes": sum(r["seconds"] for r in history) / 60, "table": table})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
