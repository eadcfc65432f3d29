"""The run every notebook shares: data -> task -> slice cache -> patient split.

Notebook 01 creates the run folder; notebooks 02-05 call :func:`prepare_run` with the
same parameters and get the same cache and ``split.json`` back (nothing is recomputed
when it is already there and fresh).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lib.atomic import write_json
from lib.data_source import resolve_task
from lib.msd import Task
from lib.paths import run_dir as resolve_run_dir
from lib.slices import SliceConfig, SliceSet, build_cache, load_slices, with_context
from lib.splits import resolve_split


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
        """The cached slices of the patients of one split ("train", "val" or "test"), with
        ``context`` neighbours on each side as channels (default: the run's)."""
        return with_context(load_slices(self.cache_dir, self.split[split]),
                            self.context if context is None else context)

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
            "in_channels": self.task.channels * (2 * context + 1),
            "context_slices": context,
            "num_classes": self.task.num_classes,
            "labels": {str(k): v for k, v in self.task.labels.items()},
            "split": {name: list(self.split[name]) for name in ("train", "val", "test")},
        }


def prepare_run(
    data: str = "demo",
    run_dir: str | Path | None = None,
    split_file: str | Path | None = None,
    image_size: int = 64,
    seed: int = 0,
    *,
    context: int = 0,
    workers: int = 2,
    progress: bool = True,
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
    """
    out = resolve_run_dir(run_dir)
    task = resolve_task(data)
    cfg = SliceConfig(image_size=image_size)
    cache_dir = build_cache(task, out / "cache", cfg, workers=workers, progress=progress)
    split = resolve_split(out, [c.case_id for c in task.cases], seed, split_file)
    run = Run(task, out, cache_dir, split, cfg, seed, context)
    write_json(out / "run.json", {"data": str(data), "task_dir": str(task.root), "slice_config": asdict(cfg),
                                  "cache_dir": str(cache_dir), **run.data_settings()})
    return run
