"""Segment new, unlabelled scans with a trained checkpoint, in the manner of nnU-Net's predict
command::

    msdseg-predict runs/heart/unet/best.pt Task02_Heart/imagesTs predictions/ [--tta | --no-tta] [--overwrite]

Inputs: a NIfTI file, a folder of NIfTI files (an MSD ``imagesTs``), an MSD task folder (its
``imagesTs``), or 2D images (a folder of PNG/JPG/TIFF files, or an image folder's ``images/``).
The checkpoint carries every preprocessing setting (normalisation, size, context slices,
target spacing, region of interest, post-processing) and the settings plan it was trained with
(:mod:`lib.data.plan`: flip TTA when the plan chose it, unless ``--tta``/``--no-tta`` says
otherwise), so nothing else is needed. Every mask is
written in its input's own geometry: NIfTI with the scan's shape, voxel order and affine
(scans are segmented in canonical orientation, as in training), PNG at the image's size.
A bad file is reported in the table and the others are still written.

Nothing is written, and no output folder is left behind, when the inputs or the output folder
are refused or the checkpoint cannot be used. The output folder may not be, or lie inside, an
input folder, and a mask never replaces an input scan. The masks written are listed in the output
folder's ``.msdseg-predict.json``; ``overwrite`` replaces those masks only, never another file.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from lib.common.atomic import atomic_path, read_json, write_json
from lib.data.images2d import is_image_file, is_image_folder, read_image, write_mask
from lib.data.nifti import channels_first, from_canonical, load_nifti, to_canonical
from lib.data.task import MSDDataError, case_id_from_path
from lib.seg.checkpoint import CheckpointError, first_line
from lib.seg.inference import load_predictor, segment_image
from lib.seg.roi import Locator

NIFTI = (".nii.gz", ".nii")
CT_AIR_HU = -200.0  # a CT scan in HU holds air far below this
MANIFEST = ".msdseg-predict.json"  # in the output folder: the masks msdseg-predict wrote there
DATA_KEYS = ("in_channels", "context_slices", "num_classes", "is_ct", "slice_config")  # needed to segment
EXIT_CODES = """exit status:
  0  every scan segmented
  1  some scans failed (listed as FAILED lines on stderr); the others were written
  2  bad arguments, input or output folder: nothing to segment, the output folder is or lies in
     an input folder, a mask would replace an input scan or a file msdseg-predict did not write,
     two inputs would give the same mask (nothing written)
  3  unusable checkpoint: missing, unreadable, unsafe (not weights-only), foreign or malformed
     (nothing written)
"""


class OutputError(ValueError):
    """Inputs and output folder that would overwrite or mix up files: the output folder is, or
    lies inside, an input folder; a mask would replace an input scan or a file msdseg-predict
    did not write; two inputs would give the same mask."""


@dataclass
class Predictor:
    """A checkpoint ready to segment: its model, region-of-interest stage and data settings."""

    model: nn.Module
    locator: Locator | None
    data: dict[str, Any]
    source: str
    device: torch.device
    plan: dict[str, Any] | None = None

    @classmethod
    def load(cls, checkpoint: str | Path, device: str | torch.device = "cpu") -> Predictor:
        """Load a segmentation checkpoint saved by training (``best.pt``).

        Raises:
            CheckpointError: a missing, unreadable, unsafe, foreign or malformed checkpoint,
                in one line naming the file.
        """
        device = torch.device(device)
        try:
            model, locator, meta = load_predictor(checkpoint, device)
        except FileNotFoundError as err:
            raise CheckpointError(str(err)) from err
        except (KeyError, TypeError, RuntimeError) as err:  # e.g. a malformed region-of-interest stage
            raise CheckpointError(f"{checkpoint}: cannot be loaded ({type(err).__name__}: {first_line(err)})") from err
        missing = [key for key in DATA_KEYS if key not in meta["data"]]
        if missing:
            raise CheckpointError(f"{checkpoint}: malformed checkpoint, its data settings lack {', '.join(missing)}")
        return cls(model, locator, meta["data"], str(checkpoint), device, meta.get("plan"))

    @property
    def channels(self) -> int:
        """Image channels (modalities) the model expects per slice."""
        return self.data["in_channels"] // (2 * self.data["context_slices"] + 1)

    @property
    def num_classes(self) -> int:
        return int(self.data["num_classes"])

    @property
    def tta(self) -> bool:
        """Flip test-time augmentation as the checkpoint's plan chose it (False without a plan)."""
        return bool(self.plan and self.plan["fields"].get("tta", {}).get("value"))

    def describe(self) -> str:
        """One line: the settings the scans are segmented with, and where they come from."""
        cfg = self.data["slice_config"]
        where = (f"the {self.plan.get('preset')} plan of {self.plan.get('folder')}" if self.plan
                 else "the checkpoint (no plan recorded)")
        spacing = f"{cfg.get('spacing'):g} mm" if cfg.get("spacing") else "no target spacing"
        return (f"settings from {where}: {cfg.get('image_size')} px, {spacing}, "
                f"{'a locator, ' if self.locator else ''}{self.data['context_slices']} context slice(s), "
                f"{'CT window' if self.data['is_ct'] else 'z-score'}, TTA {'on' if self.tta else 'off'} in the plan")


