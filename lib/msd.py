"""Read a Medical Segmentation Decathlon task: dataset.json, imagesTr/labelsTr, NIfTI volumes.

Volumes keep their voxel order, spacing and affine, so predictions can be written back
in the original geometry. Every problem raises :class:`MSDDataError` naming the file.
"""

from __future__ import annotations

import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from lib.atomic import read_json


class MSDDataError(ValueError):
    """A problem with an MSD task folder or one of its files."""


# Largest image/label geometry difference accepted as header float noise (nnU-Net's integrity
# check compares the same properties); each keeps the label well under a voxel off its image.
SPACING_RTOL = 1e-3  # relative difference of a voxel size
ORIGIN_TOL = 1e-2  # origin distance as a fraction of the smallest voxel size, at least ORIGIN_MIN_MM
ORIGIN_MIN_MM = 1e-3
DIRECTION_TOL = 1e-3  # difference of an entry of the unit direction matrix (about 0.06 degrees)

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
        """True for a folder of 2D images (:mod:`lib.images2d`) rather than NIfTI volumes."""
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


def load_nifti(path: str | Path) -> nib.Nifti1Image:
    """Load a NIfTI file fully, turning a corrupt or truncated file into MSDDataError."""
    path = Path(path)
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
    except (OSError, EOFError, zlib.error, ValueError, nib.filebasedimages.ImageFileError) as err:
        raise MSDDataError(f"{path}: cannot read NIfTI ({type(err).__name__}: {err})") from err
    return nib.Nifti1Image(data, img.affine, img.header)


def to_canonical(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """The image in the closest canonical (RAS+) voxel order, as MONAI's ``Orientation("RAS")``:
    every scan reaches the networks in one orientation, whatever order its file stores."""
    return nib.as_closest_canonical(img)


def from_canonical(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Undo :func:`to_canonical` on an (X, Y, Z) array: back to the voxel order of a file
    with ``affine``."""
    ornt = nib.orientations.io_orientation(affine)
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")), ornt)
    return np.ascontiguousarray(nib.orientations.apply_orientation(array, back))


def read_nifti_label(path: str | Path) -> np.ndarray:
    """A NIfTI label file as uint8 (X, Y, Z) in canonical orientation."""
    return np.asarray(to_canonical(load_nifti(path)).dataobj).astype(np.uint8)


def read_geometry(path: str | Path) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Shape and voxel size (mm) from a NIfTI header, without reading the voxels."""
    try:
        header = nib.load(Path(path)).header
        return tuple(int(n) for n in header.get_data_shape()), tuple(float(z) for z in header.get_zooms())
    except (OSError, EOFError, zlib.error, ValueError, nib.filebasedimages.ImageFileError) as err:
        raise MSDDataError(f"{path}: cannot read NIfTI ({type(err).__name__}: {err})") from err


def check_finite(image: np.ndarray, path: str | Path) -> np.ndarray:
    """``image`` unchanged, or MSDDataError naming ``path`` and the count of NaN / infinite
    voxels: one such voxel would turn every normalised value of its scan into NaN."""
    bad = image.size - int(np.count_nonzero(np.isfinite(image)))
    if bad:
        raise MSDDataError(f"{path}: {bad} of {image.size} voxels are NaN or infinite; "
                           "replace them (for example with the scan's background value) before using the scan")
    return image


def grid(affine: np.ndarray) -> dict[str, np.ndarray]:
    """Direction (unit voxel axes as columns), voxel spacing (mm) and origin (mm) of an affine."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    return {"direction": affine[:3, :3] / np.where(spacing > 0, spacing, 1.0), "spacing": spacing,
            "origin": affine[:3, 3]}


def check_same_grid(image: nib.Nifti1Image, label: nib.Nifti1Image, image_path: str | Path,
                    label_path: str | Path) -> None:
    """MSDDataError naming both files unless the label's voxel grid is its image's: direction,
    spacing and origin of the files' affines equal within DIRECTION_TOL, SPACING_RTOL and
    ORIGIN_TOL (a flipped, rescaled or shifted label would land on the wrong voxels). Direction
    and spacing come first, as they change the origin too."""
    ours, theirs = grid(image.affine), grid(label.affine)
    tolerance = {"direction": DIRECTION_TOL, "spacing": SPACING_RTOL * ours["spacing"],
                 "origin": max(ORIGIN_MIN_MM, ORIGIN_TOL * float(ours["spacing"].min()))}
    for what, tol in tolerance.items():
        if (np.abs(theirs[what] - ours[what]) > tol).any():
            raise MSDDataError(
                f"{label_path}: label {what} {_rounded(theirs[what])} differs from image {what} "
                f"{_rounded(ours[what])} of {image_path}; save the label on its image's voxel grid")


def _rounded(values: np.ndarray) -> list:
    return (np.round(values, 6) + 0.0).tolist()  # + 0.0: no "-0.0"


def channels_first(img: nib.Nifti1Image, path: str | Path) -> np.ndarray:
    """A 3D or 4D (modalities last) NIfTI image as float32 (C, X, Y, Z); MSDDataError for
    another shape or non-finite voxels (:func:`check_finite`)."""
    image = np.asarray(img.dataobj, dtype=np.float32)
    if image.ndim == 3:
        return check_finite(image[None], path)
    if image.ndim == 4:
        return check_finite(np.moveaxis(image, -1, 0), path)
    raise MSDDataError(f"{path}: expected a 3D or 4D image, got shape {image.shape}")


def load_nifti_case(task: Task, case: Case) -> Volume:
    """Load one NIfTI case in canonical orientation, checking its geometry and label values.

    Raises:
        MSDDataError: unreadable file, image and label of different shape, spacing, origin
            or direction (:func:`check_same_grid`), or label values not declared in dataset.json.
    """
    img, lab = load_nifti(case.image), load_nifti(case.label)
    check_same_grid(img, lab, case.image, case.label)
    img, lab = to_canonical(img), to_canonical(lab)
    image = channels_first(img, case.image)
    if image.shape[0] != task.channels:
        raise MSDDataError(
            f"{case.image}: {image.shape[0]} channels but dataset.json declares {task.channels}"
        )
    label = np.asarray(lab.dataobj)
    if label.shape != image.shape[1:]:
        raise MSDDataError(
            f"{case.label}: label shape {label.shape} differs from image shape {image.shape[1:]} "
            f"of {case.image}"
        )
    values = np.unique(label)
    unknown = sorted(set(values.tolist()) - set(task.labels))
    if unknown:
        raise MSDDataError(
            f"{case.label}: label values {unknown} not declared in dataset.json "
            f"(declared: {sorted(task.labels)})"
        )
    spacing = tuple(float(s) for s in img.header.get_zooms()[:3])
    return Volume(case.case_id, image, label.astype(np.uint8), spacing, lab.affine.copy())
