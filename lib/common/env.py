"""Runtime environment: device choice, mixed precision, seeds, and a one-line report of versions."""

from __future__ import annotations

import os
import platform
import random
import subprocess

import numpy as np
import torch

from lib.common.paths import PROJECT_ROOT


def get_device(device: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA when available, else CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


# torch's own CPU feature probes (private, hence looked up defensively: absent means no).
_NATIVE_BF16_PROBES = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The mixed-precision dtype for ``device``, or None where fp32 is faster.

    On CUDA by compute capability, not by what torch can emulate: bf16 where the GPU has it
    natively (8.0 and newer: A100, L4, RTX 30xx/40xx, H100), fp16 with a gradient scaler on
    older GPUs with fast fp16 (6.0-7.5: P100, V100, the T4 of free Colab; emulated bf16 there
    is slow), fp32 below. On CPUs bf16 only with native bf16 instructions (AVX512-BF16 or AMX,
    where oneDNN runs bf16 convolutions about twice as fast as fp32), else None. The
    environment variable ``MSDSEG_AMP=0`` forces fp32 everywhere (to measure what a CPU
    without native bf16 does, or to rule out precision as a cause).
    """
    if os.environ.get("MSDSEG_AMP", "1") == "0":
        return None
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 else torch.float16 if major >= 6 else None
    if device.type == "cpu" and any(getattr(torch.cpu, probe, lambda: False)() for probe in _NATIVE_BF16_PROBES):
        return torch.bfloat16
    return None


def autocast(device: torch.device, enabled: bool = True) -> torch.autocast:
    """Autocast to :func:`amp_dtype` on ``device``; a disabled context where that is None."""
    dtype = amp_dtype(device)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=enabled and dtype is not None)


def grad_scaler(device: torch.device, enabled: bool = True, init_scale: float = 2.0**16) -> torch.amp.GradScaler:
    """A GradScaler, enabled only for fp16 autocast: it scales the loss so small fp16 gradients
    do not vanish, and skips (and halves the scale for) a step whose gradients overflowed."""
    return torch.amp.GradScaler(device.type, init_scale=init_scale,
                                enabled=enabled and amp_dtype(device) == torch.float16)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)


def git_sha() -> str:
    """Short commit of the project checkout, or 'unknown'."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def code_version() -> str:
    """:func:`git_sha`, with ``+changes`` when tracked files differ from that commit (a record
    made so names no commit that reproduces it)."""
    sha = git_sha()
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return sha
    return f"{sha}+changes" if sha != "unknown" and out.stdout.strip() else sha


def hardware(device: torch.device | None = None) -> str:
    """The compute used (``device``, default: :func:`get_device`) and its precision, e.g.
    '1x NVIDIA H100 80GB HBM3, bf16' or '2 CPU cores (x86_64), 2 torch thread(s), fp32'."""
    device = device or get_device()
    precision = str(amp_dtype(device) or "fp32").removeprefix("torch.").replace("bfloat16", "bf16")
    precision = precision.replace("float16", "fp16")
    if device.type == "cuda":
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}, {precision}"
    return f"{os.cpu_count()} CPU cores ({platform.machine()}), {torch.get_num_threads()} torch thread(s), {precision}"


def env_report() -> dict[str, str]:
    """Versions, commit and hardware, for notebooks and the diary."""
    import monai
    import segmentation_models_pytorch as smp

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "smp": smp.__version__,
        "monai": monai.__version__,
        "git": git_sha(),
        "hardware": hardware(),
        "threads": str(torch.get_num_threads()),
        "mixed_precision": str(amp_dtype(get_device())).removeprefix("torch."),
    }


def print_env() -> dict[str, str]:
    """Print and return :func:`env_report`."""
    report = env_report()
    print(" | ".join(f"{k}: {v}" for k, v in report.items()))
    return report
