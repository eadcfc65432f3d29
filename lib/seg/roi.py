"""Region of interest: a coarse localisation model finds the structure, the segmenter sees a crop.

As nnU-Net's cascade does, a small model trained on the whole canvas at ``LOCATOR_SIZE``
pixels finds where the structure is in each patient (largest 3D component of its
prediction); the segmentation network then works on an ``image_size`` crop of the canvas at
the full target spacing around it. Training patients are cropped around their labels;
validation and test patients, and new scans, around the locator's finding. Where the
locator finds nothing, the whole canvas is segmented tile by tile (and a warning says so).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lib.data.slices import SliceSet
from lib.seg.forward import predict_probs
from lib.seg.models import ModelConfig, build_model
from lib.seg.postprocess import keep_largest_component

LOCATOR_SIZE = 64

Box = tuple[int, int]  # top-left (row, column) of the crop on the canvas


def locator_config(channels: int) -> ModelConfig:
    """The localisation network: a small binary U-Net (ResNet-18 encoder, 4 stages)."""
    return ModelConfig("unet", "resnet18", 4, None, channels, 2, {"decoder_channels": [128, 64, 32, 16]})


def box_around(mask: np.ndarray, size: int, scale: float = 1.0) -> Box | None:
    """The ``size`` x ``size`` crop centred on the bounding box of ``mask``'s foreground.

    Args:
        mask: (Z, H, W) foreground of one patient (any nonzero value).
        scale: canvas pixels per ``mask`` pixel (the locator works on a smaller grid).

    Returns:
        The crop's top-left corner on the canvas (kept inside it), or None without foreground.
    """
    fg = np.asarray(mask) > 0
    if not fg.any():
        return None
    canvas = round(fg.shape[-1] * scale)
    rows, cols = np.flatnonzero(fg.any(axis=(0, 2))), np.flatnonzero(fg.any(axis=(0, 1)))
    centre = [(ix[0] + ix[-1] + 1) / 2 * scale for ix in (rows, cols)]
    return tuple(int(np.clip(round(c - size / 2), 0, canvas - size)) for c in centre)


def crop(array: np.ndarray, box: Box, size: int) -> np.ndarray:
    """The ``size`` x ``size`` window at ``box`` of the last two axes."""
    r, c = box
    return array[..., r:r + size, c:c + size]


def crop_cases(slices: SliceSet, boxes: dict[str, Box], size: int) -> SliceSet:
    """Every patient's slices cropped at its own box (one box per patient)."""
    images = np.empty((*slices.images.shape[:2], size, size), slices.images.dtype)
    masks = np.empty((len(slices), size, size), slices.masks.dtype)
    for case_id in dict.fromkeys(slices.case_ids.tolist()):
        rows = slices.case_ids == case_id
        images[rows] = crop(slices.images[rows], boxes[case_id], size)
        masks[rows] = crop(slices.masks[rows], boxes[case_id], size)
    return SliceSet(images, masks, slices.case_ids, slices.slice_index, slices.cases, slices.context)


