"""Does synthetic data help segmentation? The study of notebook 05.

The same U-Net is trained with real slices only, real + synthetic slices at several
ratios, and synthetic slices only, for several numbers of real training patients and
several seeds, and always scored on the same real test patients (per-patient 3D Dice at
the original resolution, as in :mod:`lib.evaluate`).

Fairness: each generator is trained on the *same* real patients the segmenter gets,
so a gain cannot come from patients the real-only baseline never saw; and every run
trains for the same number of steps (set ``samples_per_epoch`` in the TrainConfig), so
a gain cannot come from longer training on a larger set. Every run is one
record in ``study/results.json`` (written atomically after each run; a re-run skips the
records already there, so an interrupted study resumes). The study keeps records, not
models: each (n_real, seed) cell's segmenters, generators and synthetic slices are
deleted once its records are written, unless ``keep_checkpoints`` asks for them.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from lib import diffusion, vae
from lib.atomic import read_json, write_json
from lib.inference import predict_probs, probs_to_volume
from lib.metrics import dice, paired_bootstrap
from lib.models import ModelConfig
from lib.msd import read_label
from lib.pipeline import Run
from lib.slices import SliceSet, concat, load_pairs, save_pairs
from lib.train import TrainConfig, fit

GeneratorConfig = vae.VAEConfig | diffusion.DiffusionConfig


@dataclass
class Generator:
    """How to train, save and sample one kind of generative model."""

    train: Callable[..., tuple[Any, list[dict]]]
    sample: Callable[..., tuple[np.ndarray, np.ndarray]]


GENERATORS: dict[str, Generator] = {
    "vae": Generator(vae.train_vae, vae.sample_pairs),
    "diffusion": Generator(diffusion.train_diffusion, diffusion.sample_pairs),
}


def real_subset(run: Run, n_real: int, seed: int) -> list[str]:
    """``n_real`` training patients drawn by ``seed`` from the run's train split."""
    train_ids = list(run.split["train"])
    if not 1 <= n_real <= len(train_ids):
        raise ValueError(f"n_real={n_real}: the train split has {len(train_ids)} patients (need 1..{len(train_ids)})")
    return sorted(np.random.default_rng(seed).permutation(train_ids)[:n_real].tolist())


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


def train_generator(kind: str, train: SliceSet, cfg: GeneratorConfig, out_dir: Path, device: str) -> Any:
    """Train (or resume) generator ``kind`` on the slices of ``train``."""
    if kind not in GENERATORS:
        raise KeyError(f"unknown generator {kind!r}; choose one of {sorted(GENERATORS)}")
    model, _ = GENERATORS[kind].train(train.images.astype(np.float32), train.masks, cfg, device=device,
                                      out_dir=out_dir, progress=False)
    return model


def synthetic_set(kind: str, model: Any, n: int, seed: int, path: Path, device: str) -> SliceSet:
    """Sample ``n`` pairs (cached at ``path`` in the training format) and load them."""
    if not path.is_file():
        images, masks = GENERATORS[kind].sample(model, n, seed=seed, device=device)
        if not np.isfinite(images).all():
            raise FloatingPointError(f"{kind} produced non-finite samples; its training has diverged")
        save_pairs(path, images, masks, {"generator": kind, "seed": seed})
    return load_pairs(path, source=f"synthetic_{kind}")


def _key(r: dict[str, Any]) -> tuple:
    return (r["condition"], r["generator"], r["n_real"], r["ratio"], r["seed"])


