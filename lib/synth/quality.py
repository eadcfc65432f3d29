"""Quality measures for synthetic (image, mask) pairs, computed without downloads.

* ``sharpness`` / ``sharpness_ratio``: mean gradient energy; a blurry generator (a VAE)
  gives a ratio << 1 against real slices, a noisy one > 1.
* ``diversity_msssim``: mean MS-SSIM of random pairs of distinct samples (lower = more
  diverse; mode collapse gives values near 1).
* ``memorisation_distance`` / ``memorisation_summary``: RMSE from each synthetic image
  to its nearest real training slice, next to the same distance between real slices.
* ``mask_agreement``: Dice of a segmentation model trained on real data against the
  synthetic masks (do the images show what the masks say?).
* ``frechet_distance`` / ``encoder_features``: a Frechet distance (the FID formula) in
  the feature space of this project's own segmentation encoder trained on real data,
  in place of an ImageNet Inception network (which would need a download and does not
  know MRI). Like FID it is biased by the sample size: compare sources at equal N.

All image arrays are float32 (N, C, H, W) in z-score space, masks uint8 (N, H, W).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import scipy.linalg
import torch
from monai.metrics import MultiScaleSSIMMetric
from torch import nn

# MS-SSIM settings: MONAI requires H // (len(weights) - 1) ** 2 > kernel_size - 1, so the
# standard 5 scales with an 11-pixel kernel need H > 160. Three scales (the first three
# standard weights, renormalised) with a 7-pixel Gaussian work from 32x32 upwards (and
# keep 64x64 and 256x256 results comparable).
_MSSSIM_WEIGHTS = tuple(w / 0.6305 for w in (0.0448, 0.2856, 0.3001))
_MSSSIM_KERNEL = 7
# Fixed z-score range mapped onto [0, 1] for MS-SSIM.
VALUE_RANGE = (-3.0, 4.0)


def sharpness(images: np.ndarray) -> float:
    """Mean squared finite-difference gradient magnitude of (N, C, H, W) images."""
    x = np.asarray(images, np.float64)
    dy = np.diff(x, axis=2)[..., :, :-1]
    dx = np.diff(x, axis=3)[..., :-1, :]
    return float(np.mean(dx**2 + dy**2))


def sharpness_ratio(synth: np.ndarray, real: np.ndarray) -> float:
    """``sharpness(synth) / sharpness(real)``; about 1 is good, blur gives << 1."""
    ref = sharpness(real)
    if ref <= 0:
        raise ValueError("real images have zero gradient energy")
    return sharpness(synth) / ref


def _to_unit(images: np.ndarray, value_range: tuple[float, float]) -> torch.Tensor:
    lo, hi = value_range
    x = (torch.as_tensor(np.asarray(images, np.float32)) - lo) / (hi - lo)
    return x.clamp(0, 1)


def diversity_msssim(
    images: np.ndarray,
    n_pairs: int = 200,
    seed: int = 0,
    value_range: tuple[float, float] = VALUE_RANGE,
    batch_size: int = 128,
) -> float:
    """Mean MS-SSIM over random pairs of distinct images (lower = more diverse).

    Args:
        images: (N >= 2, C, H, W) with H, W >= 32; mapped from ``value_range`` to [0, 1].
        n_pairs: number of random pairs (i != j).
        seed: random seed for the pairs.
    """
    n = len(images)
    if n < 2:
        raise ValueError(f"need at least 2 images, got {n}")
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, n_pairs)
    j = (i + rng.integers(1, n, n_pairs)) % n
    x = _to_unit(images, value_range)
    metric = MultiScaleSSIMMetric(
        spatial_dims=2,
        data_range=1.0,
        kernel_size=_MSSSIM_KERNEL,
        weights=_MSSSIM_WEIGHTS,
        reduction="none",
    )
    scores = [
        metric(x[i[s : s + batch_size]], x[j[s : s + batch_size]]).flatten()
        for s in range(0, n_pairs, batch_size)
    ]
    return float(torch.cat(scores).mean())


def _flat(images: np.ndarray) -> np.ndarray:
    return np.asarray(images, np.float32).reshape(len(images), -1)


def _nn_rmse(
    query: np.ndarray,
    ref: np.ndarray,
    exclude: np.ndarray | None = None,
    batch_size: int = 256,
) -> np.ndarray:
    """RMSE from each (n, D) query row to its nearest (N, D) ref row, in float64 chunks.

    ``exclude[q]`` is a ref index that query ``q`` may not match (itself).
    """
    best = np.full(len(query), np.inf)
    for qs in range(0, len(query), batch_size):
        q = torch.tensor(query[qs : qs + batch_size], dtype=torch.float64)
        for rs in range(0, len(ref), batch_size):
            r = torch.tensor(ref[rs : rs + batch_size], dtype=torch.float64)
            d = torch.cdist(q, r).numpy()
            if exclude is not None:
                cols = exclude[qs : qs + batch_size] - rs
                rows = np.flatnonzero((cols >= 0) & (cols < d.shape[1]))
                d[rows, cols[rows]] = np.inf
            best[qs : qs + batch_size] = np.minimum(best[qs : qs + batch_size], d.min(1))
    return best / np.sqrt(query.shape[1])


def memorisation_distance(synth: np.ndarray, real_train: np.ndarray) -> np.ndarray:
    """RMSE from each synthetic image to its nearest real training image.

    Args:
        synth: (n, C, H, W); real_train: (N, C, H, W).

    Returns:
        float64 (n,); 0 means an exact copy of a training slice.
    """
    return _nn_rmse(_flat(synth), _flat(real_train))


def memorisation_summary(
    synth: np.ndarray, real_train: np.ndarray, max_reference: int = 500, seed: int = 0
) -> dict[str, float]:
    """Nearest-training-slice distances of ``synth`` next to a real-to-real reference.

    The reference ``real_nn_rmse_median`` is the median RMSE from up to ``max_reference``
    random training slices to their nearest *other* training slice. Neighbouring slices
    of one volume are close, so this reference is strict: synthetic medians well below
    it suggest copying.

    Returns:
        dict with nn_rmse_median, nn_rmse_min, real_nn_rmse_median.
    """
    d = memorisation_distance(synth, real_train)
    ref = _flat(real_train)
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(ref))[:max_reference]
    real_d = _nn_rmse(ref[idx], ref, exclude=idx)
    return {
        "nn_rmse_median": float(np.median(d)),
        "nn_rmse_min": float(d.min()),
        "real_nn_rmse_median": float(np.median(real_d)),
    }


def slice_dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean Dice over foreground classes present in either (H, W) mask."""
    classes = np.setdiff1d(np.union1d(np.unique(pred), np.unique(target)), [0])
    dice = [
        2 * np.sum((pred == c) & (target == c)) / (np.sum(pred == c) + np.sum(target == c))
        for c in classes
    ]
    return float(np.mean(dice))


