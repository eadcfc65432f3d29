"""Volume -> normalised, resized 2D axial slices, cached once per patient.

Each patient becomes one compressed ``<case_id>.npz`` holding float16 images
(Z, C, S, S), uint8 masks (Z, S, S) and its geometry. Without a target spacing every
slice is resized to S x S whole; with one (nnU-Net resamples to the dataset's median
spacing) it is resampled to that in-plane spacing and centred on an S x S canvas, so a
pixel means the same millimetres for every scan. The cache folder is named by
a hash of the conversion settings, and every file stores those settings and the
source files' size and mtime: a cache built for other settings or other source
files is rebuilt, never silently reused.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lib.common.atomic import atomic_path, read_json, write_json
from lib.data.nifti import read_geometry
from lib.data.task import Case, MSDDataError, Task, Volume
from lib.data.volumes import load_volume

CACHE_VERSION = 2  # 2: volumes in canonical orientation
HIST_BINS = np.linspace(-4.0, 6.0, 101)


@dataclass(frozen=True)
class SliceConfig:
    """How volumes become slices.

    Attributes:
        image_size: side of the square slices fed to the network.
        clip_percentiles: MRI intensities are clipped to these per-volume percentiles,
            then z-scored.
        ct_window: CT intensities (HU) are clipped to this window, then scaled to
            about [-1, 1].
        spacing: target in-plane spacing in mm; None resizes each whole slice to the
            cache size (squashing non-square slices).
        canvas: side of the cached slices when resampling to ``spacing`` (None:
            ``image_size``); larger than ``image_size`` with ``roi``.
        roi: the network sees ``image_size`` crops of the canvas around the structure, found
            by a coarse localisation model (:mod:`lib.seg.roi`); does not change the cache.
        fit: without a target spacing, scale each slice so that its longer side is
            ``image_size`` (aspect ratio kept) and pad it to a square: 2D images of varying size.
    """

    image_size: int = 128
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    ct_window: tuple[float, float] = (-160.0, 240.0)
    spacing: float | None = None
    canvas: int | None = None
    roi: bool = False
    fit: bool = False

    def __post_init__(self) -> None:
        if self.fit and self.spacing is not None:
            raise ValueError("fit (scale to the longer side) and a target spacing exclude each other")
        if self.spacing is not None and not self.spacing > 0:
            raise ValueError(f"spacing must be a positive number of mm, got {self.spacing!r}")
        if self.canvas is not None and (self.spacing is None or self.canvas < self.image_size):
            raise ValueError(f"canvas {self.canvas} needs a spacing and must be at least image_size {self.image_size}")
        if self.roi and self.spacing is None:
            raise ValueError("roi=True needs a target spacing (e.g. spacing='median'): crops are cut in millimetres")

    @property
    def on_canvas(self) -> bool:
        """True when slices keep their aspect ratio and are centred on a square canvas."""
        return self.spacing is not None or self.fit

    @property
    def cached_size(self) -> int:
        """Side of the cached slices: the canvas, or the network's input size."""
        return self.canvas or self.image_size

    def key(self) -> str:
        """Short hash naming a cache built with these settings (``roi`` does not change it)."""
        blob = json.dumps({"v": CACHE_VERSION, **asdict(self), "roi": None}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:8]


@dataclass
class CaseMeta:
    """Geometry and provenance of one cached patient."""

    case_id: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    affine: np.ndarray
    image_path: str
    label_path: str
    stats: dict = field(default_factory=dict)
    resized: tuple[int, int] | None = None  # in-plane size at the target spacing, before the canvas


@dataclass
class SliceSet:
    """Slices of several patients in compact arrays.

    Attributes:
        images: float16 (N, C, S, S), normalised intensities.
        masks: uint8 (N, S, S), class ids.
        case_ids: (N,) patient id of each slice.
        slice_index: (N,) axial index of each slice in its volume.
        cases: per-patient geometry, keyed by case id, in load order.
        context: neighbouring slices on each side stacked into ``images`` (2.5D input,
            see :func:`with_context`); 0 for plain slices.
    """

    images: np.ndarray
    masks: np.ndarray
    case_ids: np.ndarray
    slice_index: np.ndarray
    cases: dict[str, CaseMeta]
    context: int = 0

    def __len__(self) -> int:
        return len(self.masks)

    def patient(self, case_id: str) -> SliceSet:
        """The slices of one patient, in axial order."""
        return self.subset(np.flatnonzero(self.case_ids == case_id))

    def subset(self, index: np.ndarray) -> SliceSet:
        """A SliceSet of the slices at ``index``."""
        ids = self.case_ids[index]
        cases = {k: v for k, v in self.cases.items() if k in set(ids.tolist())}
        return SliceSet(self.images[index], self.masks[index], ids, self.slice_index[index], cases, self.context)

    def centre_images(self) -> np.ndarray:
        """The images without their context neighbours: (N, C, S, S), for display."""
        c = self.images.shape[1] // (2 * self.context + 1)
        return self.images[:, self.context * c:(self.context + 1) * c]


