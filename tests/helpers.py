"""Small MSD tasks written on the fly for tests."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def blob_case(rng: np.random.Generator, shape=(32, 32, 12), classes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """A bright ellipse (label 1, and a half of it label 2 if classes == 3) in noise."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    cx, cy = rng.uniform(-0.2, 0.2, 2)
    r = rng.uniform(0.3, 0.5)
    label = (((x - cx) ** 2 + (y - cy) ** 2) < r**2) & (np.abs(z) < 0.6)
    lab = label.astype(np.uint8)
    if classes == 3:
        lab[label & (x > cx)] = 2
    image = (rng.normal(100, 20, shape) + 300 * label).astype(np.int16)
    return image, lab


def write_task(root: Path, cases: dict[str, tuple[np.ndarray, np.ndarray]], *, labels=None, modality=None,
               spacing=(1.5, 1.5, 3.0)) -> Path:
    """Write an MSD task folder (dataset.json, imagesTr, labelsTr) and return it."""
    labels = labels or {"0": "background", "1": "structure"}
    modality = modality or {"0": "MRI"}
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    affine = np.diag([*spacing, 1.0])
    training = []
    for cid, (image, label) in cases.items():
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / f"{cid}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"{cid}.nii.gz")
        training.append({"image": f"./imagesTr/{cid}.nii.gz", "label": f"./labelsTr/{cid}.nii.gz"})
    meta = {"name": "TestTask", "modality": modality, "labels": labels, "numTraining": len(cases), "training": training}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def make_task(root: Path, n: int = 5, *, seed: int = 0, shape=(32, 32, 12), classes: int = 2) -> Path:
    """A small binary (or 3-class) task of ``n`` blob patients."""
    rng = np.random.default_rng(seed)
    labels = {"0": "background", "1": "a"} | ({"2": "b"} if classes == 3 else {})
    return write_task(root, {f"p{i:02d}": blob_case(rng, shape, classes) for i in range(n)}, labels=labels)


def make_discs(n: int, size: int, seed: int = 0, margin: float = 8, radius: tuple[float, float] = (3, 7)
               ) -> tuple[np.ndarray, np.ndarray]:
    """Noisy slices (N, 1, size, size) with bright discs (class 1); every third slice is empty."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images = rng.normal(0, 0.3, (n, 1, size, size)).astype(np.float32)
    masks = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        if i % 3 == 0:
            continue
        cy, cx = rng.uniform(margin, size - margin, 2)
        r = rng.uniform(*radius)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
        masks[i][disc] = 1
        images[i, 0][disc] += 3.0
    return images, masks


def exit_once(marker: str, fn, **kwargs):
    """``fn(**kwargs)``, except on the first call for ``marker`` (a file path), where the process
    dies at once, as a worker killed in the middle of its job."""
    import os

    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(3)
    return fn(**kwargs)
