"""Does synthetic data help segmentation? The study of notebook 05.

**Design**, fixed before any result (:func:`make_design`, saved as ``study/design.json``):
test and validation patients held out, the rest a training *pool*; for each number of
real patients ``n`` several seeds, each drawing another subset of the pool (patient choice
is part of the spread). Every cell ``(n, seed)`` trains:

* ``real``: the U-Net on the subset's real slices (classic augmentation on: the baseline);
* ``mix``: real + synthetic slices (``ratio`` synthetic per real slice);
* ``pretrain``: half of the steps on synthetic slices, then fine-tuning on real ones;
* ``synthetic_only``: synthetic slices alone;
* ``latent``: the VAE latent-space segmenter (the seed baseline);
* at ``ablation_n_real`` only: mix at the ``ablation_ratios``, deformed real masks instead
  of the shape model's new ones, and no sample filter.

Synthetic pairs come from a mask-conditioned image generator (:mod:`lib.gan` or
:mod:`lib.diffusion`) fed by masks of the shape model (:mod:`lib.shapes`) or deformed real
masks, filtered by the cell's real-only U-Net (:func:`lib.synthesis.filter_pairs`). The
generators, shape model and filter see only the cell's real patients.

**Fairness**: within a patient count every condition trains for the same number of
optimiser steps, chosen on the validation patients so that real only reaches its plateau
(:func:`calibrate_steps`), and is scored on the same test patients (per-patient 3D Dice at
the original resolution). **Statistics**: :func:`study_conclusions` pairs each condition
with real only by seed and test patient and gives a bootstrap interval.

**Execution**: a cell is one function (:func:`run_cell`) and one job of :mod:`lib.engine`,
so cells run side by side on every core or GPU of a machine, or on a Ray cluster.
**Resumption**: every condition is one record in ``study/results.json``; the driver alone
writes them, a cell's records at once when the cell finishes (merged under a file lock,
never twice); a re-run skips the records already there, so the grid runs in chunks. Records
of another design are refused. The study keeps records, not models: a cell's generators,
samples and U-Nets live in ``study/work/`` until its records are written, so an interrupted
cell resumes from them.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from lib import diffusion, gan, segment, synthesis, vae
from lib.atomic import read_json, update_json, write_json
from lib.engine import EngineConfig, Job, run_jobs
from lib.forward import predict_probs
from lib.generative import TrainingCollapsed, load_generator
from lib.inference import probs_to_volume
from lib.metrics import crossed_bootstrap, dice, seed_t_interval, seeds_for_power
from lib.models import ModelConfig
from lib.pipeline import Run
from lib.shapes import ShapeModel, ShapeModelConfig
from lib.slices import SliceSet, concat, load_pairs, save_pairs
from lib.train import TrainConfig, fit
from lib.volumes import read_label

STRATEGIES = ("real", "mix", "pretrain", "synthetic_only", "latent")
IMAGE_GENERATORS = {"spade_gan": (gan.train_gan, gan.generate_images, gan.SPADEGAN),
                    "diffusion": (diffusion.train_diffusion, diffusion.generate_images, diffusion.MaskDDPM)}


@dataclass(frozen=True)
class Condition:
    """One way of training the segmenter in a cell."""

    strategy: str
    ratio: float = 0.0  # synthetic slices per real slice (0 for real only and the latent segmenter)
    shapes: str | None = None  # "new" (shape model) or "deformed" (real masks); None without synthetic slices
    filtered: bool | None = None

    @property
    def synthetic(self) -> bool:
        return self.strategy in ("mix", "pretrain", "synthetic_only")


@dataclass(frozen=True)
class StudyDesign:
    """Who is tested, who validates, who may train, and the grid; see :func:`make_design`."""

    dataset: str
    test: tuple[str, ...]
    val: tuple[str, ...]
    pool: tuple[str, ...]
    n_real: tuple[int, ...]
    seeds: tuple[int, ...]  # number of seeds (training subsets) for each entry of n_real
    generator: str = "spade_gan"
    strategies: tuple[str, ...] = STRATEGIES
    ratio: float = 1.0
    ablation_n_real: int | None = 1
    ablation_ratios: tuple[float, ...] = (0.5, 2.0)
    filter_threshold: float = 0.5
    seed: int = 0

    @property
    def id(self) -> str:
        """Short hash of the design: every record carries it."""
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()

    def subset(self, n: int, seed: int) -> list[str]:
        """The ``n`` pool patients of seed ``seed``: consecutive runs through one fixed shuffle
        of the pool, so seeds give different subsets while the pool lasts."""
        perm = np.random.default_rng(self.seed + 1).permutation(len(self.pool))
        return sorted(self.pool[perm[(seed * n + i) % len(self.pool)]] for i in range(n))

    def cells(self) -> list[tuple[int, int]]:
        return [(n, s) for n, k in zip(self.n_real, self.seeds) for s in range(k)]

    def conditions(self, n: int) -> list[Condition]:
        """The conditions of a cell with ``n`` real patients, real only first."""
        main = [c for c in (Condition("real"), Condition("mix", self.ratio, "new", True),
                            Condition("pretrain", self.ratio, "new", True),
                            Condition("synthetic_only", self.ratio, "new", True), Condition("latent"))
                if c.strategy in self.strategies]
        if n != self.ablation_n_real or "mix" not in self.strategies:
            return main
        return main + [Condition("mix", r, "new", True) for r in self.ablation_ratios] + [
            Condition("mix", self.ratio, "deformed", True), Condition("mix", self.ratio, "new", False)]

    def split(self) -> dict[str, Any]:
        return {"train": list(self.pool), "val": list(self.val), "test": list(self.test), "seed": self.seed,
                "source": f"study design {self.id}"}


def make_design(run: Run, *, n_test: int, n_val: int, n_real: list[int], seeds: list[int],
                generator: str = "spade_gan", strategies: list[str] = STRATEGIES, ratio: float = 1.0,
                ablation_ratios: list[float] = (0.5, 2.0), filter_threshold: float = 0.5, seed: int = 0,
                ablations: bool = True) -> StudyDesign:
    """Hold out ``n_test`` test and ``n_val`` validation patients of the run's task (drawn by
    ``seed`` from all its patients); the rest is the training pool. ``strategies`` (real only
    always among them) trims the grid; the ablations run at 1 real patient with "mix" (none
    with ``ablations=False``, as the demo's short study).

    Raises:
        ValueError: a patient count the pool cannot supply, seeds not matching ``n_real``, a
            ratio that is not positive, an unknown generator or strategy, or a threshold
            outside [0, 1].
    """
    patients = sorted({p for name in ("train", "val", "test") for p in run.split[name]})
    if n_test < 1 or n_val < 1 or n_test + n_val >= len(patients):
        raise ValueError(f"study design: {n_test} test + {n_val} validation patients leave no training pool "
                         f"among the {len(patients)} patients")
    perm = [patients[i] for i in np.random.default_rng(seed).permutation(len(patients))]
    test, val, pool = perm[:n_test], perm[n_test:n_test + n_val], perm[n_test + n_val:]
    if len(seeds) != len(n_real) or min(seeds, default=1) < 1:
        raise ValueError(f"study design: give a seed count >= 1 for each of n_real={n_real}, got {seeds}")
    if bad := [n for n in n_real if not 1 <= n <= len(pool)]:
        raise ValueError(f"study design: n_real {bad} cannot be drawn from a training pool of {len(pool)} patients")
    if bad_r := [r for r in (ratio, *ablation_ratios) if not r > 0]:
        raise ValueError(f"study design: synthetic:real ratios must be positive, got {bad_r}")
    if generator not in IMAGE_GENERATORS:
        raise ValueError(f"study design: unknown generator {generator!r}; choose one of {sorted(IMAGE_GENERATORS)}")
    if not 0 <= filter_threshold <= 1:
        raise ValueError(f"study design: filter threshold {filter_threshold} must lie in [0, 1]")
    if "real" not in strategies or set(strategies) - set(STRATEGIES):
        raise ValueError(f"study design: strategies {list(strategies)} must include 'real' and come from {STRATEGIES}")
    return StudyDesign(run.task.name, tuple(sorted(test)), tuple(sorted(val)), tuple(sorted(pool)),
                       tuple(int(n) for n in n_real), tuple(int(k) for k in seeds), generator,
                       tuple(s for s in STRATEGIES if s in strategies), float(ratio),
                       1 if ablations and 1 in n_real else None, tuple(float(r) for r in ablation_ratios),
                       float(filter_threshold),
                       seed)


def design_run(run: Run, design: StudyDesign) -> Run:
    """The run with the design's split (same slice cache), checked against ``study/design.json``.

    Raises:
        ValueError: the run folder holds a study of another design.
    """
    path = run.run_dir / "study" / "design.json"
    saved = read_json(path) if path.is_file() else None
    if saved is not None and saved.get("id") != design.id:
        raise ValueError(f"{path} holds study design {saved.get('id')} (test {saved.get('test')}), not {design.id} "
                         f"(test {list(design.test)}); use another run_dir or delete the study folder to start over")
    if saved is None:
        write_json(path, asdict(design) | {"id": design.id})
    return replace(run, split=design.split())


def truth_volumes(test: SliceSet) -> dict[str, np.ndarray]:
    """Original label volumes of the test patients, loaded once."""
    return {cid: read_label(m.label_path) for cid, m in test.cases.items()}


def score_slices(pred_probs: torch.Tensor, test: SliceSet, truths: dict[str, np.ndarray], labels: list[int]) -> dict[str, float]:
    """Per-patient 3D Dice at the original resolution from slice probabilities (N, K, S, S)."""
    out = {}
    for cid, meta in test.cases.items():
        sel = torch.from_numpy(test.case_ids == cid)
        volume = probs_to_volume(pred_probs[sel], meta)
        out[cid] = float(np.nanmean([dice(volume, truths[cid], k) for k in labels]))
    return out


def plateau_epoch(val_dice: list[float], tolerance: float = 0.01, window: int = 3) -> int:
    """First epoch (1-based) whose running mean of ``window`` validation Dice values comes within
    ``tolerance`` of the best running mean: where more steps stop paying."""
    v = np.asarray(val_dice, float)
    if v.size == 0:
        raise ValueError("plateau_epoch: no validation Dice values")
    w = min(window, v.size)
    smooth = np.convolve(v, np.ones(w) / w, mode="valid")
    return int(np.flatnonzero(smooth >= np.nanmax(smooth) - tolerance)[0]) + w


def _epoch_steps(cfg: TrainConfig) -> int:
    """Optimiser steps per epoch: the same for every training set (``samples_per_epoch`` is set)."""
    return math.ceil(cfg.samples_per_epoch / cfg.batch_size)


def calibrate_steps(run: Run, design: StudyDesign, model_cfg: ModelConfig, train_cfg: TrainConfig, *,
                    max_epochs: int, device: str = "cpu", progress: bool = True) -> dict[int, dict[str, Any]]:
    """For each patient count: train real only (seed 0's subset) for ``max_epochs`` at a constant
    learning rate (so the curve flattens where learning stops, not where a decaying schedule
    ends) and pick the epoch where validation Dice reaches its plateau (:func:`plateau_epoch`).
    ``samples_per_epoch`` must be set, so an epoch is the same number of steps for every training
    set. The study then trains every condition for that many steps with its usual schedule.

    Returns (and keeps in ``study/steps.json``, reused on a re-run):
        n_real -> {"epochs", "steps", "plateau" (False: still rising at ``max_epochs``, so the
        study trains all of them), "curve": [[steps, val_dice], ...]}.
    """
    if not train_cfg.samples_per_epoch:
        raise ValueError("calibrate_steps: set samples_per_epoch, so every condition's epoch has the same steps")
    path = run.run_dir / "study" / "steps.json"
    saved = read_json(path) if path.is_file() else {}
    if saved and saved.get("design") != design.id:
        raise ValueError(f"{path} was calibrated for study design {saved.get('design')}, not {design.id}")
    out = read_steps(path) if saved else {}
    train, val = run.slices("train"), run.slices("val")
    per_epoch = _epoch_steps(train_cfg)
    for n in tqdm(design.n_real, desc="choosing steps on validation", disable=not progress):
        if n in out:
            continue
        real = _patients(train, design.subset(n, 0))
        result = fit(real, val, model_cfg, replace(train_cfg, epochs=max_epochs, seed=0, device=device,
                                                  lr_schedule="constant"),
                     run.run_dir / "study" / "work" / f"calibrate_n{n}", run.data_settings(), keep="none",
                     progress=False)
        curve = [[row["epoch"] * per_epoch, row["val_dice"]] for row in result.history]
        epochs = plateau_epoch([d for _, d in curve])
        out[n] = {"epochs": epochs, "steps": epochs * per_epoch, "plateau": epochs < max_epochs, "curve": curve}
        write_json(path, {"design": design.id, "steps": out})
        shutil.rmtree(run.run_dir / "study" / "work" / f"calibrate_n{n}", ignore_errors=True)
    return out


def _patients(slices: SliceSet, patients: list[str]) -> SliceSet:
    return slices.subset(np.flatnonzero(np.isin(slices.case_ids, patients)))


def _key(r: dict[str, Any]) -> tuple:
    return (r["strategy"], r["shapes"], r["filtered"], float(r["ratio"]), r["n_real"], r["seed"])


def load_records(path: Path, design: StudyDesign) -> list[dict[str, Any]]:
    """The records of ``path``; ValueError if any was written by another design."""
    records = read_json(path) if path.is_file() else []
    if foreign := sorted({str(r.get("design")) for r in records} - {design.id}):
        raise ValueError(f"{path} holds records of study design(s) {foreign}, not {design.id} (other test patients "
                         "or grid); use another run_dir or delete the file to start over")
    return records


def add_records(path: Path, new: list[dict[str, Any]], design: StudyDesign) -> list[dict[str, Any]]:
    """Merge ``new`` records into ``path`` under its lock (:func:`lib.atomic.update_json`): what
    another process wrote meanwhile is kept, and a condition already recorded is not added twice.
    Returns every record of the file."""
    def merge(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if foreign := sorted({str(r.get("design")) for r in records + new} - {design.id}):
            raise ValueError(f"{path}: records of study design(s) {foreign}, not {design.id}")
        have = {_key(r) for r in records}
        return records + [r for r in new if _key(r) not in have]

    return update_json(path, merge, default=[])


@dataclass
class _Cell:
    """What one (n_real, seed) cell shares between its conditions."""

    n: int
    seed: int
    real: SliceSet
    work: Path
    real_model: torch.nn.Module | None = None
    generator: Any = None
    shape_model: ShapeModel | None = None
    pools: dict[tuple[str, bool], tuple[SliceSet, float]] = field(default_factory=dict)
    generator_stopped: str | None = None  # why the image generator stopped before its epochs, if it did


def run_cell(run: Run, design: StudyDesign, n: int, seed: int, model_cfg: ModelConfig, train_cfg: TrainConfig,
             steps: dict[int, dict[str, Any]], generator_cfg: gan.SPADEGANConfig | diffusion.DiffusionConfig,
             vae_cfg: vae.VAEConfig, *, shape_cfg: ShapeModelConfig | None = None,
             generator_samples: int | None = None, device: str = "cpu", done: frozenset[tuple] = frozenset(),
             progress: bool = True) -> list[dict[str, Any]]:
    """Train and score the conditions of cell ``(n, seed)`` that are not in ``done`` (keys of
    records already written); returns their records. The conditions share the cell's real-only
    U-Net (the sample filter), image generator and shape model. Pure apart from the cell's own
    folder ``study/work/n<n>_s<seed>``, where finished trainings and generators are kept until
    the caller has saved the records, so a cell that is interrupted and run again resumes: the
    records of its finished conditions wait in ``records.json`` there, and each condition's
    checkpoints are removed once it is scored (only real only's U-Net and the generators stay)."""
    work = cell_folder(run, n, seed)
    partial = work / "records.json"  # conditions an earlier try of this cell finished
    records = [r for r in (read_json(partial) if partial.is_file() else []) if _key(r) not in done]
    have = done | {_key(r) for r in records}
    todo = [c for c in design.conditions(n) if _key(_fields(c, n, seed)) not in have]
    if not todo:
        return records
    train, val, test = run.slices("train"), run.slices("val"), run.slices("test")
    truths = truth_volumes(test)
    patients = design.subset(n, seed)
    cell = _Cell(n, seed, _patients(train, patients), work)
    cfg = replace(train_cfg, epochs=steps[n]["epochs"], seed=seed, device=device)
    gen_epochs = math.ceil(generator_samples / len(cell.real)) if generator_samples else generator_cfg.epochs
    gen_cfg, cell_vae_cfg = replace(generator_cfg, epochs=gen_epochs), replace(vae_cfg, epochs=gen_epochs)
    for cond in design.conditions(n):  # real only first: the filter uses its U-Net
        finished = cond not in todo
        if finished and (cond.strategy != "real" or not _filters(todo)):
            continue
        t0 = time.perf_counter()  # a finished real-only U-Net is reloaded from the cell's folder
        scores, extra = _train_condition(cond, cell, cfg, run, design, model_cfg, val, test, truths,
                                         gen_cfg, cell_vae_cfg, shape_cfg, device)
        if finished:
            continue
        records.append(_fields(cond, n, seed) | {
            "dataset": design.dataset, "design": design.id, "generator": _generator_name(cond, design),
            "train_patients": patients, "test_dice": scores, "mean_dice": float(np.nanmean(list(scores.values()))),
            "steps": steps[n]["steps"], "train_seconds": time.perf_counter() - t0,
            "image_size": run.slice_cfg.image_size, "n_real_slices": len(cell.real),
            "generator_epochs": gen_epochs if _generator_name(cond, design) else None, **extra})
        write_json(partial, records)
        if cond.strategy != "real":  # keep only what the next conditions need: real only's U-Net, the generators
            for folder in (cell.work / "seg").glob(f"{_condition_name(cond)}*"):
                shutil.rmtree(folder, ignore_errors=True)
            if cond.strategy == "latent":
                shutil.rmtree(cell.work / "vae", ignore_errors=True)
        if progress:
            print(f"cell n={n} seed={seed}: {setting_label(records[-1])}, test Dice {records[-1]['mean_dice']:.3f} "
                  f"({records[-1]['train_seconds']:.0f} s)", flush=True)
    return records


def _condition_name(cond: Condition) -> str:
    """The folder name of a condition's trainings in its cell."""
    return f"{cond.strategy}_r{cond.ratio:g}_{cond.shapes}_{'f' if cond.filtered else 'u'}"


def cell_folder(run: Run, n: int, seed: int) -> Path:
    """The work folder of cell ``(n, seed)``: trainings and generators until its records are saved."""
    return run.run_dir / "study" / "work" / f"n{n}_s{seed}"


def cell_jobs(run: Run, design: StudyDesign, records: list[dict[str, Any]], **cell_args: Any) -> list[Job]:
    """One :class:`lib.engine.Job` per cell with conditions not yet in ``records``, calling
    :func:`run_cell` with ``cell_args``."""
    done = frozenset(_key(r) for r in records)
    return [Job(f"cell n={n} seed={seed}", run_cell, {"run": run, "design": design, "n": n, "seed": seed,
                                                       "done": done, **cell_args})
            for n, seed in design.cells()
            if any(_key(_fields(c, n, seed)) not in done for c in design.conditions(n))]


def run_cells(run: Run, design: StudyDesign, jobs: list[Job], engine: EngineConfig | None = None,
              progress: bool = True) -> list[dict[str, Any]]:
    """Run the cells' ``jobs`` on ``engine``; this process alone merges each finished cell's
    records into ``study/results.json`` (under its lock) and then removes the cell's folder.

    Raises:
        RuntimeError: naming every cell that failed (after its retries) and its error, once the
            other cells are done and saved.
    """
    path = run.run_dir / "study" / "results.json"

    def save(job: Job, records: list[dict[str, Any]]) -> None:
        add_records(path, records, design)
        for n, seed in {(r["n_real"], r["seed"]) for r in records}:
            shutil.rmtree(cell_folder(run, n, seed), ignore_errors=True)

    failed = run_jobs(jobs, engine or EngineConfig(), save, shared_dir=run.run_dir, desc="study cells", progress=progress)
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(jobs)} study cell(s) failed (the others are saved; run again "
                           "to retry them): " + "; ".join(f"{name}: {err}" for name, err in failed.items()))
    return load_records(path, design)


def run_study(run: Run, design: StudyDesign, model_cfg: ModelConfig, train_cfg: TrainConfig,
              steps: dict[int, dict[str, Any]], generator_cfg: gan.SPADEGANConfig | diffusion.DiffusionConfig,
              vae_cfg: vae.VAEConfig, *, shape_cfg: ShapeModelConfig | None = None,
              generator_samples: int | None = None, device: str = "cpu", engine: EngineConfig | None = None,
              progress: bool = True) -> list[dict[str, Any]]:
    """Run every cell of the design not yet recorded (``run`` from :func:`design_run`) on
    ``engine`` (:mod:`lib.engine`: default Ray on this machine or ``$RAY_ADDRESS``'s cluster); returns all
    records of ``study/results.json``. ``steps`` comes from :func:`calibrate_steps`.
    ``generator_samples``: slices each cell's generators (image generator and VAE) see in
    training, so a cell of 1 patient trains them as many steps as a cell of 20 (None: the
    configs' epochs). Raises ValueError for records of another design, RuntimeError naming the
    cells that failed (for example on a generator checkpoint in a cell's folder that was
    trained on other patients)."""
    records = load_records(run.run_dir / "study" / "results.json", design)
    jobs = cell_jobs(run, design, records, model_cfg=model_cfg, train_cfg=train_cfg, steps=steps,
                     generator_cfg=generator_cfg, vae_cfg=vae_cfg, shape_cfg=shape_cfg,
                     generator_samples=generator_samples, device=device, progress=progress)
    return run_cells(run, design, jobs, engine, progress)


def _fields(cond: Condition, n: int, seed: int) -> dict[str, Any]:
    return {"strategy": cond.strategy, "shapes": cond.shapes, "filtered": cond.filtered, "ratio": cond.ratio,
            "n_real": n, "seed": seed}


def _filters(conditions: list[Condition]) -> bool:
    return any(c.synthetic and c.filtered for c in conditions)


def _generator_name(cond: Condition, design: StudyDesign) -> str | None:
    return design.generator if cond.synthetic else "vae" if cond.strategy == "latent" else None


def _train_condition(cond: Condition, cell: _Cell, cfg: TrainConfig, run: Run, design: StudyDesign,
                     model_cfg: ModelConfig, val: SliceSet, test: SliceSet, truths: dict[str, np.ndarray],
                     generator_cfg: Any, vae_cfg: vae.VAEConfig, shape_cfg: ShapeModelConfig | None,
                     device: str) -> tuple[dict[str, float], dict[str, Any]]:
    """Train one condition of a cell; returns its per-patient test Dice and extra record fields."""
    name = _condition_name(cond)

    chosen: dict[str, int] = {}

    def train(slices: SliceSet, sub: str, train_cfg: TrainConfig, init: torch.nn.Module | None = None):
        result = fit(slices, val, model_cfg, train_cfg, cell.work / "seg" / f"{name}{sub}", run.data_settings(),
                     init=init, progress=False)
        chosen["best_epoch"] = result.best_epoch  # the epoch validation chose, of the last training
        return result.model

    if cond.strategy == "latent":
        vae_model, _ = vae.train_vae(cell.real.images.astype(np.float32), cell.real.masks,
                                     replace(vae_cfg, seed=cell.seed), device=device, out_dir=cell.work / "vae",
                                     progress=False)
        steps = cfg.epochs * _epoch_steps(cfg)
        seg = vae.train_latent_segmenter(vae_model, cell.real.images.astype(np.float32), cell.real.masks,
                                         steps=steps, batch_size=cfg.batch_size, device=device, seed=cell.seed,
                                         progress=False)
        pred = torch.from_numpy(vae.predict_latent_segmenter(seg, test.images.astype(np.float32))).long()
        probs = torch.nn.functional.one_hot(pred, run.task.num_classes).permute(0, 3, 1, 2).float()
        return score_slices(probs, test, truths, run.labels), {}
    if cond.strategy == "real":
        model = train(cell.real, "", cfg)
        cell.real_model = model
        return _score(model, test, truths, run, device), dict(chosen)
    synth, kept = _synthetic(cell, cond, design, generator_cfg, shape_cfg, run, device)
    extra = {"n_synthetic_slices": len(synth), "synthetic_kept_share": kept, "generator_stopped": cell.generator_stopped}
    if cond.strategy == "mix":
        model = train(concat(cell.real, synth), "", cfg)
    elif cond.strategy == "synthetic_only":
        model = train(synth, "", cfg)
    else:  # pretrain: half the steps on synthetic slices, the rest fine-tuning on real ones
        first = max(1, cfg.epochs // 2)
        pre = train(synth, "_pre", replace(cfg, epochs=first))
        model = train(cell.real, "_fine", replace(cfg, epochs=cfg.epochs - first), init=pre) if cfg.epochs > first else pre
    return _score(model, test, truths, run, device), extra | chosen


def _score(model: torch.nn.Module, test: SliceSet, truths: dict[str, np.ndarray], run: Run,
           device: str) -> dict[str, float]:
    return score_slices(predict_probs(model, test.images, device=device), test, truths, run.labels)


def _synthetic(cell: _Cell, cond: Condition, design: StudyDesign, generator_cfg: Any,
               shape_cfg: ShapeModelConfig | None, run: Run, device: str) -> tuple[SliceSet, float]:
    """``ratio x`` the cell's real slices in synthetic pairs of the condition's mask source and
    filter setting, and the share of drawn pairs the filter kept. Pairs are drawn once per
    (source, filter) for the cell's largest ratio and cached in the cell's folder, so a resumed
    cell trains on the same pairs."""
    key = (cond.shapes, bool(cond.filtered))
    if key not in cell.pools:
        train_fn, generate, kind = IMAGE_GENERATORS[design.generator]
        images, masks = cell.real.images.astype(np.float32), cell.real.masks
        if cell.generator is None:
            out_dir = cell.work / design.generator
            try:
                cell.generator, _ = train_fn(images, masks, replace(generator_cfg, seed=cell.seed), device=device,
                                             out_dir=out_dir, progress=False)
            except TrainingCollapsed as err:  # on one patient's slices a discriminator can win: keep the last good epoch
                cell.generator = load_generator(kind, out_dir / f"{kind.KIND}.pt", device)[0]
                cell.generator_stopped = str(err)
        if cell.shape_model is None and cond.shapes == "new":
            cell.shape_model = ShapeModel.fit(masks, run.task.num_classes, replace(shape_cfg or ShapeModelConfig(),
                                                                                 seed=cell.seed))
        need = max(max(1, round(c.ratio * len(cell.real))) for c in design.conditions(cell.n)
                   if c.synthetic and (c.shapes, bool(c.filtered)) == key)
        file = cell.work / f"synthetic_{cond.shapes}_{'f' if cond.filtered else 'u'}.npz"
        if not file.is_file():
            drawn = 2 * need if cond.filtered else need  # the filter drops some: draw twice as many
            if cond.filtered and cell.real_model is None:
                raise RuntimeError("the sample filter needs the cell's real-only U-Net; train it first")
            kept = synthesis.make_pairs(
                generate, cell.generator, cond.shapes, drawn, cell.seed, shape_model=cell.shape_model,
                train_masks=masks, num_classes=run.task.num_classes, device=device,
                predict_fn=segment.predict_masks_fn(cell.real_model, device) if cond.filtered else None,
                threshold=design.filter_threshold)
            reps = np.resize(np.arange(len(kept.masks)), need)  # too few kept: cycle through them
            save_pairs(file, kept.images[reps], kept.masks[reps], {"kept_share": float(kept.kept.mean()),
                                                                  "seed": cell.seed})
        with np.load(file) as z:
            share = json.loads(str(z["meta"]))["kept_share"]
        cell.pools[key] = (load_pairs(file, source=f"synthetic_{design.generator}"), share)
    pool, share = cell.pools[key]
    n_synth = max(1, round(cond.ratio * len(cell.real)))
    return pool.subset(np.arange(n_synth)), share


# ----------------------------------------------------------------------------- tables and statistics


def setting_label(r: dict[str, Any] | pd.Series) -> str:
    """A readable name of a record's condition."""
    strategy, gen = r["strategy"], r["generator"]
    if strategy == "real":
        return "real only"
    if strategy == "latent":
        return "VAE latent segmenter"
    if strategy == "pretrain":
        return f"{gen} pre-training, real fine-tuning"
    if strategy == "synthetic_only":
        return f"{gen} only"
    notes = ["deformed shapes"] * (r["shapes"] == "deformed") + ["unfiltered"] * (not r["filtered"])
    return f"real + {gen} x{r['ratio']:g}" + (f" ({', '.join(notes)})" if notes else "")


def study_table(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Mean, sd, min and max over seeds of the mean test Dice, per n_real and setting (empty
    without records)."""
    if not records:
        return pd.DataFrame(columns=["mean", "std", "min", "max", "seeds"],
                            index=pd.MultiIndex.from_tuples([], names=["n_real", "setting"]))
    df = pd.DataFrame(records)
    df["setting"] = df.apply(setting_label, axis=1)
    table = df.groupby(["n_real", "setting"])["mean_dice"].agg(["mean", "std", "min", "max", "count"])
    return table.rename(columns={"count": "seeds"})


def _differences(matched: list[tuple[dict[str, Any], dict[str, Any]]]) -> np.ndarray:
    """The (seeds x test patients) matrix of per-patient Dice differences of each seed's record
    against real only of the same seed (same training subset); NaN where a patient is missing."""
    patients = sorted({p for r, b in matched for p in set(r["test_dice"]) & set(b["test_dice"])})
    return np.array([[r["test_dice"].get(p, np.nan) - b["test_dice"].get(p, np.nan) for p in patients]
                     for r, b in matched], dtype=float)


def _verdict(primary: dict[str, Any], secondary: dict[str, Any], seeds: int, min_seeds: int) -> str:
    """"helps" or "hurts" only when both intervals exclude 0 on the same side."""
    if seeds < min_seeds:
        return "too few seeds"
    both = {primary["verdict"], secondary["verdict"]}
    return {"higher": "helps", "lower": "hurts"}.get(both.pop(), "no clear difference") if len(both) == 1 \
        else "no clear difference"


def study_conclusions(records: list[dict[str, Any]], n_boot: int = 10_000, seed: int = 0,
                      min_seeds: int = 3) -> pd.DataFrame:
    """Each setting against "real only" at the same n_real, with the training subset (seed) as the
    unit: the mean paired difference in per-patient test Dice (paired by seed and test patient),
    a 95 % t-interval over the seeds' mean differences (primary: ``ci_low``, ``ci_high``;
    :func:`lib.metrics.seed_t_interval`) and a 95 % bootstrap interval that resamples seeds and
    test patients crossed, as every seed is scored on the same patients (secondary:
    ``boot_low``, ``boot_high``; :func:`lib.metrics.crossed_bootstrap`).

    The verdict is "helps" only when both intervals are above 0, "hurts" only when both are below
    0, otherwise "no clear difference"; with fewer than ``min_seeds`` seeds it says "too few
    seeds". Differences are in Dice points (x100).
    """
    columns = ["n_real", "setting", "delta_dice_points", "ci_low", "ci_high", "boot_low", "boot_high", "seeds",
               "pairs", "verdict"]
    if not records:
        return pd.DataFrame(columns=columns).set_index(["n_real", "setting"])
    df = pd.DataFrame(records)
    df["setting"] = df.apply(setting_label, axis=1)
    base = {(r["n_real"], r["seed"]): r for r in records if r["strategy"] == "real"}
    rows = []
    for (n, setting), group in df[df["strategy"] != "real"].groupby(["n_real", "setting"]):
        matched = [(r, base[(n, r["seed"])]) for r in group.to_dict("records") if (n, r["seed"]) in base]
        diff = _differences(matched)
        if not diff.size or not np.isfinite(diff).any():
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a seed without any finite difference
            primary = seed_t_interval(np.nanmean(diff, axis=1))
        secondary = crossed_bootstrap(diff, n_boot=n_boot, seed=seed)
        rows.append({"n_real": n, "setting": setting, "delta_dice_points": 100 * primary["mean"],
                     "ci_low": 100 * primary["low"], "ci_high": 100 * primary["high"],
                     "boot_low": 100 * secondary["low"], "boot_high": 100 * secondary["high"], "seeds": len(matched),
                     "pairs": secondary["n"], "verdict": _verdict(primary, secondary, len(matched), min_seeds)})
    return pd.DataFrame(rows, columns=columns).set_index(["n_real", "setting"])


def power_table(records: list[dict[str, Any]], setting: str = "real + spade_gan x1", effect: float = 0.03,
                power: float = 0.8) -> pd.DataFrame:
    """How many seeds (training subsets) a study needs, from the records of an earlier one: per
    patient count, the spread (sd) of the seeds' mean paired differences of ``setting`` against
    real only, and the seeds a t-test needs to detect ``effect`` (Dice, 0.03 = 3 points) with
    ``power`` at the 5 % level (:func:`lib.metrics.seeds_for_power`)."""
    rows = {}
    base = {(r["n_real"], r["seed"]): r for r in records if r["strategy"] == "real"}
    for n in sorted({r["n_real"] for r in records}):
        matched = [(r, base[(n, r["seed"])]) for r in records
                   if r["n_real"] == n and r["strategy"] != "real" and setting_label(r) == setting and (n, r["seed"]) in base]
        if len(matched) < 2:
            continue
        means = np.nanmean(_differences(matched), axis=1)
        sd = float(np.std(means, ddof=1))
        rows[n] = {"seeds": len(matched), "mean_difference_points": 100 * float(np.mean(means)),
                   "sd_points": 100 * sd, "seeds_needed": seeds_for_power(sd, effect, power)}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("n_real")


def study_figure(records: list[dict[str, Any]], conclusions: pd.DataFrame) -> Figure:
    """Left: mean test Dice (± sd over seeds) against the number of real patients. Right: each
    setting's paired difference to real only with its 95 % interval. Settings are spread
    sideways around each patient count."""
    if not records:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.text(0.5, 0.5, "no study records (study_n_real is empty)", ha="center", va="center")
        ax.axis("off")
        return fig
    table = study_table(records).reset_index()
    ticks = sorted(table["n_real"].unique())
    where = {n: i for i, n in enumerate(ticks)}
    settings = sorted(table["setting"].unique())
    spread = {s: (i - (len(settings) - 1) / 2) * 0.6 / max(len(settings), 1) for i, s in enumerate(settings)}
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8))
    for setting, rows in table.groupby("setting"):
        x = rows["n_real"].map(where) + spread[setting]
        ax.errorbar(x, rows["mean"], yerr=rows["std"].fillna(0), marker="o", capsize=3, label=setting,
                    lw=2.5 if setting == "real only" else 1.2)
    ax.set(xlabel="real training patients", ylabel="mean test Dice (± sd over seeds)", ylim=(0, 1))
    ax.legend(fontsize=7, loc="lower right")
    for setting, rows in conclusions.reset_index().groupby("setting"):
        x = rows["n_real"].map(where) + spread[setting]
        mean = rows["delta_dice_points"]
        bx.errorbar(x, mean, yerr=[mean - rows["ci_low"], rows["ci_high"] - mean], marker="o", capsize=3,
                    label=setting, color=f"C{settings.index(setting)}")
    bx.axhline(0, color="k", lw=0.8)
    bx.set(xlabel="real training patients", ylabel="Dice points vs real only (95 % interval)")
    for axis in (ax, bx):
        axis.set_xticks(range(len(ticks)), [str(t) for t in ticks])
        axis.set_xlim(-0.5, len(ticks) - 0.5)
    fig.tight_layout()
    return fig


def steps_figure(steps: dict[int, dict[str, Any]]) -> Figure:
    """Real only's validation Dice against optimiser steps for each patient count, with the
    steps chosen for the study marked."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for n, s in sorted(steps.items()):
        x, y = zip(*s["curve"])
        line, = ax.plot(x, y, marker=".", label=f"{n} real patient{'s' * (n > 1)}")
        ax.axvline(s["steps"], color=line.get_color(), ls="--", lw=1)
    ax.set(xlabel="optimiser steps", ylabel="validation Dice (real only)", ylim=(0, 1),
           title="steps of every condition: where real only reaches its plateau (dashed)")
    if steps:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def study_workload(records: list[dict[str, Any]], steps: dict[int, dict[str, Any]]) -> dict[str, int]:
    """What a study trained, counted from its records and ``steps.json``: segmenter epochs
    (calibration included; every epoch is ``samples_per_epoch`` slices plus one validation pass),
    latent-segmenter steps, the scored conditions, and the slices that each cell's image
    generator and VAE trained on (once per cell, shared by its conditions). Times per unit
    (``bench/study_cost.py``) turn it into the study's cost on other hardware."""
    per_epoch = {n: int(s["curve"][0][0]) for n, s in steps.items()}
    out = {"segmenter_epochs": sum(len(s["curve"]) for s in steps.values()), "latent_steps": 0,
           "conditions": len(records), "generator_slices": 0, "vae_slices": 0}
    trained: set[tuple[str, int, int]] = set()
    for r in records:
        if r["strategy"] == "latent":
            out["latent_steps"] += r["steps"]
        else:
            out["segmenter_epochs"] += r["steps"] // per_epoch[r["n_real"]]
        kind = "vae" if r["strategy"] == "latent" else "generator"
        if r.get("generator_epochs") and (kind, r["n_real"], r["seed"]) not in trained:
            trained.add((kind, r["n_real"], r["seed"]))
            out[f"{kind}_slices"] += r["generator_epochs"] * r["n_real_slices"]
    return out


def grid_workload(design: StudyDesign, steps: dict[int, dict[str, Any]], generator_samples: int) -> dict[str, int]:
    """:func:`study_workload` of the whole grid, before it has run: what the design will train
    with the calibrated ``steps`` (each cell's generators see about ``generator_samples`` slices)."""
    out = calibration_workload(steps)
    for n, _ in design.cells():
        for key, count in cell_workload(design, n, steps, generator_samples).items():
            out[key] += count
    return out


def calibration_workload(steps: dict[int, dict[str, Any]]) -> dict[str, int]:
    """The work of :func:`calibrate_steps`: run first, once, before any cell."""
    return {"segmenter_epochs": sum(len(s["curve"]) for s in steps.values()), "latent_steps": 0, "conditions": 0,
            "generator_slices": 0, "vae_slices": 0}


def cell_workload(design: StudyDesign, n: int, steps: dict[int, dict[str, Any]], generator_samples: int
                  ) -> dict[str, int]:
    """The work of one cell with ``n`` real patients (the unit of the engine's jobs)."""
    conditions = design.conditions(n)
    latent = [c for c in conditions if c.strategy == "latent"]
    return {"segmenter_epochs": steps[n]["epochs"] * (len(conditions) - len(latent)),
            "latent_steps": steps[n]["steps"] * len(latent), "conditions": len(conditions),
            "generator_slices": generator_samples * any(c.synthetic for c in conditions),
            "vae_slices": generator_samples * bool(latent)}


def makespan(durations: list[float], workers: int) -> float:
    """Wall-clock of independent jobs of ``durations`` on ``workers`` equal workers, longest job
    first to the first free worker (how the engine's queue fills a cluster)."""
    free = [0.0] * max(1, workers)
    for d in sorted(durations, reverse=True):
        free[free.index(min(free))] += d
    return max(free)


def write_summary(study_dir: Path, design: StudyDesign, conclusions: pd.DataFrame,
                  steps: dict[int, dict[str, Any]]) -> Path:
    """``summary.json`` in ``study_dir``: the design, the steps per patient count and every paired comparison."""
    rows = conclusions.reset_index().to_dict("records")
    return write_json(Path(study_dir) / "summary.json",
                      {"design": asdict(design) | {"id": design.id},
                       "steps": {str(n): {k: v for k, v in s.items() if k != "curve"} for n, s in steps.items()},
                       "comparisons": rows})


def read_design(path: Path) -> StudyDesign:
    """The design saved by :func:`design_run` (``study/design.json``)."""
    return design_from_dict(read_json(path))


def design_from_dict(fields: dict[str, Any]) -> StudyDesign:
    """A design from its JSON fields (its ``id`` is recomputed)."""
    return StudyDesign(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items() if k != "id"})


def read_steps(path: Path) -> dict[int, dict[str, Any]]:
    """The steps chosen by :func:`calibrate_steps` (``study/steps.json``), by patient count."""
    return {int(n): s for n, s in read_json(path)["steps"].items()}