def with_context(slices: SliceSet, k: int) -> SliceSet:
    """2.5D input: every slice with its ``k`` neighbours on either side as extra channels.

    Channels are ordered z-k ... z ... z+k (each with all modalities); beyond a volume's
    first or last slice the edge slice repeats. Neighbours are found within each patient
    by ``slice_index``, so patients never mix; every patient needs all its slices.
    """
    if k < 0:
        raise ValueError(f"context must be >= 0, got {k}")
    if k == 0 or slices.context:
        if slices.context not in (0, k):
            raise ValueError(f"slices already carry context {slices.context}, asked for {k}")
        return slices
    neighbours = np.empty((len(slices), 2 * k + 1), dtype=np.int64)
    for case_id in dict.fromkeys(slices.case_ids.tolist()):
        rows = np.flatnonzero(slices.case_ids == case_id)
        rows = rows[np.argsort(slices.slice_index[rows], kind="stable")]
        if not np.array_equal(slices.slice_index[rows], np.arange(len(rows))):
            raise ValueError(f"patient {case_id}: context slices need all of its slices, in one piece")
        for j, offset in enumerate(range(-k, k + 1)):
            neighbours[rows, j] = rows[np.clip(np.arange(len(rows)) + offset, 0, len(rows) - 1)]
    images = slices.images[neighbours].reshape(len(slices), -1, *slices.images.shape[-2:])
    return SliceSet(images, slices.masks, slices.case_ids, slices.slice_index, slices.cases, k)


def normalise_volume(image: np.ndarray, is_ct: bool, cfg: SliceConfig) -> np.ndarray:
    """Per-volume intensity normalisation.

    Args:
        image: float32 (C, X, Y, Z).
        is_ct: CT is clipped to ``cfg.ct_window`` and scaled; MRI is percentile-clipped
            and z-scored per channel.
    """
    out = np.empty_like(image, dtype=np.float32)
    for c, channel in enumerate(image):
        if is_ct:
            lo, hi = cfg.ct_window
            out[c] = (np.clip(channel, lo, hi) - (lo + hi) / 2) / ((hi - lo) / 2)
        else:
            lo, hi = np.percentile(channel, cfg.clip_percentiles)
            clipped = np.clip(channel, lo, hi)
            out[c] = (clipped - clipped.mean()) / max(float(clipped.std()), 1e-6)
    return out


def resampled_size(shape_xy: tuple[int, int], spacing_xy: tuple[float, float], cfg: SliceConfig) -> tuple[int, int]:
    """In-plane size of a slice after resampling: (S, S) without a target spacing, the longer
    side S with ``fit``."""
    if cfg.fit:
        scale = cfg.image_size / max(shape_xy)
        return tuple(max(1, round(n * scale)) for n in shape_xy)
    if cfg.spacing is None:
        return cfg.image_size, cfg.image_size
    return tuple(max(1, round(n * s / cfg.spacing)) for n, s in zip(shape_xy, spacing_xy))


def canvas_pads(resized: tuple[int, int], canvas: int) -> tuple[int, int, int, int]:
    """``F.pad`` widths (last axis first) centring a ``resized`` slice on a canvas;
    negative widths crop. Their negation undoes them."""
    (dx, dy) = (canvas - resized[0], canvas - resized[1])
    return dy // 2, dy - dy // 2, dx // 2, dx - dx // 2


def check_resampling(path: str | Path, shape: tuple[int, ...], spacing: tuple[float, ...], channels: int,
                     cfg: SliceConfig, limit_gb: float = 4.0) -> tuple[int, int]:
    """The resampled in-plane size, or MSDDataError before anything is computed when the
    resampled volume (float32) would need more than ``limit_gb``."""
    rx, ry = resampled_size(shape[:2], spacing[:2], cfg)
    gb = rx * ry * shape[2] * channels * 4 / 1e9
    if gb > limit_gb:
        raise MSDDataError(
            f"{path}: resampling {shape[0]}x{shape[1]} pixels of {spacing[0]:.3g}x{spacing[1]:.3g} mm to "
            f"{cfg.spacing} mm gives {rx}x{ry} per slice, {gb:.1f} GB for {shape[2]} slices (limit {limit_gb} GB); "
            "choose a coarser spacing")
    return rx, ry


