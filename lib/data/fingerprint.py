"""A dataset's fingerprint, as nnU-Net computes one before planning: what the data looks like.

Every case is read once (:func:`lib.data.volumes.load_volume`: canonical orientation, geometry
and labels checked) and reduced to a few numbers; the dataset's fingerprint summarises them:

* ``kind``: ``"2d"`` (a folder of 2D images, each its own patient) or ``"3d"`` (NIfTI volumes);
* ``image_size_px`` (X, Y, Z) and ``spacing_mm`` (median, 10th and 90th percentile, largest),
  ``longer_side_px`` (each image's longer in-plane side), ``field_of_view_mm`` (in-plane);
* ``anisotropy``: largest over smallest voxel size of each scan (median and largest);
* ``modality``: the declared channels, whether the data is CT (dataset.json) and whether the
  intensities look like Hounsfield units (air near -1000);
* ``intensity``: per channel, the 0.5, 50 and 99.5 percentiles of all voxels and of the labelled
  voxels (at most :data:`SAMPLES_PER_CASE` of each per case, as nnU-Net samples);
* ``foreground``: per class (and ``"all"``: every class as one, what a locator finds), the
  bounding-box extent in pixels and mm (median and 90th percentile), its longer in-plane side,
  the voxels, and in how many cases it occurs;
* ``foreground_slices``: the share of axial slices holding foreground.

The fingerprint is cached in the run folder as ``fingerprint.json`` with a key of the source
files (paths, sizes and modification times) and reused while the data is unchanged.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from lib.common.atomic import read_json, write_json
from lib.data.task import MSDDataError, Task
from lib.data.volumes import load_volume

FINGERPRINT_VERSION = 1
FILE_NAME = "fingerprint.json"
SAMPLES_PER_CASE = 10_000  # voxels drawn per case and channel for the intensity percentiles (nnU-Net: 10,000)
PERCENTILES = (0.5, 50.0, 99.5)
HU_AIR = -500.0  # a CT scan in HU holds air (about -1000) well below this; MRI and 8-bit images never do


def source_key(task: Task) -> str:
    """A key of the task's files: paths, sizes and modification times of every image and label
    (and of dataset.json); it changes when any of them does."""
    files = [p for case in task.cases for p in (case.image, case.label)]
    meta = task.root / "dataset.json"
    files += [meta] if meta.is_file() else []
    try:
        stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    except OSError as err:
        raise MSDDataError(f"{err.filename}: cannot read ({type(err).__name__}: {err.strerror})") from err
    blob = json.dumps({"v": FINGERPRINT_VERSION, "name": task.name, "files": stats}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _bbox_extent(mask: np.ndarray) -> list[int]:
    """Bounding-box side (voxels) of a boolean (X, Y, Z) mask along each axis."""
    out = []
    for axis in range(3):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        out.append(int(present[-1] - present[0] + 1))
    return out


def case_fingerprint(task: Task, case_index: int, samples: int = SAMPLES_PER_CASE) -> dict[str, Any]:
    """The numbers of one case that the dataset fingerprint summarises (its voxels are read once).

    Returns:
        shape, spacing, per-channel min/max and intensity samples (all voxels and labelled
        voxels), per-class extent and voxels, and the slices holding foreground.
    """
    case = task.cases[case_index]
    volume = load_volume(task, case)
    spacing = [float(s) for s in volume.spacing]
    label = volume.label
    rng = np.random.default_rng(case_index)
    fg = label > 0
    channels = []
    for channel in volume.image:
        flat, inside = channel.ravel(), channel[fg]
        channels.append({
            "min": float(flat.min()), "max": float(flat.max()),
            "all": flat[rng.integers(0, flat.size, min(samples, flat.size))],
            "foreground": inside[rng.integers(0, inside.size, min(samples, inside.size))] if inside.size else inside,
        })
    classes = {}
    for k in ["all", *(k for k in sorted(task.labels) if k != 0)]:
        mask = fg if k == "all" else label == k
        voxels = int(np.count_nonzero(mask))
        if voxels:
            extent = _bbox_extent(mask)
            classes[str(k)] = {"voxels": voxels, "extent_px": extent,
                               "extent_mm": [n * s for n, s in zip(extent, spacing)]}
    per_slice = fg.any(axis=(0, 1))
    return {"case_id": case.case_id, "shape": [int(n) for n in label.shape], "spacing": spacing,
            "channels": channels, "classes": classes, "slices": int(per_slice.size),
            "foreground_slices": int(per_slice.sum())}


def _stats(values: list[Any] | np.ndarray, digits: int = 3) -> dict[str, Any]:
    """Median, 10th and 90th percentile and largest value (per column for rows of numbers)."""
    array = np.asarray(values, dtype=np.float64)
    out = {name: np.percentile(array, q, axis=0) for name, q in (("median", 50), ("p10", 10), ("p90", 90))}
    out["max"] = array.max(axis=0)
    return {name: np.round(v, digits).tolist() for name, v in out.items()}


def _percentiles(values: np.ndarray) -> dict[str, float] | None:
    if not values.size:
        return None
    return {f"{q:g}": round(float(v), 3) for q, v in zip(PERCENTILES, np.percentile(values, PERCENTILES))}


def summarise(task: Task, cases: list[dict[str, Any]], key: str = "") -> dict[str, Any]:
    """The dataset fingerprint (see the module docstring) from :func:`case_fingerprint` of every case."""
    shapes = [c["shape"] for c in cases]
    spacings = [c["spacing"] for c in cases]
    intensity, lowest = {}, []
    for ch, name in sorted(task.modalities.items()):
        pooled = [np.concatenate([c["channels"][ch][part] for c in cases]) for part in ("all", "foreground")]
        lowest.append(min(c["channels"][ch]["min"] for c in cases))
        intensity[str(ch)] = {"name": name, "all": _percentiles(pooled[0]), "foreground": _percentiles(pooled[1]),
                              "min": round(lowest[-1], 3), "max": round(max(c["channels"][ch]["max"] for c in cases), 3)}
    first = intensity["0"]["all"]
    looks_like_hu = bool(first and first["0.5"] <= HU_AIR and intensity["0"]["max"] > 0)
    foreground = {}
    for k in ["all", *(str(k) for k in sorted(task.labels) if k != 0)]:
        present = [c["classes"][k] for c in cases if k in c["classes"]]
        entry: dict[str, Any] = {"name": "all classes" if k == "all" else task.labels[int(k)], "cases": len(present)}
        if present:
            px = [p["extent_px"] for p in present]
            mm = [p["extent_mm"] for p in present]
            entry |= {"extent_px": _stats(px, 1), "extent_mm": _stats(mm, 2),
                      "longer_in_plane_px": _stats([max(e[:2]) for e in px], 1),
                      "longer_in_plane_mm": _stats([max(e[:2]) for e in mm], 2),
                      "voxels": _stats([p["voxels"] for p in present], 1)}
        foreground[k] = entry
    share = [c["foreground_slices"] / c["slices"] for c in cases]
    return {
        "version": FINGERPRINT_VERSION,
        "source_key": key,
        "dataset": task.name,
        "folder": task.root.name,
        "kind": "2d" if task.is_2d else "3d",
        "cases": len(cases),
        "spacing_unit": "px" if task.is_2d and not task.pixel_spacing else "mm",
        "image_size_px": _stats(shapes, 1),
        "longer_side_px": _stats([max(s[:2]) for s in shapes], 1),
        "spacing_mm": _stats(spacings, 4),
        "in_plane_spacing_mm": _stats([min(s[:2]) for s in spacings], 4),
        "field_of_view_mm": _stats([[n * s for n, s in zip(sh[:2], sp[:2])] for sh, sp in zip(shapes, spacings)], 2),
        "anisotropy": _stats([max(s) / min(s) for s in (sp if len(sh) == 3 and sh[2] > 1 else sp[:2]
                                                         for sh, sp in zip(shapes, spacings))], 3),
        "modality": {"channels": {str(k): v for k, v in sorted(task.modalities.items())}, "is_ct": task.is_ct,
                     "intensities_look_like_hu": looks_like_hu},
        "intensity": intensity,
        "labels": {str(k): v for k, v in sorted(task.labels.items())},
        "foreground": foreground,
        "foreground_slices": {"share": round(float(sum(c["foreground_slices"] for c in cases)
                                                   / sum(c["slices"] for c in cases)), 4),
                              "per_case": _stats(share, 4),
                              "slices_with_foreground": _stats([c["foreground_slices"] for c in cases], 1)},
    }


def compute_fingerprint(task: Task, *, workers: int = 2, progress: bool = True) -> dict[str, Any]:
    """The fingerprint of ``task``, reading every case once (``workers`` threads).

    Raises:
        MSDDataError: an unreadable case, naming its file (as :func:`lib.data.volumes.load_volume`).
    """
    key = source_key(task)
    indices = range(len(task.cases))
    bar = tqdm(total=len(task.cases), desc="fingerprint", disable=not progress)
    if workers > 1 and len(task.cases) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:  # nibabel/zlib/PIL release the GIL
            futures = [pool.submit(case_fingerprint, task, i) for i in indices]
            cases = []
            for fut in futures:
                cases.append(fut.result())
                bar.update()
    else:
        cases = []
        for i in indices:
            cases.append(case_fingerprint(task, i))
            bar.update()
    bar.close()
    return summarise(task, cases, key)


def dataset_fingerprint(task: Task, run_dir: str | Path | None = None, *, workers: int = 2,
                        progress: bool = True) -> dict[str, Any]:
    """The fingerprint of ``task``, cached as ``<run_dir>/fingerprint.json`` (written atomically)
    and reused while the task's files are unchanged (see :func:`source_key`); without
    ``run_dir`` it is computed and not kept."""
    path = Path(run_dir) / FILE_NAME if run_dir is not None else None
    key = source_key(task)
    if path is not None and path.is_file():
        try:
            kept = read_json(path)
        except ValueError:  # a damaged cache is recomputed
            kept = {}
        if isinstance(kept, dict) and kept.get("version") == FINGERPRINT_VERSION and kept.get("source_key") == key:
            return kept
    found = compute_fingerprint(task, workers=workers, progress=progress)
    if path is not None:
        write_json(path, found)
    return found
