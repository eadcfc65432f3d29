"""The run every notebook shares: data -> task -> slice cache -> patient split.

Notebook 01 creates the run folder; notebooks 02-05 call :func:`prepare_run` with the
same parameters and get the same cache and ``split.json`` back (nothing is recomputed
when it is already there and fresh).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lib.common.atomic import write_json
from lib.common.paths import run_dir as resolve_run_dir
from lib.data.nifti import read_geometry
from lib.data.slices import (
    SliceConfig,
    SliceSet,
    build_cache,
    ct_window_from_data,
    load_slices,
    resampled_size,
    with_context,
)
from lib.data.source import resolve_task
from lib.data.splits import resolve_split
from lib.data.task import Task
from lib.seg.augment import lateral_pairs
from lib.seg.postprocess import piece_thresholds
from lib.seg.roi import Box, Locator, box_around, crop_cases


@dataclass
class Run:
    """A prepared dataset inside a run folder."""

    task: Task
    run_dir: Path
    cache_dir: Path
    split: dict[str, Any]
    slice_cfg: SliceConfig
    seed: int
    context: int = 0
    locator: Locator | None = None
    boxes: dict[str, Box] | None = None
    plan: dict[str, Any] | None = None  # the settings plan (lib.data.plan) the run was prepared with

    @property
    def labels(self) -> list[int]:
        """Foreground class ids."""
        return sorted(k for k in self.task.labels if k != 0)

    @property
    def dataset_name(self) -> str:
        """Short description for tables and the diary."""
        return f"{self.task.name} ({self.task.root.name}, {len(self.task.cases)} patients)"

    @property
    def in_channels(self) -> int:
        """Network input channels: the task's modalities times the slices fed per sample."""
        return self.task.channels * (2 * self.context + 1)

    def slices(self, split: str, context: int | None = None) -> SliceSet:
        """The network's input slices of the patients of one split ("train", "val" or "test"),
        with ``context`` neighbours on each side as channels (default: the run's). With a
        region of interest these are each patient's crop (see :meth:`use_locator`)."""
        slices = self.canvas_slices(split, context)
        if not self.slice_cfg.roi:
            return slices
        if self.boxes is None:
            raise RuntimeError("this run crops a region of interest: train or load its locator first "
                               "(lib.seg.workflow.train_locator)")
        return crop_cases(slices, self.boxes, self.slice_cfg.image_size)

    def canvas_slices(self, split: str, context: int | None = None) -> SliceSet:
        """The cached (whole, uncropped) slices of the patients of one split."""
        return with_context(load_slices(self.cache_dir, self.split[split]),
                            self.context if context is None else context)

    def use_locator(self, model: nn.Module, device: str | torch.device = "cpu") -> dict[str, Box]:
        """Set the region-of-interest stage: training patients are cropped around their
        labels, every other patient around what ``model`` finds (the canvas centre, with a
        message, where it finds nothing).

        Returns:
            The crop of every patient (top-left corner on the canvas).
        """
        size, train = self.slice_cfg.image_size, set(self.split["train"])
        self.locator = Locator(model, size, self.task.channels, self.context)
        centre = (self.slice_cfg.cached_size - size) // 2
        self.boxes = {}
        for case in self.task.cases:
            sl = with_context(load_slices(self.cache_dir, [case.case_id]), self.context)
            box = box_around(sl.masks, size) if case.case_id in train else self.locator.find(sl.images, device)
            if box is None:
                print(f"{case.case_id}: the region-of-interest stage found no structure; using the canvas centre")
            self.boxes[case.case_id] = box or (centre, centre)
        return self.boxes

    @property
    def mirror_pairs(self) -> list[tuple[int, int]]:
        """Label pairs that are mirror images (left/right organs): flips exchange them."""
        return list(lateral_pairs(self.task.labels))

    @cached_property
    def piece_thresholds(self) -> dict[int, float]:
        """Post-processing learned from the training patients: per label, the smallest piece a
        prediction keeps, as a fraction of its largest (:func:`lib.seg.postprocess.piece_thresholds`)."""
        masks = [load_slices(self.cache_dir, [cid]).masks.transpose(1, 2, 0) for cid in self.split["train"]]
        return piece_thresholds(masks, self.labels)

    def all_slices(self) -> SliceSet:
        """The cached slices of every patient of the task."""
        return load_slices(self.cache_dir, [c.case_id for c in self.task.cases])

    def data_settings(self, context: int | None = None) -> dict[str, Any]:
        """What a checkpoint must match to be used on this run's data: the slices, the
        classes and the patient split (a model trained on another split may have seen this
        run's test patients). ``context``: the context slices (default: the run's)."""
        context = self.context if context is None else context
        return {
            "task": self.task.root.name,
            "image_size": self.slice_cfg.image_size,
            "slice_key": self.slice_cfg.key(),
            "slice_config": asdict(self.slice_cfg),
            "is_ct": self.task.is_ct,
            "is_2d": self.task.is_2d,
            "pixel_spacing": self.task.pixel_spacing,
            "modalities": {str(k): v for k, v in self.task.modalities.items()},
            "in_channels": self.task.channels * (2 * context + 1),
            "context_slices": context,
            "num_classes": self.task.num_classes,
            "labels": {str(k): v for k, v in self.task.labels.items()},
            "split": {name: list(self.split[name]) for name in ("train", "val", "test")},
            "piece_thresholds": {str(k): v for k, v in self.piece_thresholds.items()},
            "mirror_pairs": [list(p) for p in self.mirror_pairs],
        }