def run_study(
    run: Run,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    generator_cfgs: dict[str, GeneratorConfig],
    n_real: list[int],
    ratios: list[float],
    seeds: list[int],
    *,
    synthetic_only: bool = True,
    latent_baseline: bool = True,
    keep_checkpoints: bool = False,
    progress: bool = True,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """Run every condition of the study; returns all records of ``study/results.json``.

    Conditions per (n_real, seed): "real" (real slices only, classic augmentation),
    "real+synthetic" for each generator and ratio (synthetic slices = ratio x real
    slices), "synthetic" (only synthetic slices, as many as the real slices), and
    "latent" (segmentation decoder on the VAE's detached latent code). A progress bar
    counts the (n_real, seed) cells.
    """
    out = run.run_dir / "study"
    path = out / "results.json"
    records: list[dict[str, Any]] = read_json(path) if path.is_file() else []
    done = {_key(r) for r in records}
    train, val, test = run.slices("train"), run.slices("val"), run.slices("test")
    truths = truth_volumes(test)

    def record(condition: str, generator: str | None, n: int, ratio: float, seed: int, patients: list[str],
               n_real_slices: int, n_synth: int, scores: dict[str, float], seconds: float) -> None:
        records.append({
            "condition": condition, "generator": generator, "n_real": n, "ratio": ratio, "seed": seed,
            "real_patients": patients, "n_real_slices": n_real_slices, "n_synthetic_slices": n_synth,
            "per_patient_dice": scores, "mean_dice": float(np.nanmean(list(scores.values()))),
            "seconds": seconds, "image_size": run.slice_cfg.image_size, "epochs": train_cfg.epochs,
            "samples_per_epoch": train_cfg.samples_per_epoch,
        })
        write_json(path, records)

    def segment(name: str, train_set: SliceSet, seed: int) -> tuple[dict[str, float], float]:
        t0 = time.perf_counter()
        result = fit(train_set, val, model_cfg, replace(train_cfg, seed=seed), out / "seg" / name,
                     run.data_settings(), keep="best" if keep_checkpoints else "none", progress=False)
        probs = predict_probs(result.model, test.images, device=device)
        return score_slices(probs, test, truths, run.labels), time.perf_counter() - t0

    cells = [(n, seed) for n in n_real for seed in seeds]
    for n, seed in tqdm(cells, desc="study cells (n_real, seed)", disable=not progress):
        patients = real_subset(run, n, seed)
        real = train.subset(np.flatnonzero(np.isin(train.case_ids, patients)))
        tag = f"n{n}_s{seed}"
        if ("real", None, n, 0.0, seed) not in done:
            scores, secs = segment(f"real_{tag}", real, seed)
            record("real", None, n, 0.0, seed, patients, len(real), 0, scores, secs)
        models = {}
        for kind, gcfg in generator_cfgs.items():
            wanted = [r for r in ratios if ("real+synthetic", kind, n, float(r), seed) not in done]
            need_synth_only = synthetic_only and ("synthetic", kind, n, None, seed) not in done
            need_latent = latent_baseline and kind == "vae" and ("latent", "vae", n, None, seed) not in done
            if not (wanted or need_synth_only or need_latent):
                continue
            models[kind] = train_generator(kind, real, replace(gcfg, seed=seed), out / "generators" / f"{kind}_{tag}",
                                           device)
            for ratio in wanted:
                n_synth = max(1, int(round(ratio * len(real))))
                synth = synthetic_set(kind, models[kind], n_synth, seed,
                                      out / "synthetic" / f"{kind}_{tag}_r{ratio:g}.npz", device)
                scores, secs = segment(f"{kind}_r{ratio:g}_{tag}", concat(real, synth), seed)
                record("real+synthetic", kind, n, float(ratio), seed, patients, len(real), n_synth, scores, secs)
            if need_synth_only:
                synth = synthetic_set(kind, models[kind], len(real), seed + 1000,
                                      out / "synthetic" / f"{kind}_{tag}_only.npz", device)
                scores, secs = segment(f"{kind}_only_{tag}", synth, seed)
                record("synthetic", kind, n, None, seed, patients, 0, len(synth), scores, secs)
            if need_latent:
                t0 = time.perf_counter()
                seg = vae.train_latent_segmenter(models[kind], real.images.astype(np.float32), real.masks,
                                                 epochs=train_cfg.epochs, device=device, seed=seed, progress=False)
                pred = vae.predict_latent_segmenter(seg, test.images)
                probs = torch.nn.functional.one_hot(torch.from_numpy(pred).long(), run.task.num_classes)
                scores = score_slices(probs.permute(0, 3, 1, 2).float(), test, truths, run.labels)
                record("latent", "vae", n, None, seed, patients, len(real), 0, scores, time.perf_counter() - t0)
        if not keep_checkpoints:
            for folder in ("seg", "generators", "synthetic"):
                shutil.rmtree(out / folder, ignore_errors=True)
    return records


def _label(r: pd.Series) -> str:
    if r["condition"] == "real":
        return "real only"
    if r["condition"] == "real+synthetic":
        return f"real + {r['generator']} x{r['ratio']:g}"
    if r["condition"] == "synthetic":
        return f"{r['generator']} only"
    return "VAE latent segmenter"


def study_table(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Mean, sd, min and max over seeds of the mean test Dice, per condition and n_real."""
    df = pd.DataFrame(records)
    df["setting"] = df.apply(_label, axis=1)
    table = df.groupby(["n_real", "setting"])["mean_dice"].agg(["mean", "std", "min", "max", "count"])
    return table.rename(columns={"count": "seeds"})


def study_figure(records: list[dict[str, Any]]) -> Figure:
    """Mean test Dice ± sd over seeds against the number of real training patients."""
    table = study_table(records).reset_index()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (setting, rows) in enumerate(table.groupby("setting")):
        x = rows["n_real"] + (i - 3) * 0.04
        ax.errorbar(x, rows["mean"], yerr=rows["std"].fillna(0), marker="o", capsize=3, label=setting,
                    lw=2.5 if setting == "real only" else 1.2)
    ax.set(xlabel="real training patients", ylabel="mean test Dice (± sd over seeds)", ylim=(0, 1))
    ax.set_xticks(sorted(table["n_real"].unique()))
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def _pairs(record: dict[str, Any], base: dict[str, Any]) -> list[float]:
    """Per-test-patient Dice differences of ``record`` against ``base`` (same seed and training
    subset); the mean Dice alone when a record has no per-patient scores."""
    a, b = record.get("per_patient_dice"), base.get("per_patient_dice")
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [record["mean_dice"] - base["mean_dice"]]
    return [a[p] - b[p] for p in sorted(set(a) & set(b))]


def _verdict(ci: dict[str, Any], seeds: int, min_seeds: int, min_pairs: int) -> str:
    if seeds < min_seeds:
        return "too few seeds"
    if ci["n"] < min_pairs:
        return "too few pairs"
    return {"higher": "helps", "lower": "hurts"}.get(ci["verdict"], ci["verdict"])


def study_conclusions(records: list[dict[str, Any]], n_boot: int = 10_000, seed: int = 0,
                      min_pairs: int = 6, min_seeds: int = 3) -> pd.DataFrame:
    """Each setting against "real only" at the same n_real: the mean paired difference in
    per-patient test Dice (paired by seed, hence training subset, and by test patient) with a 95 %
    bootstrap interval over the pairs (:func:`lib.metrics.paired_bootstrap`).

    The verdict is "helps" only when the interval is above 0, "hurts" only when it is below 0,
    otherwise "no clear difference". The interval holds training randomness only when several seeds
    (training subsets) enter it: with fewer than ``min_seeds`` seeds or ``min_pairs`` pairs the verdict
    says "too few seeds" or "too few pairs". Differences are in Dice points (x100).
    """
    df = pd.DataFrame(records)
    df["setting"] = df.apply(_label, axis=1)
    base = {(r["n_real"], r["seed"]): r for r in records if r["condition"] == "real"}
    rows = []
    for (n, setting), group in df[df["condition"] != "real"].groupby(["n_real", "setting"]):
        matched = [(r, base[(n, r["seed"])]) for r in group.to_dict("records") if (n, r["seed"]) in base]
        diffs = [d for r, b in matched for d in _pairs(r, b)]
        if not np.isfinite(diffs).any():
            continue
        ci = paired_bootstrap(diffs, n_boot=n_boot, seed=seed)
        rows.append({"n_real": n, "setting": setting, "delta_dice_points": 100 * ci["mean"],
                     "ci_low": 100 * ci["low"], "ci_high": 100 * ci["high"], "seeds": len(matched), "pairs": ci["n"],
                     "verdict": _verdict(ci, len(matched), min_seeds, min_pairs)})
    columns = ["n_real", "setting", "delta_dice_points", "ci_low", "ci_high", "seeds", "pairs", "verdict"]
    return pd.DataFrame(rows, columns=columns).set_index(["n_real", "setting"])