def is_nifti(path: str | Path) -> bool:
    return str(path).endswith(NIFTI)


def find_inputs(path: str | Path | list[str | Path]) -> list[Path]:
    """The scans to segment under ``path`` (see the module docstring), sorted by name; a list
    of files is taken as it is.

    Raises:
        MSDDataError: a path that does not exist, or a folder with nothing to segment.
    """
    if isinstance(path, list | tuple):
        if not path:
            raise MSDDataError("no scans given to segment (empty list)")
        return [f for p in path for f in find_inputs(p)]
    path = Path(path)
    if path.is_file():
        if not (is_nifti(path) or is_image_file(path)):
            raise MSDDataError(f"{path}: not a NIfTI (.nii, .nii.gz) or image (PNG, JPG, TIFF) file")
        return [path]
    if not path.is_dir():
        raise MSDDataError(f"{path}: no such file or folder")
    for sub in ("imagesTs", "images"):
        if (path / sub).is_dir() and (sub == "imagesTs" or is_image_folder(path)):
            path = path / sub
            break
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                   and (is_nifti(p) or is_image_file(p)))
    if not files:
        raise MSDDataError(f"{path}: no NIfTI or image files to segment (empty input folder)")
    return files


def output_path(scan: Path, out_dir: Path) -> Path:
    """Where a scan's mask goes: same name for NIfTI, ``<stem>.png`` for 2D images."""
    return out_dir / (scan.name if is_nifti(scan) else f"{scan.stem}.png")


def _check_modality(predictor: Predictor, scan: Path, image: np.ndarray) -> None:
    name = "2D images" if predictor.data.get("is_2d") else "NIfTI volumes"
    if bool(predictor.data.get("is_2d")) != is_image_file(scan):
        raise MSDDataError(f"{scan}: {'a 2D image' if is_image_file(scan) else 'a NIfTI volume'}, "
                           f"but {predictor.source} was trained on {name}")
    if image.shape[0] != predictor.channels:
        raise MSDDataError(f"{scan}: {image.shape[0]} channel(s), but {predictor.source} was trained on "
                           f"{predictor.channels} ({', '.join(predictor.data.get('modalities', {}).values())})")
    if predictor.data.get("is_ct") and float(image.min()) > CT_AIR_HU:
        raise MSDDataError(f"{scan}: lowest value {float(image.min()):.0f}, but {predictor.source} was trained on "
                           f"CT in HU (air is about -1000): another modality, or CT not stored in HU")


