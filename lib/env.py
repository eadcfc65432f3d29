"""Runtime environment: device choice, seeds, and a one-line report of versions."""

from __future__ import annotations

import os
import platform
import random
import subprocess

import numpy as np
import torch

from lib.paths import PROJECT_ROOT


def get_device(device: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA when available, else CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


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


def hardware() -> str:
    """The compute used, e.g. '1x NVIDIA H100 80GB HBM3' or '2 CPU cores (x86_64), 2 torch thread(s)'."""
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    return f"{os.cpu_count()} CPU cores ({platform.machine()}), {torch.get_num_threads()} torch thread(s)"


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
    }


def print_env() -> dict[str, str]:
    """Print and return :func:`env_report`."""
    report = env_report()
    print(" | ".join(f"{k}: {v}" for k, v in report.items()))
    return report