def prepare_run(
    data: str = "demo",
    run_dir: str | Path | None = None,
    split_file: str | Path | None = None,
    image_size: int = 64,
    seed: int = 0,
    *,
    context: int = 0,
    spacing: float | str | None = None,
    roi: bool = False,
    ct_window: tuple[float, float] | None = None,
    workers: int = 2,
    progress: bool = True,
    plan: dict[str, Any] | None = None,
) -> Run:
    """Resolve the data, build (or reuse) the slice cache and the split, record run.json.

    Args:
        data: "demo", an MSD task name, an archive or a task folder.
        run_dir: run folder (None: ``$MSDSEG_RUN_DIR`` or ``runs/demo``).
        split_file: optional JSON with train/val/test patient lists.
        image_size: side of the square slices.
        seed: seed of the patient split.
        context: neighbouring slices on each side fed to segmentation networks as extra
            channels (2.5D; 0: single slices). Generative models use single slices.
        spacing: in-plane spacing (mm) every scan is resampled to; "median": the task's
            median (as nnU-Net); None: whole slices resized to ``image_size``.
        roi: the networks see ``image_size`` crops around the structure (:mod:`lib.seg.roi`) of
            a canvas that holds every scan's whole field of view.
        ct_window: CT only, the (low, high) HU window; None: from the training patients'
            labelled voxels (:func:`lib.data.slices.ct_window_from_data`).
        plan: the settings plan (:meth:`lib.data.plan.Plan.to_dict`) the parameters came from;
            recorded in run.json and carried by every checkpoint trained on the run.

    A folder of 2D images keeps each image's aspect ratio (scaled to ``image_size`` on its
    longer side and padded), and has no spacing, region of interest or context slices.
    """
    out = resolve_run_dir(run_dir)
    task = resolve_task(data)
    split = resolve_split(out, [c.case_id for c in task.cases], seed, split_file)
    if task.is_2d and context:
        print(f"{task.root.name}: 2D images have no neighbouring slices; context_slices={context} -> 0")
        context = 0
    if task.is_ct and ct_window is None:
        ct_window = ct_window_from_data(task, split["train"], out / "cache" / "ct_window.json")
    cfg = slice_config(task, image_size, spacing, roi, ct_window)
    cache_dir = build_cache(task, out / "cache", cfg, workers=workers, progress=progress)
    run = Run(task, out, cache_dir, split, cfg, seed, context, plan=plan)
    write_json(out / "run.json", {"data": str(data), "task_dir": str(task.root), "slice_config": asdict(cfg),
                                  "cache_dir": str(cache_dir), **run.data_settings(),
                                  **({"plan": plan} if plan else {})})
    return run


def slice_config(task: Task, image_size: int, spacing: float | str | None = None, roi: bool = False,
                 ct_window: tuple[float, float] | None = None) -> SliceConfig:
    """The slice settings for ``task``, with "median" spacing and the ROI canvas (the largest
    field of view at that spacing, in multiples of 32 pixels) read from the image headers."""
    if ct_window is not None:
        lo, hi = (float(v) for v in ct_window)
        if not lo < hi:
            raise ValueError(f"ct_window {ct_window!r}: give (low, high) HU with low < high")
        return replace(slice_config(task, image_size, spacing, roi), ct_window=(lo, hi))
    if task.is_2d:
        if spacing is not None or roi:
            print(f"{task.root.name}: 2D images are scaled to {image_size} px on their longer side "
                  "(aspect ratio kept); spacing and roi do not apply")
        return SliceConfig(image_size=image_size, fit=True)
    if spacing is None:
        return SliceConfig(image_size=image_size, roi=roi)
    geometry = [read_geometry(case.image) for case in task.cases]
    if spacing == "median":
        spacing = round(float(np.median([min(zooms[:2]) for _, zooms in geometry])), 4)
    elif isinstance(spacing, str):
        raise ValueError(f"spacing={spacing!r}: give a number of mm, 'median' or None")
    cfg = SliceConfig(image_size=image_size, spacing=float(spacing))
    if not roi:
        return cfg
    canvas = 32 * math.ceil(max(max(resampled_size(shape[:2], zooms[:2], cfg)) for shape, zooms in geometry) / 32)
    if canvas <= image_size:  # every scan fits in one crop: no region of interest to find
        print(f"every scan fits in {canvas} px at {spacing} mm: whole slices at {canvas} px, no region of interest")
        return SliceConfig(image_size=canvas, spacing=float(spacing))
    return SliceConfig(image_size=image_size, spacing=float(spacing), roi=True, canvas=canvas)
