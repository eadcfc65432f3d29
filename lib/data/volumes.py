"""One patient's volume and label, whatever the format: NIfTI (:mod:`lib.data.nifti`) or a 2D image
(:mod:`lib.data.images2d`).

The two readers know nothing of each other; this module picks the one a case needs, so data
flows one way: task folder -> reader -> volume -> slices.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lib.data.images2d import load_image_case, read_mask
from lib.data.nifti import load_nifti_case, read_nifti_label
from lib.data.task import Case, Task, Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def load_volume(task: Task, case: Case) -> Volume:
    """One case in canonical orientation, its geometry and label values checked (a 2D image
    folder's case as a one-slice volume).

    Raises:
        MSDDataError: unreadable files, image and label on different grids, undeclared labels.
    """
    return load_image_case(task, case) if task.is_2d else load_nifti_case(task, case)


def read_label(path: str | Path) -> np.ndarray:
    """A label file as uint8 class ids: (X, Y, Z) in canonical orientation, a 2D mask (X, Y, 1)."""
    return read_nifti_label(path) if str(path).endswith(NIFTI_SUFFIXES) else read_mask(path)
