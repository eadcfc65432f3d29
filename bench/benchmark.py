"""Benchmark our training pipeline against a plain tutorial-style baseline, plus conversion,
inference and generation speed. Not part of the test suite.

    python bench/benchmark.py [--data PATH] [--image-size 128] [--steps 30] [--out bench/results.json]

Prints a table and writes JSON with the hardware, versions and settings. Both training
pipelines use the same patients, model (U-Net / resnet18), batch size and image size:

* ours: ``lib.seg.train.fit`` (slices cached once in compact in-memory arrays, batched
  on-device augmentation, channels-last, mixed precision where `lib.common.env.amp_dtype` gives
  one: bf16 on GPUs and on CPUs with native bf16);
* baseline: a torch ``Dataset`` that reads and resizes each slice from NIfTI per item
  (nibabel + per-volume normalisation), ``DataLoader``, per-sample flips, fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.step_variants import pure_step_seconds  # noqa: E402
from lib.common.env import amp_dtype, get_device, hardware  # noqa: E402
from lib.data.slices import SliceConfig, build_cache, load_slices  # noqa: E402
from lib.data.task import read_task  # noqa: E402
from lib.seg.forward import predict_probs  # noqa: E402
from lib.seg.inference import probs_to_volume  # noqa: E402
from lib.seg.models import ModelConfig, build_model  # noqa: E402
from lib.seg.train import TrainConfig, fit, loss_fn  # noqa: E402
from lib.synth import diffusion, vae  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "Task02_Heart_dev"


class PeakRSS:
    """Peak resident memory (MiB) of this process while the block runs (sampled every 20 ms),
    or peak CUDA memory on GPU."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak, self._stop = device, 0.0, threading.Event()

    @staticmethod
    def _rss() -> float:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.02)

    def __enter__(self) -> PeakRSS:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated() / 2**20


class NiftiSliceDataset(Dataset):
    """Tutorial-style dataset: every item reads its volume from NIfTI and resizes one slice."""

    def __init__(self, cases, size: int) -> None:
        self.size = size
        self.items = [(c, z) for c in cases for z in range(nib.load(c.image).shape[2])]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        case, z = self.items[i]
        volume = np.asarray(nib.load(case.image).dataobj, dtype=np.float32)
        lo, hi = np.percentile(volume, (0.5, 99.5))
        image = np.clip(volume[:, :, z], lo, hi)
        image = ((image - image.mean()) / (image.std() + 1e-6)).astype(np.float32)
        label = np.asarray(nib.load(case.label).dataobj[:, :, z], dtype=np.float32)
        x = F.interpolate(torch.from_numpy(image)[None, None], size=(self.size, self.size), mode="bilinear")[0]
        y = F.interpolate(torch.from_numpy(label)[None, None], size=(self.size, self.size), mode="nearest")[0, 0]
        if torch.rand(1) < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        return x, y.long()


