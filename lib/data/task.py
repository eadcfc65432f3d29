"""Read a Medical Segmentation Decathlon task: dataset.json, imagesTr/labelsTr, and the types
every data format shares (:class:`Task`, :class:`Case`, :class:`Volume`, :class:`MSDDataError`).

NIfTI volumes are read by :mod:`lib.data.nifti`, 2D image folders by :mod:`lib.data.images2d`.
Every problem raises :class:`MSDDataError` naming the file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lib.common.atomic import read_json


class MSDDataError(ValueError):
    """A problem with an MSD task folder or one of its files."""


ID_KINDS = {"modality": "channel id", "labels": "class id"}  # the dataset.json maps of id -> name


@dataclass(frozen=True)
class Case:
    """One labelled patient: its id and the paths of its image and label."""

    case_id: str
    image: Path
    label: Path


@dataclass
class Task:
    """An MSD task folder as described by its dataset.json."""

    root: Path
    name: str
    modalities: dict[int, str]
    labels: dict[int, str]
    cases: list[Case] = field(default_factory=list)
    pixel_spacing: float | None = None  # 2D image folders: mm per pixel, when known

    @property
    def is_2d(self) -> bool:
        """True for a folder of 2D images (:mod:`lib.data.images2d`) rather than NIfTI volumes."""
        return bool(self.cases) and not self.cases[0].image.name.endswith((".nii", ".nii.gz"))

    @property
    def distance_unit(self) -> str:
        """Unit of HD95 and other distances: "px" for 2D images without a pixel spacing, else "mm"."""
        return "px" if self.is_2d and not self.pixel_spacing else "mm"

    @property
    def channels(self) -> int:
        """Number of image channels (modalities)."""
        return len(self.modalities)

    @property
    def num_classes(self) -> int:
        """Number of label classes including background."""
        return len(self.labels)

    @property
    def is_ct(self) -> bool:
        """True when the (first) modality is CT, which is normalised by HU window."""
        return self.modalities.get(0, "").upper() == "CT"

    def case(self, case_id: str) -> Case:
        """Return the case with this id."""
        for case in self.cases:
            if case.case_id == case_id:
                return case
        raise KeyError(f"{self.root}: no case {case_id!r}")


@dataclass
class Volume:
    """A loaded patient.

    Attributes:
        image: float32 array (C, X, Y, Z); axial slices along the last axis.
        label: uint8 array (X, Y, Z).
        spacing: voxel size in mm along (X, Y, Z).
        affine: 4x4 voxel-to-world matrix of the label file.
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray


def case_id_from_path(path: str | Path) -> str:
    """``imagesTr/la_003.nii.gz`` -> ``la_003``."""
    name = Path(path).name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def read_dataset_json(path: str | Path) -> dict[str, Any]:
    """A dataset.json as a dict; MSDDataError naming the file when it is unreadable, not JSON
    or not a JSON object."""
    path = Path(path)
    try:
        meta = read_json(path)
    except UnicodeDecodeError as err:
        raise MSDDataError(f"{path}: not UTF-8 text ({err})") from err
    except ValueError as err:  # read_json names the file
        raise MSDDataError(str(err)) from err
    except OSError as err:
        raise MSDDataError(f"{path}: cannot read ({type(err).__name__}: {err})") from err
    if not isinstance(meta, dict):
        raise MSDDataError(f"{path}: dataset.json must be a JSON object, got {type(meta).__name__}")
    return meta


def id_names(meta: dict[str, Any], key: str, path: str | Path) -> dict[int, str]:
    """The ``modality`` or ``labels`` map of a dataset.json (``{"0": "CT"}``) as {id: name},
    {} when absent.

    Raises:
        MSDDataError: naming ``path`` and ``key`` for a map that is not an object, a key that is
            not a non-negative integer, a name that is not a string, or ids with gaps.
    """
    names = meta.get(key, {})
    kind = ID_KINDS[key]
    if not isinstance(names, dict):
        raise MSDDataError(f"{path}: {key!r} must be an object of {kind} -> name "
                           f"(like {{\"0\": \"...\"}}), got {type(names).__name__}")
    out: dict[int, str] = {}
    for k, name in names.items():
        if not re.fullmatch(r"[0-9]+", k):
            raise MSDDataError(f"{path}: {key!r} key {k!r} is not an integer {kind}")
        if int(k) in out:
            raise MSDDataError(f"{path}: {key!r} declares {kind} {int(k)} twice")
        if not isinstance(name, str):
            raise MSDDataError(
                f"{path}: {key!r} entry {k!r} must be a name (string), got {type(name).__name__}")
        out[int(k)] = name
    if sorted(out) != list(range(len(out))):
        raise MSDDataError(
            f"{path}: {key!r} must number its {kind}s 0, 1, 2, ... without gaps, got {sorted(out)}")
    return out


