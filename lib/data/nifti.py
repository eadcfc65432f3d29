"""NIfTI volumes of an MSD task: load a file, canonical (RAS+) orientation and back, the
image/label grid check, and one case as a :class:`lib.data.task.Volume`.

Volumes keep their voxel order, spacing and affine, so predictions can be written back
in the original geometry. Every problem raises :class:`lib.data.task.MSDDataError` naming the file.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from lib.data.task import Case, MSDDataError, Task, Volume, check_finite

# Largest image/label geometry difference accepted as header float noise (nnU-Net's integrity
# check compares the same properties); each keeps the label well under a voxel off its image.
SPACING_RTOL = 1e-3  # relative difference of a voxel size
ORIGIN_TOL = 1e-2  # origin distance as a fraction of the smallest voxel size, at least ORIGIN_MIN_MM
ORIGIN_MIN_MM = 1e-3
DIRECTION_TOL = 1e-3  # difference of an entry of the unit direction matrix (about 0.06 degrees)


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