def baseline_training(cases, size: int, steps: int, batch: int, device: torch.device, workers: int) -> dict:
    """Plain fp32 loop over a DataLoader; returns slices/s and the share of time waiting for data."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="unet", encoder_name="resnet18"), size).to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    criterion = loss_fn(2)
    loader = DataLoader(NiftiSliceDataset(cases, size), batch_size=batch, shuffle=True, num_workers=workers,
                        drop_last=True, persistent_workers=workers > 0)
    wait = total = 0.0
    done = 0
    it = iter(loader)
    with PeakRSS(device) as mem:
        for step in range(steps + 2):
            t0 = time.perf_counter()
            try:
                x, y = next(it)
            except StopIteration:
                it = iter(loader)
                x, y = next(it)
            x, y = x.to(device), y.to(device)
            t1 = time.perf_counter()
            loss = criterion(model(x), y)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            if step >= 2:  # two warm-up steps
                wait, total, done = wait + t1 - t0, total + t2 - t0, done + len(x)
    return {"slices_per_s": done / total, "data_wait_share": wait / total, "peak_memory_mib": mem.peak}


def our_training(cache_dir: Path, ids: list[str], val_ids: list[str], size: int, steps: int, batch: int,
                 device: torch.device) -> dict:
    """lib.seg.train.fit for two short epochs of ``steps`` steps; the second epoch is measured."""
    train = load_slices(cache_dir, ids)
    train = train.subset(np.arange(min(len(train), steps * batch)))
    val = load_slices(cache_dir, val_ids[:1])
    cfg = TrainConfig(epochs=2, batch_size=batch, device=str(device), patience=None)
    with tempfile.TemporaryDirectory() as tmp, PeakRSS(device) as mem:
        result = fit(train, val, ModelConfig(arch="unet", encoder_name="resnet18"), cfg, tmp,
                     {"image_size": size}, progress=False)
    last = result.history[-1]
    return {"slices_per_s": last["slices_per_s"], "data_wait_share": last["data_wait_share"],
            "peak_memory_mib": mem.peak}


def conversion(task_dir: Path, size: int) -> dict:
    """Seconds to convert every patient to cached slices (2 workers), and to reload them."""
    task = read_task(task_dir)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        out = build_cache(task, tmp, SliceConfig(image_size=size), workers=2, progress=False)
        t1 = time.perf_counter()
        load_slices(out, [c.case_id for c in task.cases])
        t2 = time.perf_counter()
    return {"convert_seconds": t1 - t0, "reload_seconds": t2 - t1, "patients": len(task.cases)}


def inference(cache_dir: Path, ids: list[str], size: int, device: torch.device) -> dict:
    """Seconds per 3D volume (predict all slices, resize back, argmax) for each architecture."""
    test = load_slices(cache_dir, ids)
    out = {}
    for arch in ("pspnet", "fpn", "unet"):
        model = build_model(ModelConfig(arch=arch, encoder_name="resnet18"), size).to(device).eval()
        predict_probs(model, test.images[:8], device=device)  # warm-up
        t0 = time.perf_counter()
        for cid, meta in test.cases.items():
            probs_to_volume(predict_probs(model, test.patient(cid).images, device=device), meta)
        out[arch] = (time.perf_counter() - t0) / len(test.cases)
    return out


def generation(cache_dir: Path, ids: list[str], size: int, device: torch.device, n: int) -> dict:
    """Synthetic pairs per second of each generator (after one short training epoch)."""
    train = load_slices(cache_dir, ids).subset(np.arange(64))
    images, masks = train.images.astype(np.float32), train.masks
    common = {"image_size": size, "in_channels": 1, "num_classes": 2, "epochs": 1}
    models = {
        "vae": (vae.train_vae(images, masks, vae.VAEConfig(**common), device=device, progress=False)[0], vae.sample_pairs),
        "diffusion": (diffusion.train_diffusion(images, masks, diffusion.DiffusionConfig(**common), device=device,
                                                progress=False)[0], diffusion.sample_pairs),
    }
    out = {}
    for name, (model, sample) in models.items():
        sample(model, 2, device=device)
        t0 = time.perf_counter()
        sample(model, n, device=device)
        out[name] = n / (time.perf_counter() - t0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MSD task folder (default: Task02_Heart_dev)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20, help="measured training steps per pipeline")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the baseline")
    parser.add_argument("--samples", type=int, default=32, help="pairs drawn per generator")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("bench/results.json"))
    args = parser.parse_args()
    device = get_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    task = read_task(args.data)
    ids = [c.case_id for c in task.cases]
    results: dict = {
        "hardware": hardware(), "device": str(device), "torch": torch.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "mixed_precision": str(amp_dtype(device)),
        "data": os.path.relpath(args.data),
        "settings": {k: os.path.relpath(v) if isinstance(v, Path) else str(v) for k, v in vars(args).items()},
    }
    results.update(conversion(args.data, args.image_size))
    with tempfile.TemporaryDirectory() as tmp:
        cache = build_cache(task, tmp, SliceConfig(image_size=args.image_size), workers=2, progress=False)
        ours = our_training(cache, ids[:-2], ids[-2:], args.image_size, args.steps, args.batch_size, device)
        base = baseline_training(task.cases[:-2], args.image_size, args.steps, args.batch_size, device, args.workers)
        results["pure_step_seconds"] = pure_step_seconds(args.image_size, args.batch_size, device, dtype=amp_dtype(device))
        results["infer_seconds_per_volume"] = inference(cache, ids[-2:], args.image_size, device)
        results["generate_pairs_per_s"] = generation(cache, ids[:-2], args.image_size, device, args.samples)
    results.update({
        "ours_slices_per_s": ours["slices_per_s"], "baseline_slices_per_s": base["slices_per_s"],
        "ours_data_wait_share": ours["data_wait_share"], "baseline_data_wait_share": base["data_wait_share"],
        "ours_peak_memory_mib": ours["peak_memory_mib"], "baseline_peak_memory_mib": base["peak_memory_mib"],
        "speedup": ours["slices_per_s"] / base["slices_per_s"],
        "ours_step_over_pure_step": args.batch_size / ours["slices_per_s"] / results["pure_step_seconds"],
    })
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    width = max(len(k) for k in results)
    for key, value in results.items():
        print(f"{key:<{width}}  {json.dumps(value) if isinstance(value, dict) else value}")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
