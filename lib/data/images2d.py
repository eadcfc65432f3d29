"""2D image folders (for example chest X-rays as PNG): ``images/`` and ``masks/`` with the same stems.

A folder becomes a :class:`lib.data.task.Task` whose cases are single images ("each image is its own
patient"), so the rest of the pipeline (slices, split, training, evaluation) is unchanged: an
image is read as a one-slice volume (C, X, Y, 1) in the same axis convention as NIfTI
(x: column, y: upwards), which the figures rotate back to the usual view.

* Images: PNG, JPG or TIFF; grey or RGB (the folder has 3 channels when any image is in
  colour; grey images are then repeated), any size.
* Masks: binary (0/255 or 0/1, read as class 1) or class indices (0..K), same size as the image.
* An optional ``dataset.json`` may name the folder and its labels and give ``pixel_spacing``
  (mm), which makes HD95 and areas millimetres instead of pixels.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from lib.common.atomic import atomic_path
from lib.data.task import (
    Case,
    MSDDataError,
    Task,
    Volume,
    check_finite,
    id_names,
    read_dataset_json,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
COLOUR_MODES = ("RGB", "RGBA", "P", "CMYK", "YCbCr", "LA")
MAX_CLASSES = 32  # a mask with more distinct values is not a class-index mask


def is_image_file(path: str | Path) -> bool:
    """True for a 2D image file this module reads (by suffix)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def is_image_folder(root: str | Path) -> bool:
    """True for a folder holding ``images/`` and ``masks/`` (a 2D dataset)."""
    root = Path(root)
    return (root / "images").is_dir() and (root / "masks").is_dir()


def image_files(folder: str | Path) -> list[Path]:
    """The 2D image files directly inside ``folder``, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and is_image_file(p) and not p.name.startswith("."))


def by_stem(files: list[Path], problems: list[str]) -> dict[str, Path]:
    """``files`` by name stem (the case id); each stem that two files share (``a.png`` and
    ``a.jpg``) is added to ``problems`` naming both files."""
    found: dict[str, Path] = {}
    for path in files:
        if path.stem in found:
            problems.append(f"{path} and {found[path.stem]} share the name {path.stem!r} "
                            "(one file per case: keep one of them)")
        else:
            found[path.stem] = path
    return found


def _open(path: Path) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise MSDDataError(f"{path}: cannot read image ({type(err).__name__}: {err})") from err
    return img


def _mode(path: Path) -> str:
    try:
        with Image.open(path) as img:
            return img.mode
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise MSDDataError(f"{path}: cannot read image ({type(err).__name__}: {err})") from err


def to_volume_axes(array: np.ndarray) -> np.ndarray:
    """(H, W, ...) image rows/columns -> (X, Y, ...) volume axes (x: column, y: upwards)."""
    return np.swapaxes(array[::-1], 0, 1)


def from_volume_axes(array: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_volume_axes`."""
    return np.swapaxes(array, 0, 1)[::-1]


def read_image(path: str | Path, channels: int | None = None) -> np.ndarray:
    """A 2D image as float32 (C, X, Y, 1).

    Args:
        channels: 1 (colour images are converted to luminance), 3 (grey images are
            repeated) or None (as stored: 3 for colour, 1 for grey).
    """
    path = Path(path)
    img = _open(path)
    colour = img.mode in COLOUR_MODES
    if channels is None:
        channels = 3 if colour else 1
    if colour:
        img = img.convert("RGB" if channels == 3 else "L")
    array = np.asarray(img, dtype=np.float32)
    if array.ndim == 2:
        array = np.repeat(array[..., None], channels, axis=-1)
    if array.shape[-1] != channels:
        raise MSDDataError(f"{path}: {array.shape[-1]} channels, expected {channels}")
    return check_finite(np.ascontiguousarray(np.moveaxis(to_volume_axes(array), -1, 0)[..., None]), path)


def mask_values(path: Path, values: np.ndarray) -> np.ndarray:
    """Map a mask's stored values to class ids: {0, 255} or {0, 1} -> {0, 1}; class indices kept.

    Raises:
        MSDDataError: values that are neither binary nor small class indices.
    """
    uniq = set(np.unique(values).tolist())
    if uniq <= {0, 255}:
        return (values == 255).astype(np.uint8)
    if all(float(v).is_integer() and 0 <= v < MAX_CLASSES for v in uniq):
        return values.astype(np.uint8)
    shown = sorted(uniq)[:8]
    raise MSDDataError(
        f"{path}: mask values {shown}{' ...' if len(uniq) > 8 else ''} are neither binary (0/255 or 0/1) "
        f"nor class indices (0..{MAX_CLASSES - 1})")