def mask_agreement(
    predict_fn: Callable[[np.ndarray], np.ndarray],
    synth_images: np.ndarray,
    synth_masks: np.ndarray,
    batch_size: int = 64,
) -> float:
    """Mean Dice of ``predict_fn(synth_images)`` against ``synth_masks``.

    Args:
        predict_fn: maps float32 (B, C, H, W) to uint8 (B, H, W) class ids; a
            segmentation model trained on real data.
        synth_images: (N, C, H, W); synth_masks: (N, H, W).

    Returns:
        Mean over slices with foreground in either mask of the per-slice Dice
        (averaged over the foreground classes present); NaN if there are none.
    """
    pred = np.concatenate(
        [
            np.asarray(predict_fn(synth_images[s : s + batch_size]))
            for s in range(0, len(synth_images), batch_size)
        ]
    )
    scores = [
        slice_dice(p, t) for p, t in zip(pred, np.asarray(synth_masks)) if p.any() or t.any()
    ]
    return float(np.mean(scores)) if scores else float("nan")


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray, eps: float = 1e-6) -> float:
    """Frechet distance between Gaussians fitted to (N, D) and (M, D) feature sets.

    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` (the FID formula); ``eps``
    is added to the diagonals when the matrix square root is not finite.
    """
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if len(a) < 2 or len(b) < 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need (N >= 2, D) feature sets of equal D, got {a.shape}, {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():  # singular products (N < D) are expected here
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(s_a @ s_b)
        if not np.isfinite(covmean).all():
            offset = eps * np.eye(len(s_a))
            covmean = scipy.linalg.sqrtm((s_a + offset) @ (s_b + offset))
    dist = np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean.real)
    return float(max(dist, 0.0))


