"""Where a training step of the recommended CPU recipe spends its time.

    python bench/profile_step.py [--image-size 128] [--context 1] [--batch-size 16] [--steps 10] \
        [--out bench/profile_step.json]

Runs the trainer's own pieces on random slices shaped like the ``cpu`` preset's input (2.5D
crops): batched augmentation, forward + loss, backward, AdamW step, each timed separately
(median over ``--steps`` after two warm-up steps), in fp32 and, where
:func:`lib.common.env.amp_dtype` gives bf16 for the CPU, in bf16 too; the locator's 64 px step beside it; and torch.profiler's
operators that take most of one fp32 step. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib.common.atomic import write_json  # noqa: E402
from lib.common.env import amp_dtype, get_device, hardware  # noqa: E402
from lib.seg.augment import AugmentConfig, augment_batch  # noqa: E402
from lib.seg.models import ModelConfig, build_model  # noqa: E402
from lib.seg.roi import LOCATOR_SIZE, locator_config  # noqa: E402
from lib.seg.train import loss_fn  # noqa: E402


def step_parts(model_cfg: ModelConfig, size: int, batch: int, device: torch.device, dtype: torch.dtype | None,
               steps: int) -> dict[str, float]:
    """Median seconds of each part of a training step, and slices per second of the whole."""
    torch.manual_seed(0)
    model = build_model(model_cfg, size).to(device, memory_format=torch.channels_last)
    opt, criterion, gen = torch.optim.AdamW(model.parameters()), loss_fn(model_cfg.num_classes), torch.Generator()
    x0 = torch.randn(batch, model_cfg.in_channels, size, size, device=device)
    y0 = (torch.rand(batch, size, size, device=device) > 0.8).long()
    parts: dict[str, list[float]] = {"augment": [], "forward + loss": [], "backward": [], "optimizer": []}

    def timed(name: str, fn):
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        parts[name].append(time.perf_counter() - t0)
        return out

    for i in range(steps + 2):
        x, y = timed("augment", lambda: augment_batch(x0, y0, AugmentConfig(), gen))
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = timed("forward + loss", lambda x=x, y=y: criterion(model(x), y))
        opt.zero_grad(set_to_none=True)
        timed("backward", loss.backward)
        timed("optimizer", opt.step)
        if i < 2:
            for v in parts.values():
                v.clear()
    out = {name: float(np.median(v)) for name, v in parts.items()}
    out["slices_per_s"] = batch / sum(out.values())
    return out


def top_operators(model_cfg: ModelConfig, size: int, batch: int, device: torch.device, n: int = 12) -> list[dict]:
    """torch.profiler's most expensive operators (self CPU time) over three fp32 steps."""
    model = build_model(model_cfg, size).to(device, memory_format=torch.channels_last)
    opt, criterion = torch.optim.AdamW(model.parameters()), loss_fn(model_cfg.num_classes)
    x = torch.randn(batch, model_cfg.in_channels, size, size).contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch, size, size) > 0.8).long()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            loss = criterion(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [{"op": e.key, "share": e.self_cpu_time_total / total} for e in events[:n]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--context", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("bench/profile_step.json"))
    args = parser.parse_args()
    device = get_device(args.device)
    unet = ModelConfig("unet", "resnet18", in_channels=2 * args.context + 1, num_classes=2)
    results = {"hardware": hardware(), "torch": torch.__version__, "image_size": args.image_size,
               "batch_size": args.batch_size, "in_channels": unet.in_channels,
               "fp32": step_parts(unet, args.image_size, args.batch_size, device, None, args.steps),
               "locator fp32": step_parts(locator_config(1), LOCATOR_SIZE, args.batch_size, device, None, args.steps),
               "top fp32 operators": top_operators(unet, args.image_size, args.batch_size, device)}
    low = amp_dtype(device)
    if low is not None:
        results[str(low).replace("torch.", "")] = step_parts(unet, args.image_size, args.batch_size, device, low,
                                                             args.steps)
    write_json(args.out, results)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