def predict_scan(predictor: Predictor, scan: str | Path, out_dir: str | Path, *, tta: bool = False,
                 largest_component: bool | None = None) -> dict[str, Any]:
    """Segment one scan and write its mask in the scan's geometry (``largest_component``: as
    :func:`lib.seg.inference.segment_image`; None: the checkpoint's one-piece classes).

    Returns:
        A table row: case, shape, spacing, foreground voxels and volume (mL) or area
        (pixels, or mm² with a pixel spacing) per class, output path.
    """
    scan, out_dir = Path(scan), Path(out_dir)
    out = output_path(scan, out_dir)
    if is_image_file(scan):
        channels = predictor.channels
        image = read_image(scan, None)
        if image.shape[0] == 3 and channels == 1 and np.ptp(image, axis=0).max() == 0:
            image = image[:1]  # colour-coded grey
        elif image.shape[0] == 1 and channels == 3:
            image = np.repeat(image, 3, axis=0)
        _check_modality(predictor, scan, image)
        s = float(predictor.data.get("pixel_spacing") or 1.0)
        spacing = (s, s, 1.0)
        mask = segment_image(predictor.model, predictor.locator, predictor.data, image, spacing,
                             device=predictor.device, tta=tta, largest_component=largest_component, case=scan.name)
        write_mask(mask, out, predictor.num_classes)
        unit, scale = ("area_mm2", s * s) if predictor.data.get("pixel_spacing") else ("area_px", 1.0)
    else:
        original = load_nifti(scan)
        canonical = to_canonical(original)
        image = channels_first(canonical, scan)
        _check_modality(predictor, scan, image)
        spacing = tuple(float(v) for v in canonical.header.get_zooms()[:3])
        mask = segment_image(predictor.model, predictor.locator, predictor.data, image, spacing,
                             device=predictor.device, tta=tta, largest_component=largest_component, case=scan.name)
        written = nib.Nifti1Image(from_canonical(mask, original.affine), original.affine)
        written.header.set_zooms(original.header.get_zooms()[:3])
        with atomic_path(out, suffix=".nii.gz" if out.name.endswith(".gz") else ".nii") as tmp:
            nib.save(written, tmp)
        unit, scale = "volume_ml", float(np.prod(spacing)) / 1000.0
    row: dict[str, Any] = {"case": case_id_from_path(scan), "shape": "x".join(map(str, mask.shape[:2] if
                           mask.shape[-1] == 1 else mask.shape)), "spacing_mm": "x".join(f"{v:.3g}" for v in spacing)}
    labels = {int(k): v for k, v in predictor.data.get("labels", {}).items() if int(k) != 0}
    for label, name in labels.items():
        row[f"{name} {unit}"] = round(float(np.count_nonzero(mask == label)) * scale, 2)
    return row | {"output": str(out), "error": ""}


def _some(names: list[str], shown: int = 3) -> str:
    """``a, b, c and 4 more``."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _check_distinct(scans: list[Path], outputs: list[Path]) -> None:
    """OutputError naming the inputs that would give the same case (mask and table row), such
    as ``a.png`` and ``a.jpg`` (both ``a.png``) or ``a.nii`` and ``a.nii.gz``."""
    cases: dict[str, list[int]] = {}
    for i, scan in enumerate(scans):
        cases.setdefault(case_id_from_path(scan), []).append(i)
    clashes = [f"{' and '.join(str(scans[i]) for i in group)} are {'both' if len(group) == 2 else 'all'} case {case!r} "
               f"(mask {', '.join(sorted({outputs[i].name for i in group}))})"
               for case, group in cases.items() if len(group) > 1]
    if clashes:
        raise OutputError(f"inputs whose masks would collide: {'; '.join(clashes)}; rename them or segment them "
                          "into separate folders (nothing written)")


def _check_folder(inputs: str | Path | list[str | Path], out_dir: Path) -> None:
    """OutputError if ``out_dir`` is a file, or is or lies inside a folder given as input."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: output is a file, not a folder (nothing written)")
    out = out_dir.resolve()
    for given in inputs if isinstance(inputs, list | tuple) else [inputs]:
        folder = Path(given).resolve()
        if Path(given).is_dir() and out.is_relative_to(folder):
            where = "is" if out == folder else "lies inside"
            raise OutputError(f"{out_dir}: the output folder {where} the input folder {given}; write the masks to "
                              "another folder (nothing written)")


