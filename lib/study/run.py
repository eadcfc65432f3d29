"""Does synthetic data help segmentation? The study of notebook 05.

This module runs it. Its **design** (:mod:`lib.study.design`), saved as ``study/design.json``, is
fixed before any result:
test and validation patients held out, the rest a training *pool*; for each number of
real patients ``n`` several seeds, each drawing another subset of the pool (patient choice
is part of the spread). Every cell ``(n, seed)`` trains:

* ``real``: the U-Net on the subset's real slices (classic augmentation on: the baseline);
* ``add``: every real batch of real only, with ``ratio`` x batch size synthetic slices added on top
  (the same real batches, augmentation and steps: real data kept whole);
* ``mix``: real + synthetic slices in one set (``ratio`` synthetic per real slice) for the same
  steps, so synthetic slices take the place of real ones (the earlier studies' design; an ablation
  when ``add`` is the primary mix);
* ``pretrain``: half of the steps on synthetic slices, then fine-tuning on real ones;
* ``synthetic_only``: synthetic slices alone;
* ``latent``: the VAE latent-space segmenter (the seed baseline);
* at ``ablation_n_real`` only: the primary mix at the ``ablation_ratios``, deformed real masks
  instead of the shape model's new ones, and no sample filter; at ``arm_n_real`` the primary
  mix with the design's second image generator (``arm``).

Synthetic pairs (:mod:`lib.synth.pairs`) come from a mask-conditioned image generator
(:mod:`lib.synth.gan` or :mod:`lib.synth.diffusion`) fed by masks of the shape model or deformed
real masks (:mod:`lib.synth.masks`), filtered by the cell's real-only U-Net; never repeated (a
pool that stays short after several rounds of generation is used as it is, and its records
give the unique share). Every pool's generator is measured on the quality table against the
validation patients (never the test ones) and its record carries the row. The generators,
shape model and filter see only the cell's real patients. The latent segmenter is
:mod:`lib.study.latent`.

**Fairness**: within a patient count every condition trains for the same number of
optimiser steps, chosen on the validation patients so that real only reaches its plateau
(:func:`calibrate_steps`), and is scored on the same test patients (per-patient 3D Dice at
the original resolution). **Statistics**: :mod:`lib.study.analysis` pairs each condition
with real only by seed and test patient and gives a bootstrap interval.

**Execution**: a cell is one function (:func:`run_cell`) and one job of :mod:`lib.common.engine`,
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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lib.common.atomic import read_json, update_json, write_json
from lib.common.engine import EngineConfig, Job, run_jobs
from lib.common.env import code_version, hardware
from lib.data.run import Run
from lib.data.slices import SliceSet, concat, load_pairs, save_pairs
from lib.data.volumes import read_label
from lib.seg import workflow
from lib.seg.forward import predict_probs
from lib.seg.inference import probs_to_volume
from lib.seg.metrics import dice
from lib.seg.models import ModelConfig
from lib.seg.train import TrainConfig, fit
from lib.study import latent
from lib.study.analysis import setting_label
from lib.study.design import Condition, StudyDesign
from lib.synth import diffusion, gan, pairs, vae
from lib.synth.generative import TrainingCollapsed, load_generator
from lib.synth.quality import quality_table, with_foreground
from lib.synth.shapes import ShapeModel, ShapeModelConfig

IMAGE_GENERATORS = {"spade_gan": (gan.train_gan, gan.generate_images, gan.SPADEGAN),
                    "diffusion": (diffusion.train_diffusion, diffusion.generate_images, diffusion.MaskDDPM)}


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


def calibration_key(design: StudyDesign, model_cfg: ModelConfig, train_cfg: TrainConfig, max_epochs: int) -> str:
    """What the steps' calibration depends on: the validation patients, the pool and its shuffle,
    the U-Net and its training, the epochs tried. Not the seeds per count, the generators or the
    strategies, so a grid resized after it was costed keeps its calibrated steps."""
    fields = {"dataset": design.dataset, "val": design.val, "pool": design.pool, "seed": design.seed,
              "model": asdict(model_cfg), "train": asdict(replace(train_cfg, device="any")), "max_epochs": max_epochs}
    return hashlib.blake2b(json.dumps(fields, sort_keys=True, default=str).encode(), digest_size=6).hexdigest()


def calibrate_steps(run: Run, design: StudyDesign, model_cfg: ModelConfig, train_cfg: TrainConfig, *,
                    max_epochs: int, device: str = "cpu", progress: bool = True) -> dict[int, dict[str, Any]]:
    """For each patient count: train real only (seed 0's subset) for ``max_epochs`` at a constant
    learning rate (so the curve flattens where learning stops, not where a decaying schedule
    ends) and pick the epoch where validation Dice reaches its plateau (:func:`plateau_epoch`).
    ``samples_per_epoch`` must be set, so an epoch is the same number of steps for every training
    set. The study then trains every condition for that many steps with its usual schedule.

    Returns (and keeps in ``study/steps.json``, reused on a re-run, and by another design with
    the same :func:`calibration_key`):
        n_real -> {"epochs", "steps", "plateau" (False: still rising at ``max_epochs``, so the
        study trains all of them), "curve": [[steps, val_dice], ...]}.
    """
    if not train_cfg.samples_per_epoch:
        raise ValueError("calibrate_steps: set samples_per_epoch, so every condition's epoch has the same steps")
    path = run.run_dir / "study" / "steps.json"
    saved = read_json(path) if path.is_file() else {}
    key = calibration_key(design, model_cfg, train_cfg, max_epochs)
    if saved and design.id != saved.get("design") and key != saved.get("calibration"):
        raise ValueError(f"{path} was calibrated for study design {saved.get('design')} with other validation "
                         f"patients, pool or training settings than design {design.id}")
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
        write_json(path, {"design": design.id, "calibration": key, "steps": out})
        shutil.rmtree(run.run_dir / "study" / "work" / f"calibrate_n{n}", ignore_errors=True)
    return {n: out[n] for n in design.n_real}


def _patients(slices: SliceSet, patients: list[str]) -> SliceSet:
    return slices.subset(np.flatnonzero(np.isin(slices.case_ids, patients)))


def record_key(r: dict[str, Any]) -> tuple:
    """What identifies a record's condition and cell: one record per key in a study."""
    return (r["strategy"], r["shapes"], r["filtered"], float(r["ratio"]), r.get("arm"), r["n_real"], r["seed"])


def load_records(path: Path, design: StudyDesign) -> list[dict[str, Any]]:
    """The records of ``path``; ValueError if any was written by another design."""
    records = read_json(path) if path.is_file() else []
    if foreign := sorted({str(r.get("design")) for r in records} - {design.id}):
        raise ValueError(f"{path} holds records of study design(s) {foreign}, not {design.id} (other test patients "
                         "or grid); use another run_dir or delete the file to start over")
    return records


def unfinished_records(study_dir: Path, design: StudyDesign) -> list[dict[str, Any]]:
    """The records of finished conditions of cells still running or interrupted (``records.json`` in
    their work folders under ``study_dir``), which the driver has not merged yet."""
    records = [r for path in sorted(study_dir.glob("work/n*_s*/records.json")) for r in read_json(path)]
    if foreign := sorted({str(r.get("design")) for r in records} - {design.id}):
        raise ValueError(f"{study_dir / 'work'} holds records of study design(s) {foreign}, not {design.id}")
    return records


def add_records(path: Path, new: list[dict[str, Any]], design: StudyDesign) -> list[dict[str, Any]]:
    """Merge ``new`` records into ``path`` under its lock (:func:`update_json`): what
    another process wrote meanwhile is kept, and a condition already recorded is not added twice.
    Returns every record of the file."""
    def merge(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if foreign := sorted({str(r.get("design")) for r in records + new} - {design.id}):
            raise ValueError(f"{path}: records of study design(s) {foreign}, not {design.id}")
        have = {record_key(r) for r in records}
        return records + [r for r in new if record_key(r) not in have]

    return update_json(path, merge, default=[])


@dataclass
class _Pool:
    """A cell's synthetic pairs of one (generator, mask source, filter) and what was measured on them."""

    slices: SliceSet
    info: dict[str, Any]  # kept_share, unique_share, quality (the generator's row against the validation patients)


@dataclass
class _Cell:
    """What one (n_real, seed) cell shares between its conditions."""

    n: int
    seed: int
    real: SliceSet
    work: Path
    real_model: torch.nn.Module | None = None
    generators: dict[str, Any] = field(default_factory=dict)
    stopped: dict[str, str | None] = field(default_factory=dict)  # why a generator stopped before its epochs
    shape_model: ShapeModel | None = None
    pools: dict[tuple[str, str, bool], _Pool] = field(default_factory=dict)


def run_cell(run: Run, design: StudyDesign, n: int, seed: int, model_cfg: ModelConfig, train_cfg: TrainConfig,
             steps: dict[int, dict[str, Any]], generator_cfg: gan.SPADEGANConfig | diffusion.DiffusionConfig,
             vae_cfg: vae.VAEConfig, *, arm_cfg: gan.SPADEGANConfig | diffusion.DiffusionConfig | None = None,
             shape_cfg: ShapeModelConfig | None = None, generator_samples: int | None = None, device: str = "cpu",
             done: frozenset[tuple] = frozenset(), progress: bool = True) -> list[dict[str, Any]]:
    """Train and score the conditions of cell ``(n, seed)`` that are not in ``done`` (keys of
    records already written); returns their records. The conditions share the cell's real-only
    U-Net (the sample filter and the reference of the generators' quality), image generators
    (``generator_cfg`` for the design's, ``arm_cfg`` for its second arm) and shape model. Pure
    apart from the cell's own folder ``study/work/n<n>_s<seed>``, where finished trainings and
    generators are kept until the caller has saved the records, so a cell that is interrupted and
    run again resumes: the records of its finished conditions wait in ``records.json`` there, and
    each condition's training folder is removed once it is scored. No U-Net's weights are written (real
    only's, which the filter of a resumed cell needs, is trained again, to the same weights)."""
    work = cell_folder(run, n, seed)
    partial = work / "records.json"  # conditions an earlier try of this cell finished
    records = [r for r in (read_json(partial) if partial.is_file() else []) if record_key(r) not in done]
    have = done | {record_key(r) for r in records}
    todo = [c for c in design.conditions(n) if record_key(_fields(c, n, seed)) not in have]
    if not todo:
        return records
    if design.arm and arm_cfg is None and any(c.arm for c in todo):
        raise ValueError(f"cell n={n} seed={seed}: the design's second arm {design.arm!r} needs its arm_cfg")
    train, val, test = run.slices("train"), run.slices("val"), run.slices("test")
    truths = truth_volumes(test)
    patients = design.subset(n, seed)
    cell = _Cell(n, seed, _patients(train, patients), work)
    cfg = replace(train_cfg, epochs=steps[n]["epochs"], seed=seed, device=device)
    gen_epochs = math.ceil(generator_samples / len(cell.real)) if generator_samples else generator_cfg.epochs
    gen_cfgs = {design.generator: replace(generator_cfg, epochs=gen_epochs)}
    if design.arm and arm_cfg is not None:
        gen_cfgs[design.arm] = replace(arm_cfg, epochs=gen_epochs)
    cell_vae_cfg = replace(vae_cfg, epochs=gen_epochs)
    code, machine = code_version(), hardware(torch.device(device))  # the commit and machine every record names
    for cond in design.conditions(n):  # real only first: the filter and the quality table use its U-Net
        finished = cond not in todo
        if finished and (cond.strategy != "real" or not any(c.synthetic for c in todo)):
            continue
        t0 = time.perf_counter()  # a finished real-only U-Net is reloaded from the cell's folder
        scores, extra = _train_condition(cond, cell, cfg, run, design, model_cfg, val, test, truths,
                                         gen_cfgs, cell_vae_cfg, shape_cfg, device)
        if finished:
            continue
        records.append(_fields(cond, n, seed) | {
            "dataset": design.dataset, "design": design.id, "generator": _generator_name(cond, design),
            "train_patients": patients, "test_dice": scores, "mean_dice": float(np.nanmean(list(scores.values()))),
            "steps": steps[n]["steps"], "train_seconds": time.perf_counter() - t0,
            "image_size": run.slice_cfg.image_size, "n_real_slices": len(cell.real),
            "generator_epochs": gen_epochs if _generator_name(cond, design) else None,
            "code": code, "hardware": machine, **extra})
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
    arm = f"_{cond.arm}" if cond.arm else ""
    return f"{cond.strategy}_r{cond.ratio:g}_{cond.shapes}_{'f' if cond.filtered else 'u'}{arm}"


def cell_folder(run: Run, n: int, seed: int) -> Path:
    """The work folder of cell ``(n, seed)``: trainings and generators until its records are saved."""
    return run.run_dir / "study" / "work" / f"n{n}_s{seed}"


def cell_jobs(run: Run, design: StudyDesign, records: list[dict[str, Any]], **cell_args: Any) -> list[Job]:
    """One :class:`Job` per cell with conditions not yet in ``records``, calling
    :func:`run_cell` with ``cell_args``."""
    done = frozenset(record_key(r) for r in records)
    return [Job(f"cell n={n} seed={seed}", run_cell, {"run": run, "design": design, "n": n, "seed": seed,
                                                       "done": done, **cell_args})
            for n, seed in design.cells()
            if any(record_key(_fields(c, n, seed)) not in done for c in design.conditions(n))]


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
              vae_cfg: vae.VAEConfig, *, arm_cfg: gan.SPADEGANConfig | diffusion.DiffusionConfig | None = None,
              shape_cfg: ShapeModelConfig | None = None, generator_samples: int | None = None, device: str = "cpu",
              engine: EngineConfig | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Run every cell of the design not yet recorded (``run`` from :func:`design_run`) on
    ``engine`` (:mod:`lib.common.engine`: default Ray on this machine or ``$RAY_ADDRESS``'s cluster); returns all
    records of ``study/results.json``. ``steps`` comes from :func:`calibrate_steps`.
    ``generator_samples``: slices each cell's generators (image generators and VAE) see in
    training, so a cell of 1 patient trains them as many steps as a cell of 20 (None: the
    configs' epochs). ``arm_cfg``: the settings of the design's second generator, if it has one.
    Raises ValueError for records of another design, RuntimeError naming the cells that failed
    (for example on a generator checkpoint in a cell's folder that was trained on other patients)."""
    records = load_records(run.run_dir / "study" / "results.json", design)
    jobs = cell_jobs(run, design, records, model_cfg=model_cfg, train_cfg=train_cfg, steps=steps,
                     generator_cfg=generator_cfg, vae_cfg=vae_cfg, arm_cfg=arm_cfg, shape_cfg=shape_cfg,
                     generator_samples=generator_samples, device=device, progress=progress)
    return run_cells(run, design, jobs, engine, progress)


def _fields(cond: Condition, n: int, seed: int) -> dict[str, Any]:
    return {"strategy": cond.strategy, "shapes": cond.shapes, "filtered": cond.filtered, "ratio": cond.ratio,
            "arm": cond.arm, "n_real": n, "seed": seed}


def _generator_name(cond: Condition, design: StudyDesign) -> str | None:
    return (cond.arm or design.generator) if cond.synthetic else "vae" if cond.strategy == "latent" else None


def _train_condition(cond: Condition, cell: _Cell, cfg: TrainConfig, run: Run, design: StudyDesign,
                     model_cfg: ModelConfig, val: SliceSet, test: SliceSet, truths: dict[str, np.ndarray],
                     gen_cfgs: dict[str, Any], vae_cfg: vae.VAEConfig, shape_cfg: ShapeModelConfig | None,
                     device: str) -> tuple[dict[str, float], dict[str, Any]]:
    """Train one condition of a cell; returns its per-patient test Dice and extra record fields."""
    name = _condition_name(cond)

    chosen: dict[str, int] = {}

    def train(slices: SliceSet, sub: str, train_cfg: TrainConfig, init: torch.nn.Module | None = None,
              **on_top: Any):  # no weights on disk: a cell's folder holds records, generators and pools
        folder = cell.work / "seg" / f"{name}{sub}"
        for _ in range(2):  # real only finished in an interrupted try keeps no weights: the filter needs them again
            result = fit(slices, val, model_cfg, train_cfg, folder, run.data_settings(), keep="none", init=init,
                         progress=False, **on_top)
            if result.model is not None:
                break
            shutil.rmtree(folder)
        chosen["best_epoch"] = result.best_epoch  # the epoch validation chose, of the last training
        return result.model

    if cond.strategy == "latent":
        vae_model, _ = vae.train_vae(cell.real.images.astype(np.float32), cell.real.masks,
                                     replace(vae_cfg, seed=cell.seed), device=device, out_dir=cell.work / "vae",
                                     keep_train_state=False, progress=False)
        steps = cfg.epochs * _epoch_steps(cfg)
        seg = latent.train_latent_segmenter(vae_model, cell.real.images.astype(np.float32), cell.real.masks,
                                            steps=steps, batch_size=cfg.batch_size, device=device, seed=cell.seed,
                                            progress=False)
        pred = torch.from_numpy(latent.predict_latent_segmenter(seg, test.images.astype(np.float32))).long()
        probs = torch.nn.functional.one_hot(pred, run.task.num_classes).permute(0, 3, 1, 2).float()
        return score_slices(probs, test, truths, run.labels), {}
    if cond.strategy == "real":
        model = train(cell.real, "", cfg)
        cell.real_model = model
        return _score(model, test, truths, run, device), dict(chosen)
    pool = _synthetic(cell, cond, design, gen_cfgs, shape_cfg, run, val, device)
    generator = cond.arm or design.generator
    n_synth = min(len(pool.slices), max(1, round(cond.ratio * len(cell.real))))
    synth = pool.slices.subset(np.arange(n_synth))
    extra = {"n_synthetic_slices": n_synth, "synthetic_kept_share": pool.info["kept_share"],
             "synthetic_unique_share": n_synth / max(1, round(cond.ratio * len(cell.real))),
             "generator_quality": pool.info["quality"], "generator_stopped": cell.stopped.get(generator)}
    if cond.strategy == "add":  # every real batch of real only, the synthetic slices on top
        model = train(cell.real, "", cfg, synthetic=synth,
                      synthetic_per_batch=max(1, round(cond.ratio * cfg.batch_size)))
    elif cond.strategy == "mix":  # synthetic slices take the place of some real ones in the same steps
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


MAX_DRAWS = 4  # rounds of generation before a cell settles for fewer unique synthetic pairs than it needs
QUALITY_MIN_PAIRS = 32  # pairs with foreground the quality table needs to measure a generator


def draw_until(draw: Callable[[int, int], pairs.Filtered | None], need: int, filtered: bool,
               first_round: int = 0) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Rounds of ``draw(n, round)`` (at most :data:`MAX_DRAWS`, numbered from ``first_round``)
    until ``need`` pairs are kept, twice the missing pairs a round when a filter drops some:
    the kept images and masks (at most ``need``; empty when none was kept), the pairs drawn and
    the pairs the filter passed."""
    images, masks, drawn, passed = [], [], 0, 0
    for round_ in range(first_round, first_round + MAX_DRAWS):
        missing = need - sum(len(m) for m in masks)
        if missing <= 0:
            break
        n = 2 * missing if filtered else missing
        kept = draw(n, round_)
        drawn += n
        if kept is not None:
            passed += int(kept.kept.sum())
            images.append(kept.images[:missing])
            masks.append(kept.masks[:missing])
    if not masks:
        return np.empty((0,)), np.empty((0,)), drawn, passed
    return np.concatenate(images), np.concatenate(masks), drawn, passed


def top_up_foreground(draw: Callable[[int, int], pairs.Filtered | None], pool: tuple[np.ndarray, np.ndarray],
                      min_pairs: int, filtered: bool) -> tuple[np.ndarray, np.ndarray]:
    """The pool's pairs for the quality table, with more drawn (rounds after the pool's, for the
    measurement only) when fewer than ``min_pairs`` of them have foreground, so that a small
    pool's generator is measured too."""
    images, masks = pool
    have = len(with_foreground(images, masks)[1])
    if have >= min_pairs:
        return pool
    share = max(have / len(masks), 0.1)  # the pool's foreground share: how many pairs give the missing ones
    need = min(math.ceil((min_pairs - have) / share), 4 * min_pairs)  # a pool of empty masks costs no more
    more_images, more_masks, _, _ = draw_until(draw, need, filtered, first_round=MAX_DRAWS)
    if not len(more_masks):
        return pool
    return np.concatenate([images, more_images]), np.concatenate([masks, more_masks])


def _generator(cell: _Cell, name: str, cfg: Any, device: str) -> Any:
    """The cell's image generator ``name``, trained on its real slices (once; resumed from its folder)."""
    if name not in cell.generators:
        train_fn, _, kind = IMAGE_GENERATORS[name]
        out_dir = cell.work / name
        try:
            cell.generators[name], _ = train_fn(cell.real.images.astype(np.float32), cell.real.masks,
                                                replace(cfg, seed=cell.seed), device=device, out_dir=out_dir,
                                                keep_train_state=False, progress=False)
            cell.stopped[name] = None
        except TrainingCollapsed as err:  # on one patient's slices a discriminator can win: keep the last good epoch
            cell.generators[name] = load_generator(kind, out_dir / f"{kind.KIND}.pt", device)[0]
            cell.stopped[name] = str(err)
    return cell.generators[name]


def _synthetic(cell: _Cell, cond: Condition, design: StudyDesign, gen_cfgs: dict[str, Any],
               shape_cfg: ShapeModelConfig | None, run: Run, val: SliceSet, device: str) -> _Pool:
    """The cell's pool of unique synthetic pairs for the condition's generator, mask source and
    filter: as many as its largest ratio needs (ratio x the cell's real slices), drawn in rounds
    of new masks and images until the filter has kept enough (at most :data:`MAX_DRAWS`; a pool
    that stays short is used as it is, never repeated, and its records say so). Kept in the
    cell's folder, so a resumed cell trains on the same pairs, with the generator's quality
    table row against the validation patients (never the test ones), measured on the pool's
    pairs and, where fewer than :data:`QUALITY_MIN_PAIRS` of them have foreground, on pairs
    drawn for the measurement only (``extra_pairs``)."""
    generator = cond.arm or design.generator
    key = (generator, cond.shapes, bool(cond.filtered))
    if key in cell.pools:
        return cell.pools[key]
    masks = cell.real.masks
    need = max(max(1, round(c.ratio * len(cell.real))) for c in design.conditions(cell.n)
               if c.synthetic and (c.arm or design.generator, c.shapes, bool(c.filtered)) == key)
    file = cell.work / f"synthetic_{generator}_{cond.shapes}_{'f' if cond.filtered else 'u'}.npz"
    if not file.is_file():
        if cell.real_model is None:
            raise RuntimeError("the sample filter and the quality table need the cell's real-only U-Net; train it first")
        if cell.shape_model is None and cond.shapes == "new":  # only to draw new pairs: a saved pool needs none
            cell.shape_model = ShapeModel.fit(masks, run.task.num_classes, replace(shape_cfg or ShapeModelConfig(),
                                                                                 seed=cell.seed))
        model = _generator(cell, generator, gen_cfgs[generator], device)
        generate = IMAGE_GENERATORS[generator][1]
        predict = workflow.predict_masks_fn(cell.real_model, device)

        def draw(n: int, round_: int) -> pairs.Filtered | None:
            try:
                return pairs.make_pairs(generate, model, cond.shapes, n, cell.seed * 1000 + round_,
                                        shape_model=cell.shape_model, train_masks=masks,
                                        num_classes=run.task.num_classes, device=device,
                                        predict_fn=predict if cond.filtered else None, threshold=design.filter_threshold)
            except ValueError:  # the filter kept none of this round
                return None

        images, kept_masks, drawn, passed = draw_until(draw, need, bool(cond.filtered))
        if not len(kept_masks):
            raise RuntimeError(f"cell n={cell.n} seed={cell.seed}: the filter kept none of {drawn} synthetic pairs "
                               f"of {generator} in {MAX_DRAWS} rounds")
        measured = top_up_foreground(draw, (images, kept_masks), QUALITY_MIN_PAIRS, bool(cond.filtered))
        quality = quality_table((cell.real.images, masks), (val.images, val.masks), {generator: measured},
                                predict, cell.real_model.encoder, new_masks={generator} if cond.shapes == "new" else set(),
                                device=device, max_samples=256, min_pairs=QUALITY_MIN_PAIRS, seed=cell.seed)
        row = quality[generator] | {"real_frechet": quality["real"]["frechet"],
                                    "real_mask_agreement": quality["real"]["mask_agreement"],
                                    "extra_pairs": len(measured[0]) - len(images)}
        save_pairs(file, images, kept_masks, {"kept_share": passed / drawn,
                                              "seed": cell.seed, "quality": row})
    with np.load(file) as z:
        info = json.loads(str(z["meta"]))
    cell.pools[key] = _Pool(load_pairs(file, source=f"synthetic_{generator}"),
                            {"kept_share": info["kept_share"], "quality": info["quality"]})
    return cell.pools[key]


def read_steps(path: Path) -> dict[int, dict[str, Any]]:
    """The steps chosen by :func:`calibrate_steps` (``study/steps.json``), by patient count."""
    return {int(n): s for n, s in read_json(path)["steps"].items()}
