"""Training-step throughput of the U-Net under precision, memory-layout and size choices.

    python bench/step_variants.py [--image-size 128] [--batch-size 16] [--out bench/step_variants.json]

Times forward + backward + AdamW step on random tensors (median of ``--steps`` after two
warm-up steps) for fp32 vs bf16 autocast, NCHW vs channels-last, the default vs a light
decoder, and a smaller image, to show where a CPU (or GPU) step's time goes. Not part of
the test suite.
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

from lib.common.env import get_device, hardware  # noqa: E402
from lib.seg.models import ModelConfig, build_model  # noqa: E402
from lib.seg.train import loss_fn  # noqa: E402

LIGHT = {"decoder_channels": [128, 64, 32, 16, 8]}
VARIANTS = {  # name: (decoder options, bf16 autocast, channels-last, image size factor)
    "fp32": ({}, False, False, 1.0),
    "fp32 + channels-last": ({}, False, True, 1.0),
    "bf16": ({}, True, False, 1.0),
    "bf16 + channels-last": ({}, True, True, 1.0),
    "bf16 + channels-last, light decoder": (LIGHT, True, True, 1.0),
    "fp32, 3/4 image size": ({}, False, False, 0.75),
}


def pure_step_seconds(size: int, batch: int, device: torch.device, *, decoder: dict | None = None,
                      dtype: torch.dtype | None = None, channels_last: bool = True, steps: int = 10) -> float:
    """Median seconds of one forward + backward + AdamW step of the U-Net / resnet18 on random
    tensors, with autocast to ``dtype`` (None: fp32)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="unet", encoder_name="resnet18", decoder=decoder or {}), size).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters())
    criterion = loss_fn(2)
    x = torch.randn(batch, 1, size, size, device=device).contiguous(memory_format=fmt)
    y = (torch.rand(batch, size, size, device=device) > 0.9).long()
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = criterion(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("bench/step_variants.json"))
    args = parser.parse_args()
    device = get_device(args.device)
    results = {"hardware": hardware(), "torch": torch.__version__, "image_size": args.image_size,
               "batch_size": args.batch_size, "slices_per_s": {}}
    for name, (decoder, bf16, channels_last, factor) in VARIANTS.items():
        size = int(args.image_size * factor) // 32 * 32
        seconds = pure_step_seconds(size, args.batch_size, device, decoder=decoder,
                                    dtype=torch.bfloat16 if bf16 else None, channels_last=channels_last,
                                    steps=args.steps)
        speed = args.batch_size / seconds
        results["slices_per_s"][f"{name} ({size} px)"] = speed
        print(f"{name + f' ({size} px)':45s} {speed:7.1f} slices/s", flush=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