def _file_id(path: Path) -> tuple[int, int]:
    """Device and inode: equal for the same file under any name (as :func:`os.path.samefile`)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _read_manifest(out_dir: Path) -> dict[str, str]:
    """The masks an earlier run wrote into ``out_dir`` and still there: name -> checkpoint."""
    path = out_dir / MANIFEST
    if not path.is_file():
        return {}
    try:
        manifest = read_json(path)
    except ValueError as err:  # not valid JSON
        raise OutputError(f"{err}; move it away (nothing written)") from err
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise OutputError(f"{path}: not a list of masks written by msdseg-predict; move it away (nothing written)")
    return {name: str(source) for name, source in files.items() if (out_dir / name).is_file()}


def _check_outputs(scans: list[Path], outputs: list[Path], out_dir: Path, overwrite: bool) -> dict[str, str]:
    """The masks msdseg-predict wrote into ``out_dir`` before (see :func:`_read_manifest`),
    after checking that writing ``outputs`` replaces no other file.

    Raises:
        OutputError: a mask would replace an input scan or a file msdseg-predict did not write;
            an unreadable manifest.
        FileExistsError: masks msdseg-predict wrote are in the way and ``overwrite`` is False.
    """
    written = _read_manifest(out_dir)
    inputs = {_file_id(scan) for scan in scans}
    blocking, previous = [], []
    for out in (out for out in outputs if out.exists()):
        if _file_id(out) in inputs:
            blocking.append(f"{out.name} (one of the input scans)")
        elif out.name not in written:
            blocking.append(f"{out.name} (a {'folder' if out.is_dir() else 'file'} that msdseg-predict did not write)")
        else:
            previous.append(out.name)
    if blocking:
        raise OutputError(f"{out_dir}: {len(blocking)} file(s) are where masks would go: {_some(blocking)}; "
                          f"--overwrite only replaces masks that msdseg-predict wrote there (listed in {MANIFEST}): "
                          "move them or choose another output folder (nothing written)")
    if previous and not overwrite:
        raise FileExistsError(f"{out_dir}: already holds {len(previous)} mask(s) that msdseg-predict wrote for these "
                              f"scans ({_some(previous)}); pass overwrite=True (--overwrite) to replace them, or "
                              "choose another folder (nothing written)")
    return written


def _make_folder(out_dir: Path) -> Path | None:
    """Create ``out_dir``; the topmost folder this created (None: it existed)."""
    missing = [folder for folder in (out_dir, *out_dir.parents) if not folder.exists()]
    out_dir.mkdir(parents=True, exist_ok=True)
    return missing[-1] if missing else None


def _remove_if_empty(out_dir: Path, created: Path | None) -> None:
    """Remove ``out_dir`` and its parents up to ``created`` (the folders this run made) while empty."""
    if created is None:
        return
    for folder in (out_dir, *out_dir.parents):
        if any(folder.iterdir()):
            return
        folder.rmdir()
        if folder == created:
            return


def _scan_error(err: Exception, scan: Path) -> str:
    """One line naming ``scan``."""
    line = first_line(err)
    return line if str(scan) in line else f"{scan}: {line}"


def predict(checkpoint: str | Path, inputs: str | Path | list[str | Path], out_dir: str | Path, *,
            overwrite: bool = False, tta: bool | None = None, largest_component: bool | None = None,
            device: str | torch.device = "cpu", progress: bool = True) -> pd.DataFrame:
    """Segment every scan under ``inputs`` (see :func:`find_inputs`) into ``out_dir``.

    A scan that cannot be segmented (unreadable, NaN voxels, other channels or modality than
    the checkpoint's) gets its error in the table and the others are still written. Each mask
    written is listed in ``out_dir``'s ``.msdseg-predict.json`` with its checkpoint. Inputs,
    output folder and checkpoint are checked before anything is written; a run that writes
    nothing leaves no new folder behind. ``tta``: flip test-time augmentation; None: as the
    checkpoint's plan chose (off without a plan).

    Returns:
        One row per scan (see :func:`predict_scan`); ``error`` is empty where it worked.

    Raises:
        MSDDataError: no scans found.
        OutputError: ``out_dir`` is or lies inside an input folder, a mask would replace an
            input scan or a file msdseg-predict did not write, or two inputs give the same mask.
        FileExistsError: ``out_dir`` already holds masks msdseg-predict wrote for these scans
            and ``overwrite`` is False.
        CheckpointError: the checkpoint cannot be used (see :meth:`Predictor.load`).
    """
    scans, out_dir = find_inputs(inputs), Path(out_dir)
    outputs = [output_path(scan, out_dir) for scan in scans]
    _check_distinct(scans, outputs)
    _check_folder(inputs, out_dir)
    written = _check_outputs(scans, outputs, out_dir, overwrite)
    predictor = Predictor.load(checkpoint, device)
    tta = predictor.tta if tta is None else tta
    if progress:
        print(predictor.describe() + ("" if tta == predictor.tta else f"; TTA {'on' if tta else 'off'} as asked"))
    source = str(Path(checkpoint).resolve())
    created = _make_folder(out_dir)
    rows = []
    try:
        for scan, out in tqdm(list(zip(scans, outputs)), desc="predict", disable=not progress):
            try:
                rows.append(predict_scan(predictor, scan, out_dir, tta=tta, largest_component=largest_component))
            except (ValueError, OSError, RuntimeError) as err:  # MSDDataError is a ValueError
                rows.append({"case": case_id_from_path(scan), "output": "", "error": _scan_error(err, scan)})
                continue
            written[out.name] = source
            write_json(out_dir / MANIFEST, {"written_by": "msdseg-predict", "files": dict(sorted(written.items()))})
    finally:
        _remove_if_empty(out_dir, created)
    table = pd.DataFrame(rows).set_index("case")
    return table.assign(output=table["output"].fillna(""), error=table["error"].fillna(""))


def read_mask_file(path: str | Path) -> np.ndarray:
    """A written mask as stored: NIfTI voxels, or PNG pixels."""
    return np.asarray(load_nifti(path).dataobj) if is_nifti(path) else np.asarray(Image.open(path))


def compare_masks(found: str | Path, reference: str | Path) -> pd.DataFrame:
    """Per mask of ``found``: the share of voxels equal to the same-named mask in ``reference``
    (for example new-scan predictions against those the evaluation wrote)."""
    rows = {}
    for path in sorted(p for p in Path(found).iterdir() if is_nifti(p) or is_image_file(p)):
        a, b = read_mask_file(path), read_mask_file(Path(reference) / path.name)
        rows[case_id_from_path(path)] = {"same_shape": a.shape == b.shape,
                                         "equal_voxels": float(np.mean(a == b)) if a.shape == b.shape else 0.0}
    return pd.DataFrame.from_dict(rows, orient="index")


def main(argv: list[str] | None = None) -> int:
    """Command line: segment a folder (or file) of unlabelled scans; exit status as in
    :data:`EXIT_CODES`."""
    parser = argparse.ArgumentParser(prog="msdseg-predict", description=__doc__.split("\n\n")[0],
                                     epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="trained checkpoint (best.pt of notebooks 02-04)")
    parser.add_argument("input", help="NIfTI file, folder of NIfTI files, MSD task folder, or folder of 2D images")
    parser.add_argument("output", help="folder for the masks (not inside the input folder)")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="flip test-time augmentation on or off (default: as the checkpoint's plan chose)")
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace masks an earlier run wrote into the output folder (listed in its {MANIFEST}); "
                             "never input scans or other files")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        table = predict(args.checkpoint, args.input, args.output, overwrite=args.overwrite, tta=args.tta,
                        device=args.device)
    except CheckpointError as err:
        print(f"msdseg-predict: {err}", file=sys.stderr)
        return 3
    except (MSDDataError, OutputError, OSError) as err:  # FileExistsError is an OSError
        print(f"msdseg-predict: {err}", file=sys.stderr)
        return 2
    failed = table[table["error"] != ""]
    with pd.option_context("display.max_colwidth", 60, "display.width", 200):
        print(table.drop(columns=["error"]).to_string())
    for case, row in failed.iterrows():
        print(f"FAILED {case}: {row['error']}", file=sys.stderr)
    print(f"{len(table) - len(failed)} of {len(table)} scans segmented into {args.output}")
    return 1 if len(failed) else 0


if __name__ == "__main__":
    sys.exit(main())
