"""A statistical shape model that draws new, plausible label masks (binary or multi-class).

The classic level-set PCA shape model (Leventon et al., CVPR 2000; Tsai et al., IEEE TMI
2003): every training slice with foreground is

1. (optionally, ``align``) translated so that its foreground centroid lies at the image
   centre; where a shape sits is then modelled apart from its form: a linear regression
   of the centroid on the mode coefficients (so that, e.g., a slice showing only class 2
   goes where class 2 lies) plus a kernel density over the residuals;
2. turned into one signed distance function (SDF, negative inside) per foreground class,
   clipped to ``+-band`` px and block-averaged by ``downsample``;
3. stacked into one vector; PCA (SVD) keeps the modes that explain ``variance_kept``.

:meth:`ShapeModel.sample` draws mode coefficients from a Gaussian with each mode's std
(times ``temperature``, truncated at ``+-truncate`` sd), reconstructs the SDFs, upsamples
them (bilinear), thresholds each class at a calibrated level (``calibrate``: the level at
which the training shapes, projected on the kept modes, keep their area; near 0), gives a
pixel claimed by several classes to the one with the most negative SDF, keeps each
class's largest connected component, fills holes, moves the shape to a drawn position,
and redraws shapes that came out empty or whose foreground or class areas lie outside
the training range (+- ``area_slack``). A share of empty slices equal to the training
share is added (``include_empty``).

``align=False`` leaves position inside the PCA: for structures that always sit in about
the same place this gives samples closer to the training masks (more plausible, less
new); ``align=True`` (default) copes with positions that vary widely.

:func:`shape_statistics` says whether samples are new (Dice to the nearest real mask) and
plausible (components and areas per class against the real range).

Multi-class (``by_pattern``): which classes a slice shows (e.g. only class 1, or 1 and 2)
is drawn first with the training frequencies, the coefficients then from a Gaussian
fitted to the training slices with that pattern, and the sample must show just those
classes.

Masks are uint8 (N, H, W) class ids, 0 = background, classes ``0 .. num_classes - 1``.
Typical use::

    model = ShapeModel.fit(train_masks, num_classes=3)        # seconds on a CPU
    masks = model.sample(500, seed=0)                         # uint8 (500, H, W)
    shape_statistics(masks, train_masks)["novelty_median"]    # < 0.9: not copies
    model.save("shape_model.npz"); ShapeModel.load("shape_model.npz")
"""

from __future__ import annotations

import json
import math
import warnings
import zipfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from lib.common.atomic import atomic_path
from lib.seg.postprocess import keep_largest_component

FORMAT = "shape_model"
VERSION = 1
_STRUCT8 = np.ones((3, 3), bool)  # 8-connectivity for connected components
_ARRAYS = ("mean", "components", "std", "explained", "levels", "centroids", "position_coef",
           "position_residuals", "area_ranges", "pattern_classes", "pattern_weights", "pattern_mean",
           "pattern_std")
_PATTERN_PRIOR = 2.0  # pseudo-count pulling a rare pattern's std towards the overall one