def task_file(root: Path, value: Any, where: str, meta_path: Path) -> Path:
    """The file a dataset.json entry names (``"./imagesTr/la_003.nii.gz"``), resolved.

    Raises:
        MSDDataError: naming ``where`` (the entry) for a value that is not a path, or an absolute
            path or one that climbs out of the task folder with ``..``.
    """
    if not isinstance(value, str) or not value or "\0" in value:
        raise MSDDataError(f"{meta_path}: {where} must be a path string, got {value!r:.80}")
    rel = os.path.normpath(value)
    if os.path.isabs(rel) or rel.split(os.sep)[0] == os.pardir:
        raise MSDDataError(f"{meta_path}: {where} {value!r} points outside the task folder {root}")
    return (root / rel).resolve()


def training_cases(root: Path, meta_path: Path, training: Any) -> list[Case]:
    """The cases of dataset.json's ``training`` list, each with an existing image and label.

    Raises:
        MSDDataError: a malformed list or entry, a path outside the task folder, a missing file,
            or two entries with one case id (naming both images).
    """
    if not isinstance(training, list):
        raise MSDDataError(f"{meta_path}: 'training' must be a list of {{\"image\", \"label\"}} "
                           f"objects, got {type(training).__name__}")
    cases: dict[str, Case] = {}
    for i, entry in enumerate(training):
        where = f"'training' entry {i}"
        if not isinstance(entry, dict):
            raise MSDDataError(f"{meta_path}: {where} must be an object with 'image' and 'label', "
                               f"got {entry!r:.80}")
        for key in ("image", "label"):
            if key not in entry:
                raise MSDDataError(f"{meta_path}: {where} has no {key!r}")
        image = task_file(root, entry["image"], f"{where} 'image'", meta_path)
        label = task_file(root, entry["label"], f"{where} 'label'", meta_path)
        if not image.is_file():
            raise MSDDataError(f"{image}: image listed in {meta_path} does not exist")
        if not label.is_file():
            raise MSDDataError(f"{label}: label for image {image.name} does not exist")
        case = Case(case_id_from_path(image), image, label)
        if case.case_id in cases:
            raise MSDDataError(f"{meta_path}: case id {case.case_id!r} of {image} is also the id "
                               f"of {cases[case.case_id].image}; every case needs its own id")
        cases[case.case_id] = case
    return list(cases.values())


def read_task(root: str | Path) -> Task:
    """Read and check an MSD task folder (dataset.json, imagesTr, labelsTr).

    Args:
        root: folder holding dataset.json.

    Raises:
        MSDDataError: missing or invalid dataset.json (naming the field), missing folders or
            files, paths outside the task folder, duplicate case ids, an empty task, or an
            image without its label.
    """
    root = Path(root)
    if not root.is_dir():
        raise MSDDataError(f"{root}: task folder does not exist")
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise MSDDataError(f"{meta_path}: missing dataset.json (not an MSD task folder)")
    meta = read_dataset_json(meta_path)
    for key in ("modality", "labels", "training"):
        if key not in meta:
            raise MSDDataError(f"{meta_path}: dataset.json has no {key!r} entry")
    modalities = id_names(meta, "modality", meta_path)
    labels = id_names(meta, "labels", meta_path)
    if not modalities:
        raise MSDDataError(f"{meta_path}: 'modality' declares no channel")
    if not labels:  # id_names: non-empty ids start at 0
        raise MSDDataError(f"{meta_path}: 'labels' must declare background 0")
    cases = training_cases(root, meta_path, meta["training"])
    if not cases:
        raise MSDDataError(f"{meta_path}: no training cases listed (empty task)")
    return Task(root, str(meta.get("name", root.name)), modalities, labels, cases)


def check_finite(image: np.ndarray, path: str | Path) -> np.ndarray:
    """``image`` unchanged, or MSDDataError naming ``path`` and the count of NaN / infinite
    voxels: one such voxel would turn every normalised value of its scan into NaN."""
    bad = image.size - int(np.count_nonzero(np.isfinite(image)))
    if bad:
        raise MSDDataError(f"{path}: {bad} of {image.size} voxels are NaN or infinite; "
                           "replace them (for example with the scan's background value) before using the scan")
    return image
