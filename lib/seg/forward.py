"""The plain batched forward pass: slices in, class probabilities out, on any device, in the
device's mixed precision, with optional flip test-time augmentation. Training's validation,
the region-of-interest stage (:mod:`lib.seg.roi`) and inference (:mod:`lib.seg.inference`) all
use it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from lib.common.env import autocast
from lib.seg.models import probabilities
from lib.seg.postprocess import flip_tta


@torch.inference_mode()
def predict_probs(
    model: nn.Module,
    images: np.ndarray,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    amp: bool = True,
    tta: bool = False,
    swap: Sequence[tuple[int, int]] = (),
) -> torch.Tensor:
    """Class probabilities for a stack of slices.

    Args:
        images: (N, C, H, W) normalised slices (float16 or float32).
        amp: mixed precision where :func:`lib.common.env.amp_dtype` gives a dtype for ``device``.
        tta: average over horizontal, vertical and both flips.
        swap: class pairs that are mirror images (left/right organs, see :func:`lib.seg.postprocess.flip_tta`).

    Returns:
        float32 (N, K, H, W) on the CPU, K = number of classes.
    """
    device = torch.device(device)
    model.eval()

    def run(x: torch.Tensor) -> torch.Tensor:
        with autocast(device, amp):
            return probabilities(model(x))

    out = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.asarray(images[start:start + batch_size])).to(device).float()
        x = x.contiguous(memory_format=torch.channels_last)
        out.append((flip_tta(run, x, swap=swap) if tta else run(x)).float().cpu())
    return torch.cat(out)