@dataclass
class ShapeModelConfig:
    """Settings of :class:`ShapeModel`.

    Attributes:
        variance_kept: share of the SDF variance the kept PCA modes explain (0 < v <= 1).
        max_modes: at most this many modes (None: no cap).
        band: SDFs are clipped to ``[-band, band]`` pixels.
        downsample: SDFs are block-averaged by this integer factor before the PCA.
        temperature: scales the std of every mode when sampling (0: mean shape only).
        truncate: mode coefficients are drawn from a normal truncated at ``+-truncate`` sd.
        align: model shape in a centroid-aligned frame and position separately.
        position_bandwidth: std (px) of the Gaussian jitter added to a drawn position (the
            kernel of the density over the position residuals); None: Scott's rule (std of
            the residuals * F ** (-1/6), per axis).
        keep_largest: keep only the largest connected component of each class.
        fill_holes: fill background holes inside each class.
        area_slack: redraw samples whose foreground area, or the area of a class they
            show, lies outside ``[(1 - slack) * min, (1 + slack) * max]`` of the training
            areas (0: within the real range; None: no area check).
        include_empty: ``sample`` draws the training share of empty slices.
        calibrate: threshold each class's SDF at the level (instead of 0) at which the
            training shapes, projected on the kept modes, keep their total area (undoes the
            shrinkage that averaging SDFs, mode truncation and downsampling cause).
        by_pattern: multi-class: draw which classes a slice shows (its pattern, e.g. only
            class 1, or 1 and 2) with the training frequencies, then the coefficients from a
            Gaussian fitted to the training slices with that pattern, and insist that the
            sample shows just those classes. A single Gaussian over all slices would put
            an "absent" class half-way and draw it far too rarely or as slivers.
        seed: seed used by ``sample`` when none is given.
        max_rounds: redraw rounds before rejected shapes are accepted anyway.
    """

    variance_kept: float = 0.95
    max_modes: int | None = None
    band: float = 12.0
    downsample: int = 2
    temperature: float = 1.0
    truncate: float = 2.5
    align: bool = True
    position_bandwidth: float | None = None
    keep_largest: bool = True
    fill_holes: bool = True
    area_slack: float | None = 0.0
    include_empty: bool = True
    calibrate: bool = True
    by_pattern: bool = True
    seed: int = 0
    max_rounds: int = 50

    def __post_init__(self) -> None:
        if not 0 < self.variance_kept <= 1:
            raise ValueError(f"variance_kept must be in (0, 1], got {self.variance_kept}")
        if self.max_modes is not None and self.max_modes < 0:
            raise ValueError(f"max_modes must be >= 0 or None, got {self.max_modes}")
        if self.band <= 0:
            raise ValueError(f"band must be > 0, got {self.band}")
        if int(self.downsample) != self.downsample or self.downsample < 1:
            raise ValueError(f"downsample must be an integer >= 1, got {self.downsample}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.truncate <= 0:
            raise ValueError(f"truncate must be > 0, got {self.truncate}")
        if self.position_bandwidth is not None and self.position_bandwidth < 0:
            raise ValueError(f"position_bandwidth must be >= 0 or None, got {self.position_bandwidth}")
        if self.area_slack is not None and self.area_slack < 0:
            raise ValueError(f"area_slack must be >= 0 or None, got {self.area_slack}")
        if self.max_rounds < 1:
            raise ValueError(f"max_rounds must be >= 1, got {self.max_rounds}")
        self.downsample = int(self.downsample)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShapeModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError."""
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown ShapeModelConfig keys: {sorted(unknown)}")
        return cls(**d)


# ----------------------------------------------------------------------------- helpers


def _check_masks(masks: Any, name: str = "masks", num_classes: int | None = None) -> np.ndarray:
    """Validate an (N, H, W) integer class-id array; returns it as uint8."""
    if not isinstance(masks, np.ndarray):
        raise ValueError(f"{name} must be a numpy array (N, H, W), got {type(masks).__name__}")
    if masks.ndim != 3 or min(masks.shape) < 1:
        raise ValueError(f"{name} must have shape (N, H, W) with N, H, W >= 1, got {masks.shape}")
    if not (np.issubdtype(masks.dtype, np.integer) or masks.dtype == bool):
        raise ValueError(f"{name} must hold integer class ids (uint8), got dtype {masks.dtype}")
    lo, hi = int(masks.min()), int(masks.max())
    if lo < 0:
        raise ValueError(f"{name} hold negative class ids (min {lo})")
    if num_classes is not None and hi >= num_classes:
        raise ValueError(f"{name} hold class id {hi} but num_classes is {num_classes} "
                         f"(ids must be in [0, {num_classes - 1}])")
    if hi > 255:
        raise ValueError(f"{name} hold class id {hi} > 255, which uint8 cannot hold")
    return masks.astype(np.uint8, copy=False)


def _sdf(inside: np.ndarray, band: float) -> np.ndarray:
    """Signed distance (px, negative inside, zero on the boundary) of a bool (H, W) mask."""
    if not inside.any():
        return np.full(inside.shape, band, np.float32)
    if inside.all():
        return np.full(inside.shape, -band, np.float32)
    d_out = ndimage.distance_transform_edt(~inside)
    d_in = ndimage.distance_transform_edt(inside)
    sdf = np.where(inside, 0.5 - d_in, d_out - 0.5)
    return np.clip(sdf, -band, band).astype(np.float32)


def _padded(size: int, f: int) -> int:
    return -(-size // f) * f


def _downsample(x: np.ndarray, f: int) -> np.ndarray:
    """Block-average the last two axes of ``x`` by ``f`` (edge-padded to a multiple of f)."""
    if f == 1:
        return x
    h, w = x.shape[-2:]
    hp, wp = _padded(h, f), _padded(w, f)
    pad = [(0, 0)] * (x.ndim - 2) + [(0, hp - h), (0, wp - w)]
    x = np.pad(x, pad, mode="edge")
    return x.reshape(*x.shape[:-2], hp // f, f, wp // f, f).mean(axis=(-3, -1))


def _upsample(x: np.ndarray, f: int, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear inverse of :func:`_downsample`: (..., h, w) -> (..., H, W)."""
    if f == 1:
        return x
    zoom = (1,) * (x.ndim - 2) + (f, f)
    up = ndimage.zoom(x, zoom, order=1, mode="nearest", grid_mode=True)
    return up[..., : shape[0], : shape[1]]


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Translate a 2D array by integer (dy, dx), filling with zeros."""
    if dy == 0 and dx == 0:
        return mask
    h, w = mask.shape
    out = np.zeros_like(mask)
    if abs(dy) >= h or abs(dx) >= w:
        return out
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = mask[ys, xs]
    return out


def _centroid(fg: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(fg)
    return np.array([ys.mean(), xs.mean()])


def _centre(shape: tuple[int, int]) -> np.ndarray:
    return (np.asarray(shape, float) - 1) / 2


def _pca(xc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PCA of centred rows xc (F, D): variances (r,) (descending) and modes (r, D).

    With fewer rows than columns (the usual case) this diagonalises the (F, F) Gram matrix,
    which is much cheaper than an SVD of xc.
    """
    f, d = xc.shape
    if f >= d:
        _, s, vt = np.linalg.svd(xc, full_matrices=False)
        return s**2 / (f - 1), vt
    w, u = np.linalg.eigh(xc @ xc.T)
    order = np.argsort(w)[::-1]
    w, u = np.clip(w[order], 0, None), u[:, order]
    keep = w > w[0] * 1e-12 if w[0] > 0 else np.zeros(len(w), bool)
    w, u = w[keep], u[:, keep]
    vt = (u.T @ xc) / np.sqrt(w)[:, None]
    return w / (f - 1), vt


# ----------------------------------------------------------------------------- model


class ShapeModel:
    """Level-set PCA shape model; build it with :meth:`fit` (or :func:`fit_shape_model`).

    Attributes (F = training slices with foreground, M = kept modes, K = num_classes):
        cfg: the settings.
        num_classes: K, classes including background.
        shape: (H, W) of the masks.
        mean: (D,) mean SDF vector, D = (K - 1) * h * w at the downsampled size (h, w).
        components: (M, D) kept PCA modes (orthonormal rows).
        std: (M,) std of each mode's coefficient over the training shapes.
        explained: (M,) share of the variance each kept mode explains.
        levels: (K - 1,) threshold of each class's SDF (0 without ``calibrate``).
        centroids: (F, 2) foreground centroids (y, x) of the training slices.
        position_coef: (M + 1, 2) linear regression of the centroid on the standardised
            mode coefficients (intercept first): where a shape sits depends on the shape
            (e.g. which classes it shows).
        position_residuals: (F, 2) the training centroids minus that regression.
        area_ranges: (K, 2) min and max area (px) over the training slices: row 0 the whole
            foreground, row k class k over the slices that show it (0, 0 if none does).
        pattern_classes: (P, K - 1) bool, the class patterns (which classes a slice shows)
            of the training slices with foreground (one pattern without ``by_pattern``).
        pattern_weights: (P,) their shares.
        pattern_mean, pattern_std: (P, M) mean and std of the standardised coefficients
            (coefficient / ``std``) of the slices with each pattern.
        empty_share: share of training slices without foreground.
        n_train: number of training slices.
    """

    def __init__(self, cfg: ShapeModelConfig, num_classes: int, shape: tuple[int, int], *,
                 mean: np.ndarray, components: np.ndarray, std: np.ndarray, explained: np.ndarray,
                 levels: np.ndarray, centroids: np.ndarray, position_coef: np.ndarray,
                 position_residuals: np.ndarray, area_ranges: np.ndarray,
                 pattern_classes: np.ndarray, pattern_weights: np.ndarray, pattern_mean: np.ndarray,
                 pattern_std: np.ndarray, empty_share: float, n_train: int) -> None:
        self.cfg = cfg
        self.num_classes = int(num_classes)
        self.shape = (int(shape[0]), int(shape[1]))
        self.mean = np.asarray(mean, np.float32)
        self.components = np.asarray(components, np.float32)
        self.std = np.asarray(std, np.float32)
        self.explained = np.asarray(explained, np.float64)
        self.levels = np.asarray(levels, np.float32)
        self.centroids = np.asarray(centroids, np.float64)
        self.position_coef = np.asarray(position_coef, np.float64)
        self.position_residuals = np.asarray(position_residuals, np.float64)
        self.area_ranges = np.asarray(area_ranges, np.float64)
        self.pattern_classes = np.asarray(pattern_classes, bool)
        self.pattern_weights = np.asarray(pattern_weights, np.float64)
        self.pattern_mean = np.asarray(pattern_mean, np.float64)
        self.pattern_std = np.asarray(pattern_std, np.float64)
        self.empty_share = float(empty_share)
        self.n_train = int(n_train)
        self._check_consistent()

    # -- properties

    @property
    def n_modes(self) -> int:
        """Number of kept PCA modes."""
        return len(self.std)

    @property
    def grid_shape(self) -> tuple[int, int]:
        """(h, w): the downsampled SDF grid."""
        f = self.cfg.downsample
        return _padded(self.shape[0], f) // f, _padded(self.shape[1], f) // f

    def _check_consistent(self) -> None:
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        h, w = self.grid_shape
        d, m, k = (self.num_classes - 1) * h * w, len(self.std), self.num_classes
        f, p = len(self.centroids), len(self.pattern_weights)
        expected = {
            "mean": (self.mean, (d,)), "components": (self.components, (m, d)),
            "std": (self.std, (m,)), "explained": (self.explained, (m,)),
            "levels": (self.levels, (k - 1,)), "centroids": (self.centroids, (f, 2)),
            "position_coef": (self.position_coef, (m + 1, 2)),
            "position_residuals": (self.position_residuals, (f, 2)),
            "area_ranges": (self.area_ranges, (k, 2)),
            "pattern_classes": (self.pattern_classes, (p, k - 1)),
            "pattern_mean": (self.pattern_mean, (p, m)), "pattern_std": (self.pattern_std, (p, m)),
        }
        for name, (arr, shape) in expected.items():
            if arr.shape != shape:
                raise ValueError(f"{name} has shape {arr.shape}, expected {shape}")
        if f < 1 or p < 1:
            raise ValueError("a shape model needs at least one training centroid and pattern")
        if not np.isclose(self.pattern_weights.sum(), 1) or (self.pattern_weights < 0).any():
            raise ValueError(f"pattern_weights must be >= 0 and sum to 1, got {self.pattern_weights}")
        if not 0 <= self.empty_share < 1:
            raise ValueError(f"empty_share must be in [0, 1), got {self.empty_share}")

    def __repr__(self) -> str:
        return (f"ShapeModel(num_classes={self.num_classes}, shape={self.shape}, modes={self.n_modes}, "
                f"variance={self.explained.sum():.3f}, train={self.n_train}, "
                f"empty_share={self.empty_share:.3f})")

    # -- fitting

    @classmethod
    def fit(cls, masks: np.ndarray, num_classes: int, cfg: ShapeModelConfig | None = None
            ) -> ShapeModel:
        """Fit the model to uint8 (N, H, W) masks with class ids in ``[0, num_classes)``.

        Raises:
            ValueError: wrong dtype or shape, ids outside ``[0, num_classes)``, or fewer than
                two slices with foreground.
        """
        cfg = cfg or ShapeModelConfig()
        if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        num_classes = int(num_classes)
        masks = _check_masks(masks, "masks", num_classes)
        n, height, width = masks.shape
        fg_idx = np.flatnonzero(masks.reshape(n, -1).any(axis=1))
        if len(fg_idx) == 0:
            raise ValueError(f"masks hold no foreground at all ({n} empty slices): nothing to model")
        if len(fg_idx) < 2:
            raise ValueError("a shape model needs at least 2 slices with foreground, got 1")
        fg = masks[fg_idx]
        counts = np.stack([np.bincount(m.ravel(), minlength=num_classes) for m in fg])  # (F, K)
        missing = [k for k in range(1, num_classes) if not counts[:, k].any()]
        if missing:
            warnings.warn(f"classes {missing} never occur in the masks: the model will not draw them",
                          stacklevel=2)
        area_ranges = np.zeros((num_classes, 2))
        union = counts[:, 1:].sum(axis=1)
        area_ranges[0] = union.min(), union.max()
        for k in range(1, num_classes):
            shown = counts[counts[:, k] > 0, k]
            if len(shown):
                area_ranges[k] = shown.min(), shown.max()

        centroids = np.stack([_centroid(m > 0) for m in fg])
        centre = _centre((height, width))
        sdfs = []
        class_areas = np.zeros(num_classes - 1, np.int64)  # in the (aligned) modelling frame
        for m, c in zip(fg, centroids):
            if cfg.align:
                dy, dx = np.rint(centre - c).astype(int)
                m = _shift(m, int(dy), int(dx))
            class_areas += np.bincount(m.ravel(), minlength=num_classes)[1:]
            sdfs.append(np.stack([_sdf(m == k, cfg.band) for k in range(1, num_classes)]))
        x = _downsample(np.stack(sdfs), cfg.downsample).reshape(len(fg), -1).astype(np.float64)

        mean = x.mean(axis=0)
        var, vt = _pca(x - mean)
        total = var.sum()
        if total <= 1e-12:
            k = 0
        else:
            k = int(np.searchsorted(np.cumsum(var) / total, cfg.variance_kept - 1e-9) + 1)
            k = min(k, len(x) - 1, int(np.sum(var > 1e-12 * total)))
        if cfg.max_modes is not None:
            k = min(k, cfg.max_modes)
        std = np.sqrt(var[:k])
        explained = var[:k] / total if total > 0 else np.zeros(0)

        # position given shape: ridge regression of the centroid on standardised coefficients
        z = (x - mean) @ vt[:k].T / np.maximum(std, 1e-12)
        design = np.hstack([np.ones((len(z), 1)), z])
        ridge = np.diag([0.0] + [1e-2 * len(z)] * k)
        coef = np.linalg.solve(design.T @ design + ridge, design.T @ centroids)
        residuals = centroids - design @ coef

        # class patterns: which classes each slice shows, and its coefficients' Gaussian
        shows = counts[:, 1:] > 0
        if not cfg.by_pattern:
            shows = np.ones_like(shows)
        patterns, inverse, n_p = np.unique(shows, axis=0, return_inverse=True, return_counts=True)
        inverse = inverse.ravel()
        p_mean = np.stack([z[inverse == i].mean(axis=0) for i in range(len(patterns))])
        p_var = np.stack([z[inverse == i].var(axis=0) for i in range(len(patterns))])
        p_std = np.sqrt((n_p[:, None] * p_var + _PATTERN_PRIOR) / (n_p[:, None] + _PATTERN_PRIOR))
        if not cfg.by_pattern:
            p_mean, p_std = np.zeros_like(p_mean), np.ones_like(p_std)

        model = cls(cfg, num_classes, (height, width), mean=mean, components=vt[:k], std=std,
                    explained=explained, levels=np.zeros(num_classes - 1), centroids=centroids,
                    position_coef=coef, position_residuals=residuals, area_ranges=area_ranges,
                    pattern_classes=patterns, pattern_weights=n_p / n_p.sum(), pattern_mean=p_mean,
                    pattern_std=p_std, empty_share=1 - len(fg_idx) / n, n_train=n)
        if cfg.calibrate:
            model.levels = model._calibrate(x, class_areas)
        return model

    def _calibrate(self, x: np.ndarray, class_areas: np.ndarray, chunk: int = 64) -> np.ndarray:
        """Per-class SDF level at which the projected training shapes keep their total area.

        ``x``: (F, D) training SDF vectors; ``class_areas``: (K - 1,) their total pixel count
        per class. Returns (K - 1,) float32 levels.
        """
        coef = (x - self.mean) @ self.components.T.astype(np.float64)
        values: list[list[np.ndarray]] = [[] for _ in range(self.num_classes - 1)]
        for start in range(0, len(coef), chunk):
            rec = self._decode(coef[start:start + chunk])
            for k in range(self.num_classes - 1):
                values[k].append(rec[:, k].ravel())
        levels = np.zeros(self.num_classes - 1, np.float32)
        for k, area in enumerate(class_areas):
            v = np.concatenate(values[k])
            if 0 < area < len(v):
                part = np.partition(v, (area - 1, area))
                levels[k] = 0.5 * (part[area - 1] + part[area])
        return np.clip(levels, -self.cfg.band / 2, self.cfg.band / 2)

    # -- sampling

    def _coefficients(self, rng: np.random.Generator, patterns: np.ndarray, temperature: float
                      ) -> np.ndarray:
        """(m, M) standardised coefficients for pattern indices (m,): the pattern's mean plus
        its std times a normal truncated at ``+-truncate`` times ``temperature``."""
        z = rng.standard_normal((len(patterns), self.n_modes))
        bad = np.abs(z) > self.cfg.truncate
        while bad.any():  # truncated normal by redrawing (P(|z| > 2.5) ~ 1 %)
            z[bad] = rng.standard_normal(int(bad.sum()))
            bad = np.abs(z) > self.cfg.truncate
        return self.pattern_mean[patterns] + z * self.pattern_std[patterns] * temperature

    def _positions(self, rng: np.random.Generator, z: np.ndarray) -> np.ndarray:
        """(m, 2) centroids for standardised coefficients ``z`` (m, M): the regression plus a
        training residual plus Gaussian jitter (a kernel density over the residuals), clipped
        to the box of the training centroids."""
        r = self.position_residuals
        bw = self.cfg.position_bandwidth
        if bw is None:
            bw = r.std(axis=0) * len(r) ** (-1 / 6)
        pred = np.hstack([np.ones((len(z), 1)), z]) @ self.position_coef
        pos = pred + r[rng.integers(len(r), size=len(z))] + rng.normal(size=(len(z), 2)) * bw
        # no extrapolation: stay within the box the training centroids span
        return np.clip(pos, self.centroids.min(axis=0), self.centroids.max(axis=0))

    def _decode(self, coef: np.ndarray) -> np.ndarray:
        """(m, M) raw coefficients -> (m, K - 1, H, W) float32 SDFs at full resolution."""
        x = self.mean + coef.astype(np.float32) @ self.components
        x = x.reshape(len(coef), self.num_classes - 1, *self.grid_shape)
        return _upsample(x, self.cfg.downsample, self.shape)

    def _labels(self, sdf: np.ndarray, shows: np.ndarray) -> np.ndarray:
        """(K - 1, H, W) SDFs -> cleaned uint8 (H, W) label map with only the classes
        ``shows`` ((K - 1,) bool) allows."""
        sdf = np.where(shows[:, None, None], sdf - self.levels[:, None, None], np.inf)
        inside = sdf < 0
        best = np.argmin(sdf, axis=0)  # the class with the most negative SDF wins
        lab = np.where(inside.any(axis=0), best + 1, 0).astype(np.uint8)
        for k in range(1, self.num_classes):
            cls_k = lab == k
            if not cls_k.any():
                continue
            if self.cfg.keep_largest:
                kept = keep_largest_component(cls_k.astype(np.uint8)).astype(bool)
                lab[cls_k & ~kept] = 0
                cls_k = kept
            if self.cfg.fill_holes:
                lab[ndimage.binary_fill_holes(cls_k) & (lab == 0)] = k
        return lab

    def _plausible(self, lab: np.ndarray, shows: np.ndarray) -> bool:
        """Shows exactly the classes ``shows`` says, with the foreground and each class within
        the training area range (+- area_slack)."""
        slack = self.cfg.area_slack
        counts = np.bincount(lab.ravel(), minlength=self.num_classes)
        if not np.array_equal(counts[1:] > 0, shows):
            return False
        counts[0] = counts[1:].sum()
        for k, area in enumerate(counts):
            if area == 0 and k > 0:
                continue
            lo, hi = self.area_ranges[k]
            if slack is not None and not (1 - slack) * lo <= area <= (1 + slack) * hi:
                return False
        return counts[0] > 0

    def sample(self, n: int, seed: int | None = None, *, temperature: float | None = None,
               include_empty: bool | None = None) -> np.ndarray:
        """Draw ``n`` new masks, uint8 (n, H, W).

        Args:
            n: number of masks.
            seed: random seed (None: ``cfg.seed``); the same seed gives the same masks.
            temperature: scales each mode's std (None: ``cfg.temperature``).
            include_empty: draw the training share of empty masks (None: ``cfg.include_empty``).
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        cfg = self.cfg
        temperature = cfg.temperature if temperature is None else float(temperature)
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        include_empty = cfg.include_empty if include_empty is None else include_empty
        rng = np.random.default_rng(cfg.seed if seed is None else seed)
        out = np.zeros((n, *self.shape), np.uint8)
        n_empty = 0
        if include_empty and n:
            expected = n * self.empty_share
            n_empty = int(math.floor(expected) + (rng.random() < expected - math.floor(expected)))
        # each slot gets its class pattern first and keeps it while its shape is redrawn, so
        # that rejections do not skew how often each pattern appears
        slots = rng.permutation(n)[n_empty:]
        slot_pattern = rng.choice(len(self.pattern_weights), size=len(slots), p=self.pattern_weights)
        open_ = np.ones(len(slots), bool)
        fallback: dict[int, np.ndarray] = {}
        for _ in range(cfg.max_rounds):
            idx = np.flatnonzero(open_)
            if len(idx) == 0:
                break
            z = self._coefficients(rng, slot_pattern[idx], temperature)
            sdf = self._decode(z * self.std)
            pos = self._positions(rng, z) if cfg.align else None
            for j, i in enumerate(idx):
                shows = self.pattern_classes[slot_pattern[i]]
                lab = self._labels(sdf[j], shows)
                if pos is not None and lab.any():
                    dy, dx = np.rint(pos[j] - _centroid(lab > 0)).astype(int)
                    lab = _shift(lab, int(dy), int(dx))
                if self._plausible(lab, shows):
                    out[slots[i]] = lab
                    open_[i] = False
                elif lab.any():
                    fallback[i] = lab
        if open_.any():
            idx = np.flatnonzero(open_)
            taken = [i for i in idx if i in fallback]
            warnings.warn(f"{len(idx)} of {len(slots)} shapes failed the plausibility checks after "
                          f"{cfg.max_rounds} rounds; {len(taken)} taken anyway", stacklevel=2)
            for i in taken:
                out[slots[i]] = fallback[i]
        return out

    # -- persistence

    def save(self, path: str | Path) -> Path:
        """Write the model atomically to an ``.npz`` file; returns ``path``."""
        path = Path(path)
        meta = {
            "format": FORMAT, "version": VERSION, "config": self.cfg.to_dict(),
            "num_classes": self.num_classes, "shape": list(self.shape),
            "empty_share": self.empty_share, "n_train": self.n_train,
        }
        arrays = {name: getattr(self, name) for name in _ARRAYS}
        with atomic_path(path, suffix=".npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, meta=np.array(json.dumps(meta)), **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ShapeModel:
        """Read a model written by :meth:`save`.

        Raises:
            ValueError (naming the file): missing, truncated, not a shape model file, or
                inconsistent contents.
        """
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: no such shape model file")
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                arrays = {name: z[name] for name in _ARRAYS}
        except (OSError, EOFError, KeyError, zipfile.BadZipFile, ValueError) as err:
            raise ValueError(f"{path}: not a readable shape model file "
                             f"({type(err).__name__}: {err})") from err
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a shape model file (no format tag {FORMAT!r})")
        if meta.get("version") != VERSION:
            raise ValueError(f"{path}: shape model format version {meta.get('version')!r}, "
                             f"this code reads version {VERSION}")
        try:
            return cls(ShapeModelConfig.from_dict(meta["config"]), meta["num_classes"],
                       tuple(meta["shape"]), empty_share=meta["empty_share"],
                       n_train=meta["n_train"], **arrays)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: inconsistent shape model file ({err})") from err


def fit_shape_model(masks: np.ndarray, num_classes: int, cfg: ShapeModelConfig | None = None
                    ) -> ShapeModel:
    """Same as :meth:`ShapeModel.fit`."""
    return ShapeModel.fit(masks, num_classes, cfg)


# ----------------------------------------------------------------------------- statistics


def _one_hot_flat(masks: np.ndarray, k: int) -> np.ndarray:
    return (masks == k).reshape(len(masks), -1).astype(np.float32)


def nearest_dice(samples: np.ndarray, reference: np.ndarray, num_classes: int,
                 exclude_self: bool = False, chunk: int = 256) -> np.ndarray:
    """Dice of each sample to its nearest reference mask, (S,) float.

    Multi-class: mean Dice over the foreground classes present in either mask. Masks are
    uint8 (S, H, W) and (R, H, W), all with foreground. ``exclude_self``: samples and
    reference are the same array and the diagonal is skipped (leave-one-out).
    """
    best = np.full(len(samples), np.nan)
    if len(samples) == 0 or len(reference) == 0:
        return best
    refs = [_one_hot_flat(reference, k) for k in range(1, num_classes)]
    ref_sizes = [r.sum(axis=1) for r in refs]
    for start in range(0, len(samples), chunk):
        s = samples[start:start + chunk]
        dice_sum = np.zeros((len(s), len(reference)), np.float64)
        count = np.zeros_like(dice_sum)
        for k, r, rs in zip(range(1, num_classes), refs, ref_sizes):
            a = _one_hot_flat(s, k)
            denom = a.sum(axis=1)[:, None] + rs[None, :]
            inter = a @ r.T
            valid = denom > 0
            dice_sum += np.where(valid, 2 * inter / np.maximum(denom, 1), 0)
            count += valid
        dice = np.where(count > 0, dice_sum / np.maximum(count, 1), 0.0)
        if exclude_self:
            idx = np.arange(len(s))
            dice[idx, start + idx] = -np.inf
        best[start:start + len(s)] = dice.max(axis=1)
    return best


def _class_stats(masks: np.ndarray, k: int, n_foreground: int) -> dict[str, float]:
    comps, areas = [], []
    for m in masks:
        inside = m == k
        a = int(inside.sum())
        if a:
            areas.append(a)
            comps.append(ndimage.label(inside, structure=_STRUCT8)[1])
    nan = float("nan")
    if not areas:
        return {"present_share": 0.0, "components_mean": nan, "components_one_share": nan,
                "components_min": nan, "components_max": nan, "area_median": nan,
                "area_p5": nan, "area_p95": nan, "area_min": nan, "area_max": nan, "n": 0}
    areas_a, comps_a = np.asarray(areas, float), np.asarray(comps, float)
    return {
        "present_share": len(areas) / max(n_foreground, 1),
        "components_mean": float(comps_a.mean()),
        "components_one_share": float(np.mean(comps_a == 1)),
        "components_min": float(comps_a.min()),
        "components_max": float(comps_a.max()),
        "area_median": float(np.median(areas_a)),
        "area_p5": float(np.percentile(areas_a, 5)),
        "area_p95": float(np.percentile(areas_a, 95)),
        "area_min": float(areas_a.min()),
        "area_max": float(areas_a.max()),
        "n": len(areas),
    }


def shape_statistics(samples: np.ndarray, reference: np.ndarray, num_classes: int | None = None, *,
                     max_reference: int = 500, max_samples: int = 1000, copy_dice: float = 0.95,
                     seed: int = 0) -> dict[str, Any]:
    """Novelty and plausibility of ``samples`` (uint8 (S, H, W)) against ``reference`` (R, H, W).

    Novelty: Dice of each non-empty sample to its nearest non-empty reference mask (mean
    over classes present in either), over a random subsample of at most ``max_reference``
    references (and ``max_samples`` samples); samples identical to any reference count as
    Dice 1 whether subsampled or not. ``novelty_median`` near 1 means copies, near 0
    means shapes unlike any real one. ``reference_novelty_median`` is the same measure
    for the (subsampled) references among themselves, leave-one-out: what new real
    slices from the same patients reach.

    Plausibility, per foreground class over the slices that contain it: connected
    components (8-connectivity; mean, share with exactly one, min, max), area (px;
    median, 5th/95th percentile, min, max), and ``within_range``: whether the samples'
    area median/p5/p95 and mean component count lie within the references'
    ``[min, max]``.

    Returns:
        A JSON-serialisable dict: ``novelty_median``, ``novelty_mean``, ``novelty_p5``,
        ``novelty_p95``, ``copies_share`` (Dice >= ``copy_dice``),
        ``reference_novelty_median``, ``empty_share`` / ``reference_empty_share``,
        ``n_samples`` / ``n_reference``, ``classes`` ({k: {"samples", "reference",
        "within_range"}}), and ``within_range`` (all classes' checks pass).
    """
    samples = _check_masks(samples, "samples")
    reference = _check_masks(reference, "reference")
    if samples.shape[1:] != reference.shape[1:]:
        raise ValueError(f"samples {samples.shape[1:]} and reference {reference.shape[1:]} "
                         "differ in slice size")
    if num_classes is None:
        num_classes = max(int(samples.max()), int(reference.max()), 1) + 1
    _check_masks(samples, "samples", num_classes)
    _check_masks(reference, "reference", num_classes)
    rng = np.random.default_rng(seed)
    s_fg = samples[samples.reshape(len(samples), -1).any(axis=1)]
    r_fg = reference[reference.reshape(len(reference), -1).any(axis=1)]

    ref_hashes = {m.tobytes() for m in r_fg}
    s_sub = s_fg if len(s_fg) <= max_samples else s_fg[np.sort(rng.choice(len(s_fg), max_samples, replace=False))]
    r_sub = r_fg if len(r_fg) <= max_reference else r_fg[np.sort(rng.choice(len(r_fg), max_reference, replace=False))]
    nearest = nearest_dice(s_sub, r_sub, num_classes)
    is_copy = np.array([m.tobytes() in ref_hashes for m in s_sub], bool)
    nearest[is_copy] = 1.0
    ref_loo = nearest_dice(r_sub, r_sub, num_classes, exclude_self=True) if len(r_sub) > 1 else np.array([])

    def _q(x: np.ndarray, q: float) -> float:
        x = x[np.isfinite(x)]
        return float(np.percentile(x, q)) if len(x) else float("nan")

    classes: dict[int, dict[str, Any]] = {}
    all_ok = True
    for k in range(1, num_classes):
        s_stats = _class_stats(s_fg, k, len(s_fg))
        r_stats = _class_stats(r_fg, k, len(r_fg))

        def _within(value: float, lo: float, hi: float) -> bool:
            return bool(np.isfinite(value) and lo <= value <= hi)

        within = {
            "area_median": _within(s_stats["area_median"], r_stats["area_min"], r_stats["area_max"]),
            "area_p5": _within(s_stats["area_p5"], r_stats["area_min"], r_stats["area_max"]),
            "area_p95": _within(s_stats["area_p95"], r_stats["area_min"], r_stats["area_max"]),
            "components_mean": _within(s_stats["components_mean"], r_stats["components_min"],
                                       r_stats["components_max"]),
        }
        within["all"] = all(within.values())
        all_ok &= within["all"]
        classes[k] = {"samples": s_stats, "reference": r_stats, "within_range": within}

    return {
        "n_samples": len(samples),
        "n_reference": len(reference),
        "novelty_median": _q(nearest, 50),
        "novelty_mean": float(np.nanmean(nearest)) if np.isfinite(nearest).any() else float("nan"),
        "novelty_p5": _q(nearest, 5),
        "novelty_p95": _q(nearest, 95),
        "copies_share": float(np.mean(nearest >= copy_dice)) if len(nearest) else float("nan"),
        "reference_novelty_median": _q(ref_loo, 50),
        "empty_share": 1 - len(s_fg) / len(samples),
        "reference_empty_share": 1 - len(r_fg) / len(reference),
        "classes": classes,
        "within_range": bool(all_ok),
    }