def to_slices(image: np.ndarray, label: np.ndarray | None, spacing: tuple[float, float, float],
              cfg: SliceConfig) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int]]:
    """Axial slices at the cache's geometry.

    Args:
        image: float32 (C, X, Y, Z) normalised; bilinear with antialiasing.
        label: uint8 (X, Y, Z) or None; nearest neighbour.

    Returns:
        images float16 (Z, C, S, S), masks uint8 (Z, S, S) or None, and the in-plane size
        at the target spacing (S = ``cfg.cached_size``; outside the scan the canvas holds
        the volume's minimum intensity and background).
    """
    resized = resampled_size(image.shape[1:3], spacing[:2], cfg)
    img = torch.from_numpy(np.ascontiguousarray(image.transpose(3, 0, 1, 2)))
    if img.shape[-2:] != resized:
        img = F.interpolate(img, size=resized, mode="bilinear", antialias=True, align_corners=False)
    lab = None
    if label is not None:
        lab = torch.from_numpy(np.ascontiguousarray(label.transpose(2, 0, 1)))[:, None].float()
        if lab.shape[-2:] != resized:
            lab = F.interpolate(lab, size=resized, mode="nearest-exact")
    if cfg.on_canvas:
        pads = canvas_pads(resized, cfg.cached_size)
        img = F.pad(img, pads, value=float(img.min()) if img.numel() else 0.0)
        lab = None if lab is None else F.pad(lab, pads, value=0.0)
    masks = None if lab is None else lab[:, 0].to(torch.uint8).numpy()
    return img.half().numpy(), masks, resized


def ct_window_from_data(task: Task, case_ids: list[str], record: str | Path | None = None,
                        percentiles: tuple[float, float] = (0.5, 99.5)) -> tuple[float, float]:
    """A CT window from the data, as nnU-Net's CT normalisation: the ``percentiles`` of the
    intensities (HU) inside the labelled structures of ``case_ids`` (the training patients).

    Args:
        record: JSON file keeping the result for these patients, so it is computed once.
    """
    key = {"cases": sorted(case_ids), "percentiles": list(percentiles)}
    if record is not None and Path(record).is_file():
        kept = read_json(record)
        if kept.get("key") == key:
            return tuple(kept["window"])
    rng = np.random.default_rng(0)
    values = []
    for case_id in case_ids:
        volume = load_volume(task, task.case(case_id))
        inside = volume.image[0][volume.label > 0]
        values.append(rng.choice(inside, min(len(inside), 100_000), replace=False) if len(inside) else inside)
    values = np.concatenate(values)
    if not len(values):
        raise MSDDataError(f"{task.root}: no labelled voxels in the training patients to choose a CT window from; "
                           "give ct_window=(low, high)")
    window = tuple(round(float(v), 1) for v in np.percentile(values, percentiles))
    if window[0] >= window[1]:
        window = (window[0] - 1.0, window[1] + 1.0)
    if record is not None:
        write_json(record, {"key": key, "window": list(window)})
    print(f"CT window from the training patients' labelled voxels ({percentiles[0]}-{percentiles[1]} percentiles): "
          f"{window[0]:.0f} to {window[1]:.0f} HU")
    return window


def volume_stats(volume: Volume, normalised: np.ndarray) -> dict:
    """Numbers notebook 01 shows: raw percentiles, normalised histogram, foreground."""
    raw = volume.image
    fg_per_slice = (volume.label > 0).mean(axis=(0, 1))
    return {
        "raw_percentiles": {str(p): float(v) for p, v in zip((0.5, 50, 99.5), np.percentile(raw, (0.5, 50, 99.5)))},
        "norm_hist": np.histogram(normalised, bins=HIST_BINS)[0].tolist(),
        "foreground_fraction": float((volume.label > 0).mean()),
        "foreground_slices": int((fg_per_slice > 0).sum()),
        "class_voxels": {str(k): int(v) for k, v in zip(*np.unique(volume.label, return_counts=True))},
    }


def _source_signature(case: Case) -> dict:
    return {role: [p.stat().st_size, p.stat().st_mtime_ns] for role, p in (("image", case.image), ("label", case.label))}


def _fingerprint(case: Case, cfg: SliceConfig) -> str:
    return json.dumps({"v": CACHE_VERSION, "cfg": asdict(cfg), "src": _source_signature(case)}, sort_keys=True)


def convert_case(task: Task, case: Case, cfg: SliceConfig, out_path: Path) -> Path:
    """Convert one patient to its cache file (written atomically)."""
    if cfg.spacing is not None:
        check_resampling(case.image, *read_geometry(case.image), task.channels, cfg)
    volume = load_volume(task, case)
    norm = normalise_volume(volume.image, task.is_ct, cfg)
    images, masks, resized = to_slices(norm, volume.label, volume.spacing, cfg)
    if not np.isfinite(images).all():  # e.g. intensities beyond float16's range
        raise MSDDataError(f"{case.image}: {int(np.count_nonzero(~np.isfinite(images)))} slice values are not finite "
                           "after normalisation; check the scan's intensities")
    meta = {
        "resized": list(resized) if cfg.on_canvas else None,
        "fingerprint": _fingerprint(case, cfg),
        "case_id": case.case_id,
        "shape": list(volume.label.shape),
        "spacing": list(volume.spacing),
        "affine": volume.affine.tolist(),
        "image_path": str(case.image),
        "label_path": str(case.label),
        "stats": volume_stats(volume, norm),
    }
    with atomic_path(out_path, suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, images=images, masks=masks, meta=np.array(json.dumps(meta)))
    return out_path


