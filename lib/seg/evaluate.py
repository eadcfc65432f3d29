"""Score a trained model on the test patients, as the MSD challenge does.

Each prediction is resized back to its volume's original resolution and compared with
the original label file: per-patient 3D Dice, IoU and HD95 (mm), structure volumes,
per-slice Dice, inference time. Dice at the training resolution is reported as
``dice_train_res``. Writes ``metrics.json`` / ``metrics.csv``, one NIfTI prediction per
patient, and ``postprocessing.json`` measuring flip TTA and largest-component filtering.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from lib.common.atomic import read_json, write_json, write_with
from lib.data.slices import SliceSet
from lib.data.volumes import read_label
from lib.seg.inference import patient_probs, probs_to_original, save_prediction
from lib.seg.metrics import cross_entropy, dice, per_slice_dice, score_case, summarise
from lib.seg.postprocess import keep_largest_component, remove_small_pieces
from lib.seg.roi import Locator

VARIANTS = {"plain": (False, False), "lcc": (False, True), "tta": (True, False), "tta+lcc": (True, True)}


def _variant(tta: bool, lcc: bool) -> str:
    return {v: k for k, v in VARIANTS.items()}[(tta, lcc)]


def _json_floats(values: np.ndarray) -> list[float | None]:
    return [None if np.isnan(v) else float(v) for v in values]


def evaluate(
    model: nn.Module,
    test: SliceSet,
    labels: list[int],
    out_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    tta: bool = False,
    largest_component: bool = False,
    compare_postprocessing: bool = True,
    locator: Locator | None = None,
    pieces: dict[int, float] | None = None,
    swap: list[tuple[int, int]] | None = None,
    extra: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``model`` on every patient of ``test`` and write the results to ``out_dir``
    (``progress``: a bar over the patients).

    Args:
        test: test slices with their patients' geometry.
        labels: foreground class ids to score.
        tta, largest_component: post-processing used for the reported metrics.
        compare_postprocessing: also score the other TTA / largest-component variants.
        locator: the region-of-interest stage of a model trained on crops; ``test`` then
            holds whole canvas slices (see :func:`lib.seg.inference.patient_probs`).
        pieces: component filtering learned from training (:func:`lib.seg.postprocess.piece_thresholds`)
            applied where ``largest_component`` is on; None: keep each label's largest component.
        swap: class pairs that are mirror images, exchanged in flipped TTA copies.
        extra: added to metrics.json (e.g. training time, parameters).

    Returns:
        The metrics.json content: {"cases": {id: {...}}, "mean": {...}, ...}. Each case's
        ``per_slice_dice`` is the mean over ``labels`` on each axial slice; with several
        labels, ``per_slice_dice_by_class`` holds each label's: {str(label): [...]}.
    """
    out_dir = Path(out_dir)
    chosen = _variant(tta, largest_component)
    cases: dict[str, dict[str, Any]] = {}
    variants: dict[str, dict[str, dict[str, float]]] = {name: {} for name in VARIANTS}
    for cid, meta in tqdm(test.cases.items(), desc="evaluating test patients", unit="patient",
                          disable=not progress or len(test.cases) < 2):
        sl = test.patient(cid)
        truth = read_label(meta.label_path)
        t0 = time.perf_counter()
        probs = {False: patient_probs(model, sl.images, locator=locator, device=device, case=cid)}
        plain_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        if tta or compare_postprocessing:
            probs[True] = patient_probs(model, sl.images, locator=locator, device=device, tta=True, swap=swap or (),
                                        case=cid)
        tta_seconds = time.perf_counter() - t0
        original = {flag: probs_to_original(p, meta) for flag, p in probs.items()}
        for name, (v_tta, v_lcc) in VARIANTS.items():
            if not (compare_postprocessing or name == chosen):
                continue
            volume = original[v_tta].argmax(1).to(torch.uint8).numpy().transpose(1, 2, 0)
            if v_lcc:
                volume = keep_largest_component(volume) if pieces is None else remove_small_pieces(volume, pieces)
            scores = score_case(volume, truth, meta.spacing, labels)
            variants[name][cid] = {k: scores[k] for k in ("dice", "iou", "hd95")}
            if name == chosen:
                pred_volume = volume
                cases[cid] = scores
        slice_pred = probs[tta].argmax(1).numpy()
        cases[cid].update(
            dice_train_res=float(np.nanmean([dice(slice_pred, sl.masks, k) for k in labels])),
            cross_entropy=cross_entropy(original[tta].permute(1, 2, 3, 0), truth),
            per_slice_dice=_json_floats(per_slice_dice(pred_volume, truth, label=labels)),
            inference_seconds=tta_seconds if tta else plain_seconds,
            spacing=list(meta.spacing),
            shape=list(meta.shape),
        )
        if len(labels) > 1:
            cases[cid]["per_slice_dice_by_class"] = {
                str(lab): _json_floats(per_slice_dice(pred_volume, truth, label=lab))
                for lab in labels
            }
        save_prediction(pred_volume, meta, out_dir / "predictions" / f"{cid}.nii.gz", len(labels) + 1)
    summary = summarise(cases)
    mean = summary["mean"] | {
        "dice_train_res": float(np.nanmean([c["dice_train_res"] for c in cases.values()])),
        "inference_seconds_per_volume": float(np.mean([c["inference_seconds"] for c in cases.values()])),
    }
    result = {
        "cases": cases,
        "mean": mean,
        "std": summary["std"],
        "n_cases": len(cases),
        "postprocessing": {"tta": tta, "largest_component": largest_component,
                           "piece_thresholds": None if pieces is None else {str(k): v for k, v in pieces.items()}},
        **(extra or {}),
    }
    write_json(out_dir / "metrics.json", result)
    table = metrics_table(result)
    write_with(out_dir / "metrics.csv", lambda p: table.to_csv(p, index=True))
    if compare_postprocessing:
        write_json(out_dir / "postprocessing.json", {k: summarise(v) | {"cases": v} for k, v in variants.items()})
    return result


