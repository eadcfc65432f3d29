"""Synthetic image+mask pairs: a mask source, a mask-conditioned image generator, a filter.

Shape and appearance are separated (Skandarani et al., MIDL 2020): masks come from a
*source* (:mod:`lib.synth.masks`) — ``"new"`` shapes from the statistical shape model (:mod:`lib.synth.shapes`) or
``"deformed"`` real training masks (random affine + elastic warps) — and a mask-conditioned
image generator (the SPADE GAN of :mod:`lib.synth.gan`, or the diffusion model) draws an image
for each. :func:`filter_pairs` then keeps the pairs whose mask a segmenter trained on real
data agrees with, so that pairs whose image does not show what the mask says do not act
as label noise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from lib.synth.masks import draw_masks
from lib.synth.quality import slice_dice
from lib.synth.shapes import ShapeModel


@dataclass
class Filtered:
    """Pairs kept by :func:`filter_pairs`, with every pair's score."""

    images: np.ndarray
    masks: np.ndarray
    scores: np.ndarray  # (N,) agreement of the segmenter with each pair's mask
    kept: np.ndarray  # (N,) bool

    @property
    def summary(self) -> str:
        return f"kept {int(self.kept.sum())} of {len(self.kept)} pairs ({self.kept.mean():.0%})"

    @property
    def pair(self) -> tuple[np.ndarray, np.ndarray]:
        """The kept (images, masks)."""
        return self.images, self.masks


def pair_scores(predict_fn: Callable[[np.ndarray], np.ndarray], images: np.ndarray, masks: np.ndarray,
                batch_size: int = 64) -> np.ndarray:
    """Per pair: Dice between the segmenter's prediction and the pair's mask, averaged over the
    foreground classes present in either (1.0 when both are empty)."""
    scores = []
    for start in range(0, len(images), batch_size):
        pred = np.asarray(predict_fn(images[start:start + batch_size]))
        scores += [slice_dice(p, t) if p.any() or t.any() else 1.0 for p, t in zip(pred, masks[start:start + batch_size])]
    return np.asarray(scores, np.float64)


def filter_pairs(images: np.ndarray, masks: np.ndarray, predict_fn: Callable[[np.ndarray], np.ndarray],
                 threshold: float) -> Filtered:
    """Keep the pairs whose :func:`pair_scores` is at least ``threshold`` (0 keeps all).

    Raises:
        ValueError: the threshold keeps no pair (training on nothing is never silent).
    """
    if not 0 <= threshold <= 1:
        raise ValueError(f"filter threshold {threshold} must lie in [0, 1]")
    scores = pair_scores(predict_fn, images, masks)
    kept = scores >= threshold
    if not kept.any():
        raise ValueError(f"filter threshold {threshold} keeps none of {len(scores)} synthetic pairs (best score "
                         f"{scores.max() if len(scores) else float('nan'):.3f}); lower it or improve the generator")
    return Filtered(images[kept], masks[kept], scores, kept)


def make_pairs(generate: Callable[..., np.ndarray], generator: Any, source: str, n: int, seed: int, *,
               shape_model: ShapeModel | None = None, train_masks: np.ndarray | None = None, num_classes: int = 2,
               device: str = "cpu", predict_fn: Callable[[np.ndarray], np.ndarray] | None = None,
               threshold: float = 0.0) -> Filtered:
    """The whole path of synthetic pairs: ``n`` masks from ``source`` (:func:`draw_masks`), an
    image for each by ``generate(generator, masks, seed=..., device=...)`` (a generator module's
    ``generate_images``), and, with ``predict_fn``, :func:`filter_pairs` at ``threshold``
    (without one every pair is kept, scored 1)."""
    masks = draw_masks(source, n, seed, shape_model=shape_model, train_masks=train_masks, num_classes=num_classes)
    images = generate(generator, masks, seed=seed, device=device)
    if predict_fn is None:
        return Filtered(images, masks, np.ones(len(masks)), np.ones(len(masks), bool))
    return filter_pairs(images, masks, predict_fn, threshold)