def cache_dir_for(root: str | Path, task: Task, cfg: SliceConfig) -> Path:
    """``root/<task name>_<cached size>px_<settings hash>``."""
    return Path(root) / f"{task.root.name}_{cfg.cached_size}px_{cfg.key()}"


def _is_fresh(path: Path, case: Case, cfg: SliceConfig) -> bool:
    if not path.is_file():
        return False
    try:
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
    except (OSError, ValueError, KeyError):
        return False
    return meta.get("fingerprint") == _fingerprint(case, cfg)


def build_cache(task: Task, cache_root: str | Path, cfg: SliceConfig, *, workers: int = 2, progress: bool = True) -> Path:
    """Convert every patient of ``task`` whose cache file is missing or stale.

    Returns:
        The cache folder (see :func:`cache_dir_for`).
    """
    out_dir = cache_dir_for(cache_root, task, cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [c for c in task.cases if not _is_fresh(out_dir / f"{c.case_id}.npz", c, cfg)]
    if not todo:
        return out_dir
    bar = tqdm(total=len(todo), desc="slices", disable=not progress)
    if workers > 1 and len(todo) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:  # nibabel/zlib/torch release the GIL
            futures = [pool.submit(convert_case, task, c, cfg, out_dir / f"{c.case_id}.npz") for c in todo]
            for fut in futures:
                fut.result()
                bar.update()
    else:
        for case in todo:
            convert_case(task, case, cfg, out_dir / f"{case.case_id}.npz")
            bar.update()
    bar.close()
    return out_dir


def load_slices(cache_dir: str | Path, case_ids: list[str]) -> SliceSet:
    """Load the cached slices of ``case_ids`` (in that order) into one SliceSet."""
    cache_dir = Path(cache_dir)
    images, masks, ids, index, cases = [], [], [], [], {}
    for case_id in case_ids:
        path = cache_dir / f"{case_id}.npz"
        if not path.is_file():
            raise MSDDataError(f"{path}: no cached slices for patient {case_id!r}; run build_cache first")
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
            images.append(z["images"])
            masks.append(z["masks"])
        n = len(masks[-1])
        ids.append(np.full(n, case_id, dtype=object))
        index.append(np.arange(n, dtype=np.int32))
        cases[case_id] = CaseMeta(
            case_id, tuple(meta["shape"]), tuple(meta["spacing"]), np.array(meta["affine"]),
            meta["image_path"], meta["label_path"], meta["stats"],
            tuple(meta["resized"]) if meta.get("resized") else None,
        )
    if not images:
        raise MSDDataError(f"{cache_dir}: no patients requested")
    return SliceSet(
        np.concatenate(images), np.concatenate(masks), np.concatenate(ids).astype(str),
        np.concatenate(index), cases,
    )


def concat(*sets: SliceSet) -> SliceSet:
    """Join SliceSets (e.g. real and synthetic training slices) with the same context."""
    if len({s.context for s in sets}) > 1:
        raise ValueError(f"cannot join slices with different context: {[s.context for s in sets]}")
    return SliceSet(
        np.concatenate([s.images for s in sets]),
        np.concatenate([s.masks for s in sets]),
        np.concatenate([s.case_ids for s in sets]),
        np.concatenate([s.slice_index for s in sets]),
        {k: v for s in sets for k, v in s.cases.items()},
        sets[0].context,
    )


def save_pairs(path: str | Path, images: np.ndarray, masks: np.ndarray, meta: dict | None = None) -> Path:
    """Save generated image+mask pairs in the cache format (float16 images, uint8 masks).

    Args:
        images: (N, C, H, W) normalised intensities; masks: (N, H, W) class ids.
    """
    if images.ndim != 4 or masks.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"{path}: images {images.shape} and masks {masks.shape} do not pair up")
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, images=images.astype(np.float16), masks=masks.astype(np.uint8),
                     meta=np.array(json.dumps(meta or {})))
    return Path(path)


def load_pairs(path: str | Path, source: str = "synthetic") -> SliceSet:
    """Load pairs saved by :func:`save_pairs` as a SliceSet that training reads directly."""
    with np.load(path) as z:
        images, masks = z["images"], z["masks"]
    n = len(masks)
    return SliceSet(images, masks, np.full(n, source), np.arange(n, dtype=np.int32), {})