def read_mask(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """A 2D mask as uint8 class ids (X, Y, 1).

    Args:
        size: the image's (width, height); a mask of another size is refused.
    """
    path = Path(path)
    img = _open(path)
    if size is not None and img.size != tuple(size):
        raise MSDDataError(f"{path}: mask size {img.size[0]}x{img.size[1]} differs from its image's "
                           f"{size[0]}x{size[1]}")
    array = np.asarray(img)
    if array.ndim == 3:  # a mask saved in colour: usable only when its channels agree
        if not (array[..., :3] == array[..., :1]).all():
            raise MSDDataError(f"{path}: colour mask (its channels differ); save it as grey class indices")
        array = array[..., 0]
    return to_volume_axes(mask_values(path, array))[..., None]


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image from its header."""
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise MSDDataError(f"{path}: cannot read image ({type(err).__name__}: {err})") from err


def write_mask(mask: np.ndarray, path: str | Path, num_classes: int) -> Path:
    """Write a (X, Y) or (X, Y, 1) class-id mask as PNG at its own size, atomically:
    0/255 for one foreground class, class indices otherwise."""
    mask = np.asarray(mask)
    mask = mask[..., 0] if mask.ndim == 3 else mask
    pixels = from_volume_axes(mask).astype(np.uint8)
    if num_classes <= 2:
        pixels = pixels * 255
    with atomic_path(path, suffix=Path(path).suffix) as tmp:
        Image.fromarray(np.ascontiguousarray(pixels), mode="L").save(tmp, format="PNG")
    return Path(path)


def load_image_case(task: Task, case: Case) -> Volume:
    """One image and its mask as a one-slice :class:`lib.data.task.Volume` (spacing: the folder's
    ``pixel_spacing``, else 1 pixel)."""
    image = read_image(case.image, task.channels)
    label = read_mask(case.label, image_size(case.image))
    s = float(task.pixel_spacing or 1.0)
    return Volume(case.case_id, image, label, (s, s, 1.0), np.diag([s, s, 1.0, 1.0]))


def read_image_folder(root: str | Path) -> Task:
    """Read and check a 2D image folder (``images/``, ``masks/``, optional ``dataset.json``).

    Raises:
        MSDDataError: naming every image without a mask, every two images (or masks) with one
            name stem, every unreadable file and every mask of the wrong size or with values
            that are not class ids; an empty folder; a malformed dataset.json field.
    """
    root = Path(root)
    images, masks = root / "images", root / "masks"
    files = image_files(images)
    if not files:
        raise MSDDataError(f"{images}: no images ({', '.join(IMAGE_SUFFIXES)})")
    meta_path = root / "dataset.json"
    meta = read_dataset_json(meta_path) if meta_path.is_file() else {}
    modalities, labels = (id_names(meta, key, meta_path) for key in ("modality", "labels"))
    problems, cases, values = [], [], set()
    mask_by_stem = by_stem(image_files(masks), problems)
    for path in by_stem(files, problems).values():
        mask = mask_by_stem.get(path.stem)
        if mask is None:
            problems.append(f"{path}: image without a mask (expected {masks / path.stem}.png)")
            continue
        try:
            label = read_mask(mask, image_size(path))
        except MSDDataError as err:
            problems.append(str(err))
            continue
        values.update(np.unique(label).tolist())
        cases.append(Case(path.stem, path.resolve(), mask.resolve()))
    if problems:
        raise MSDDataError(f"{root}: {len(problems)} problem(s) in the image folder:\n  " + "\n  ".join(problems))
    colour = any(_mode(c.image) in COLOUR_MODES for c in cases)
    modalities = modalities or (
        {0: "red", 1: "green", 2: "blue"} if colour else {0: "grey"})
    labels = labels or (
        {0: "background", 1: "foreground"} if max(values) <= 1
        else {k: ("background" if k == 0 else f"class {k}") for k in range(max(values) + 1)})
    undeclared = sorted(values - set(labels))
    if undeclared:
        raise MSDDataError(f"{meta_path}: masks hold classes {undeclared} that 'labels' does not declare")
    if len(modalities) not in (1, 3):
        raise MSDDataError(f"{meta_path}: 'modality' must list 1 (grey) or 3 (RGB) channels")
    spacing = meta.get("pixel_spacing")
    if spacing is not None and (isinstance(spacing, bool) or not (isinstance(spacing, int | float) and spacing > 0)):
        raise MSDDataError(f"{meta_path}: 'pixel_spacing' must be a positive number of mm")
    if len(files) < 3:
        warnings.warn(f"{root}: only {len(files)} images; a train/validation/test split needs at least 3", stacklevel=2)
    return Task(root, str(meta.get("name", root.name)), modalities, labels, cases, pixel_spacing=spacing)
