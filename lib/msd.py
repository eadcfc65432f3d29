"""Read a Medical Segmentation Decathlon task: dataset.json, imagesTr/labelsTr, NIfTI volumes.

Volumes keep their voxel order, spacing and affine, so predictions can be written back
in the original geometry. Every problem raises :class:`MSDDataError` naming the file.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from lib.atomic import read_json


class MSDDataError(ValueError):
    """A problem with an MSD task folder or one of its files."""


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


def read_task(root: str | Path) -> Task:
    """Read and check an MSD task folder (dataset.json, imagesTr, labelsTr).

    Args:
        root: folder holding dataset.json.

    Raises:
        MSDDataError: missing or invalid dataset.json, missing folders or files,
            an empty task, or an image without its label.
    """
    root = Path(root)
    if not root.is_dir():
        raise MSDDataError(f"{root}: task folder does not exist")
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise MSDDataError(f"{meta_path}: missing dataset.json (not an MSD task folder)")
    meta = read_json(meta_path)
    for key in ("modality", "labels", "training"):
        if key not in meta:
            raise MSDDataError(f"{meta_path}: dataset.json has no {key!r} entry")
    modalities = {int(k): str(v) for k, v in meta["modality"].items()}
    labels = {int(k): str(v) for k, v in meta["labels"].items()}
    if not labels or 0 not in labels:
        raise MSDDataError(f"{meta_path}: 'labels' must declare background 0")
    cases = []
    for entry in meta["training"]:
        image = (root / entry["image"]).resolve()
        label = (root / entry["label"]).resolve()
        if not image.is_file():
            raise MSDDataError(f"{image}: image listed in {meta_path} does not exist")
        if not label.is_file():
            raise MSDDataError(f"{label}: label for image {image.name} does not exist")
        cases.append(Case(case_id_from_path(image), image, label))
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


def read_label(path: str | Path) -> np.ndarray:
    """A label file as uint8 (X, Y, Z) in canonical orientation; a 2D mask as (X, Y, 1)."""
    if not str(path).endswith((".nii", ".nii.gz")):
        from lib.images2d import read_mask  # 2D folders build on this module

        return read_mask(path)
    return np.asarray(to_canonical(load_nifti(path)).dataobj).astype(np.uint8)


def read_geometry(path: str | Path) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Shape and voxel size (mm) from a NIfTI header, without reading the voxels."""
    try:
        header = nib.load(Path(path)).header
        return tuple(int(n) for n in header.get_data_shape()), tuple(float(z) for z in header.get_zooms())
    except (OSError, EOFError, zlib.error, ValueError, nib.filebasedimages.ImageFileError) as err:
        raise MSDDataError(f"{path}: cannot read NIfTI ({type(err).__name__}: {err})") from err


def channels_first(img: nib.Nifti1Image, path: str | Path) -> np.ndarray:
    """A 3D or 4D (modalities last) NIfTI image as float32 (C, X, Y, Z)."""
    image = np.asarray(img.dataobj, dtype=np.float32)
    if image.ndim == 3:
        return image[None]
    if image.ndim == 4:
        return np.moveaxis(image, -1, 0)
    raise MSDDataError(f"{path}: expected a 3D or 4D image, got shape {image.shape}")


def load_volume(task: Task, case: Case) -> Volume:
    """Load one case in canonical orientation, checking its geometry and label values
    (a 2D image folder's case as a one-slice volume, see :mod:`lib.images2d`).

    Raises:
        MSDDataError: unreadable file, image and label shapes that differ, or label
            values not declared in dataset.json.
    """
    if task.is_2d:
        from lib.images2d import load_image_case  # 2D folders build on this module

        return load_image_case(task, case)
    img = to_canonical(load_nifti(case.image))
    lab = to_canonical(load_nifti(case.label))
    image = channels_first(img, case.image)
    if image.shape[0] != task.channels:
        raise MSDDataError(
            f"{case.image}: {image.shape[0]} channels but dataset.json declares {task.channels}"
        )
    label = np.asarray(lab.dataobj)
    if label.shape != image.shape[1:]:
        raise MSDDataError(
            f"{case.label}: label shape {label.shape} differs from image shape {image.shape[1:]}"
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