def metrics_table(result: dict[str, Any]) -> pd.DataFrame:
    """One row per test patient, a mean row and an ``n_inf`` row.

    As in :func:`lib.seg.metrics.summarise`, the mean leaves out infinite values (an HD95 with a
    missed or spurious structure); ``n_inf`` counts them per column.
    """
    keys = ["dice", "iou", "hd95", "pred_volume_ml", "true_volume_ml", "pred_area", "true_area", "pixel_accuracy",
            "cross_entropy", "dice_train_res", "inference_seconds"]
    rows = {cid: {k: c[k] for k in keys if k in c} for cid, c in result["cases"].items()}
    table = pd.DataFrame.from_dict(rows, orient="index")
    numeric = table.select_dtypes("number")
    infinite = np.isinf(numeric)
    table.loc["mean"] = numeric.mask(infinite).mean()
    table.loc["n_inf"] = infinite.sum()
    return table


def class_table(result: dict[str, Any], names: dict[str, str] | None = None) -> pd.DataFrame:
    """Per foreground class over the test cases: mean and sd of Dice, mean IoU, mean finite
    HD95 with the count of infinite ones (a class missed or invented), and the mean true size.

    Args:
        result: metrics.json content; ``names``: class names by label (str) for the index.
    """
    rows: dict[str, dict[str, float]] = {}
    cases = list(result["cases"].values())
    labels = sorted({k for c in cases for k in c.get("per_label", {})}, key=int)
    if not labels:  # one foreground class: the case scores are its scores
        per_case = {"1": cases}
    else:
        per_case = {lab: [c["per_label"][lab] for c in cases if lab in c.get("per_label", {})] for lab in labels}
    for lab, scores in per_case.items():
        hd = np.array([s["hd95"] for s in scores], dtype=float)
        size = next((k for k in ("true_volume_ml", "true_area") if k in scores[0]), None)
        rows[(names or {}).get(lab, f"class {lab}")] = {
            "dice": float(np.nanmean([s["dice"] for s in scores])),
            "dice_sd": float(np.nanstd([s["dice"] for s in scores])),
            "iou": float(np.nanmean([s["iou"] for s in scores])),
            "hd95": float(np.mean(hd[np.isfinite(hd)])) if np.isfinite(hd).any() else float("nan"),
            "hd95_n_inf": int(np.isinf(hd).sum()),
            **({f"mean_{size}": float(np.mean([s[size] for s in scores]))} if size else {}),
        }
    return pd.DataFrame.from_dict(rows, orient="index")


def postprocessing_table(out_dir: str | Path) -> pd.DataFrame:
    """Mean Dice / HD95 of each TTA / largest-component variant (from postprocessing.json)."""
    data = read_json(Path(out_dir) / "postprocessing.json")
    return pd.DataFrame({name: s["mean"] for name, s in data.items()}).T