def shrink(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Canvas slices (N, C, S, S) -> the locator's input (N, C, 64, 64), float32, antialiased."""
    x = torch.as_tensor(np.asarray(images)).float()
    return F.interpolate(x, size=(LOCATOR_SIZE, LOCATOR_SIZE), mode="bilinear", antialias=True, align_corners=False)


def locator_slices(slices: SliceSet) -> SliceSet:
    """Single canvas slices -> the locator's training data: shrunk images, foreground masks."""
    if slices.context:
        raise ValueError("the locator takes single slices: load them with context=0")
    fg = torch.from_numpy(slices.masks > 0).float()[:, None]
    masks = F.interpolate(fg, size=(LOCATOR_SIZE, LOCATOR_SIZE), mode="area")[:, 0] >= 0.5
    return SliceSet(shrink(slices.images).half().numpy(), masks.numpy().astype(np.uint8), slices.case_ids,
                    slices.slice_index, slices.cases)


@dataclass
class Locator:
    """The localisation stage of a segmenter.

    Attributes:
        model: binary segmentation network on ``LOCATOR_SIZE`` px canvas slices.
        size: side of the crops the segmenter takes (its ``image_size``).
        channels: image channels (modalities) per slice.
        context: neighbouring slices on each side in the segmenter's input; the locator
            sees only the centre slice.
    """

    model: nn.Module
    size: int
    channels: int
    context: int = 0

    def state(self) -> dict[str, Any]:
        """What a checkpoint stores to rebuild this stage (see :meth:`from_state`)."""
        return {"model_config": locator_config(self.channels).to_dict(), "size": self.size, "channels": self.channels,
                "context": self.context, "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()}}

    @classmethod
    def from_state(cls, state: dict[str, Any], device: str | torch.device = "cpu") -> Locator:
        """Rebuild the stage a checkpoint stored."""
        model = build_model(ModelConfig(**state["model_config"]))
        model.load_state_dict(state["state_dict"])
        return cls(model.to(device).eval(), state["size"], state["channels"], state["context"])

    def centre(self, images: np.ndarray) -> np.ndarray:
        """The centre slice's channels of (N, C * (2k + 1), S, S) inputs."""
        k, c = self.context, self.channels
        return images[:, k * c:(k + 1) * c]

    def find(self, images: np.ndarray, device: str | torch.device = "cpu") -> Box | None:
        """The crop of one patient's canvas slices (Z, C', S, S) holding its structure, or None."""
        probs = predict_probs(self.model, shrink(self.centre(images)).numpy(), device=device)
        found = keep_largest_component((probs.argmax(1) > 0).numpy().astype(np.uint8))
        return box_around(found, self.size, images.shape[-1] / LOCATOR_SIZE)


def tiles(canvas: int, size: int) -> list[Box]:
    """Windows of ``size`` covering a ``canvas`` side with at least half a window of overlap."""
    steps = max(1, int(np.ceil((canvas - size) / (size / 2)))) if canvas > size else 0
    starts = sorted({round(i * (canvas - size) / steps) for i in range(steps + 1)}) if steps else [0]
    return [(r, c) for r in starts for c in starts]


def sliding_window(predict, images: np.ndarray, size: int) -> torch.Tensor:
    """Probabilities over the whole canvas, averaged over overlapping ``size`` windows.

    Args:
        predict: (N, C, size, size) array -> (N, K, size, size) probabilities.
    """
    canvas = images.shape[-1]
    total, count = 0.0, torch.zeros(1, 1, canvas, canvas)
    for r, c in tiles(canvas, size):
        probs = predict(crop(images, (r, c), size))
        total = total + paste(probs, (r, c), canvas, fill=0.0)
        count[..., r:r + size, c:c + size] += 1
    return total / count


def paste(probs: torch.Tensor, box: Box, canvas: int, fill: float = 1.0) -> torch.Tensor:
    """Crop probabilities (Z, K, s, s) placed on the canvas; elsewhere background
    probability ``fill`` (1: certain background) and 0 for the other classes."""
    z, k, size, _ = probs.shape
    out = torch.zeros(z, k, canvas, canvas)
    out[:, 0] = fill
    r, c = box
    out[..., r:r + size, c:c + size] = probs
    return out


def canvas_probs(predict, images: np.ndarray, locator: Locator, case: str = "",
                 device: str | torch.device = "cpu") -> torch.Tensor:
    """One patient's probabilities on the canvas: crop at the located box, or (with a
    warning) tiles over the whole canvas when the locator finds nothing."""
    box = locator.find(images, device)
    if box is None:
        warnings.warn(f"{case}: the region-of-interest stage found no structure; segmenting the whole slice "
                      "in overlapping windows instead", stacklevel=2)
        return sliding_window(predict, images, locator.size)
    return paste(predict(crop(images, box, locator.size)), box, images.shape[-1])