@torch.no_grad()
def encoder_features(
    encoder: nn.Module,
    images: np.ndarray,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Global-average-pooled deepest feature map of ``encoder``: (N, C, H, W) -> (N, D).

    ``encoder(x)`` must return a list of feature maps, deepest last (as the encoders of
    segmentation_models_pytorch do). The encoder is used in eval mode and restored.
    """
    was_training = encoder.training
    encoder.to(device).eval()
    feats = []
    for s in range(0, len(images), batch_size):
        x = torch.as_tensor(np.asarray(images[s : s + batch_size], np.float32)).to(device)
        feats.append(encoder(x)[-1].float().mean(dim=(2, 3)).cpu())
    encoder.train(was_training)
    return torch.cat(feats).numpy()


def _subsample(images: np.ndarray, masks: np.ndarray, n: int, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray]:
    pick = rng.permutation(len(images))[:n]
    return images[pick], masks[pick]


def with_foreground(images: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pairs whose mask holds any foreground."""
    keep = np.asarray(masks).reshape(len(masks), -1).any(axis=1)
    return images[keep], masks[keep]


def quality_table(
    train: tuple[np.ndarray, np.ndarray],
    held_out: tuple[np.ndarray, np.ndarray],
    generators: dict[str, tuple[np.ndarray, np.ndarray]],
    predict_fn: Callable[[np.ndarray], np.ndarray],
    encoder: nn.Module,
    *,
    new_masks: set[str] = frozenset(),
    device: str | torch.device = "cpu",
    max_samples: int = 500,
    min_pairs: int = 32,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Quality of each generator's pairs, measured against real slices of unseen patients.

    Every source is restricted to pairs with foreground (what synthetic pairs are made for:
    a real slice set that is mostly background would inflate every distance) and subsampled
    to the same ``n`` slices (Frechet distances depend on n); ``foreground_share`` says
    which share of a source's pairs had foreground. A generator with fewer than ``min_pairs``
    such pairs (or than the real sources have, if fewer) gets a row of None with its count in
    ``n`` instead of shrinking every other source's sample (a Frechet distance over a dozen
    slices says nothing) or stopping the table.
    For a generator's samples: ``frechet`` (encoder features against the held-out slices)
    and ``frechet_ratio`` (to the real-to-real distance), ``sharpness_ratio`` (to the
    held-out slices), ``msssim_diversity``, ``nn_distance_median`` (RMSE to the nearest
    *training* slice: smaller than real's suggests copying), ``mask_agreement`` (Dice of
    the reference segmenter against the sample's mask) and ``mask_agreement_ratio`` (to
    real's), and ``mask_novelty_median`` (Dice to the nearest training mask) for the
    generators named in ``new_masks``.

    The ``real`` row holds what real data of new patients reaches: training against
    held-out slices for the distribution measures (its ``frechet`` is the real-to-real
    distance), and the held-out slices against the training ones for memorisation,
    mask agreement and mask novelty.

    Args:
        train: the generators' (and the segmenter's) real training slices and masks.
        held_out: real slices of other patients (validation and test), never trained on.
        generators: name -> (images, masks) sampled from each generator.
        predict_fn: the reference segmenter trained on ``train``, (B, C, H, W) -> (B, H, W).
        encoder: that segmenter's encoder (returns a list of feature maps).
    """
    from lib.synth.shapes import shape_statistics  # masks' novelty, as the shape model reports it

    rng = np.random.default_rng(seed)
    given = {"train": train, "held-out": held_out, **generators}
    sources = {name: with_foreground(*pair) for name, pair in given.items()}
    shares = {name: len(sources[name][0]) / max(len(pair[0]), 1) for name, pair in given.items()}
    if empty := [name for name in ("train", "held-out") if len(sources[name][0]) < 2]:
        raise ValueError(f"quality_table: fewer than 2 real slices with foreground in {empty}")
    n_real = min(max_samples, len(sources["train"][0]), len(sources["held-out"][0]))
    barren = {name for name in generators if len(sources[name][0]) < min(min_pairs, n_real)}  # a row of None
    n = min([n_real, *(len(sources[name][0]) for name in generators if name not in barren)])
    train_im, train_ms = _subsample(*sources["train"], n, rng)
    ref_im, ref_ms = _subsample(*sources["held-out"], n, rng)
    ref_feats = encoder_features(encoder, ref_im, device=device)
    real_frechet = frechet_distance(encoder_features(encoder, train_im, device=device), ref_feats)
    real = {
        "n": n,
        "foreground_share": shares["held-out"],
        "frechet": real_frechet,
        "frechet_ratio": 1.0,
        "sharpness_ratio": sharpness_ratio(train_im, ref_im),
        "msssim_diversity": diversity_msssim(train_im, seed=seed),
        "nn_distance_median": float(np.median(memorisation_distance(ref_im, train[0]))),
        "mask_agreement": mask_agreement(predict_fn, ref_im, ref_ms),
        "mask_agreement_ratio": 1.0,
        "mask_novelty_median": shape_statistics(ref_ms, train[1])["novelty_median"],
    }
    table = {"real": real}
    for name in generators:
        if name in barren:
            table[name] = {"n": len(sources[name][0]), "foreground_share": shares[name]} | {
                k: None for k in real if k not in ("n", "foreground_share")
                and (k != "mask_novelty_median" or name in new_masks)}
            continue
        im, ms = _subsample(*sources[name], n, rng)
        frechet = frechet_distance(encoder_features(encoder, im, device=device), ref_feats)
        agreement = mask_agreement(predict_fn, im, ms)
        row = {
            "n": n,
            "foreground_share": shares[name],
            "frechet": frechet,
            "frechet_ratio": frechet / real_frechet if real_frechet > 0 else float("nan"),
            "sharpness_ratio": sharpness_ratio(im, ref_im),
            "msssim_diversity": diversity_msssim(im, seed=seed),
            "nn_distance_median": float(np.median(memorisation_distance(im, train[0]))),
            "mask_agreement": agreement,
            "mask_agreement_ratio": agreement / real["mask_agreement"] if real["mask_agreement"] else float("nan"),
        }
        if name in new_masks:
            row["mask_novelty_median"] = shape_statistics(ms, train[1])["novelty_median"]
        table[name] = row
    return table
