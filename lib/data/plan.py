"""The settings of a run, planned from the dataset's fingerprint and the preset's budget (as nnU-Net
plans from its fingerprint). Every field carries the reason it was chosen; a parameter given
explicitly wins, and the plan says so.

Rules (``fp``: :mod:`lib.data.fingerprint`; ``budget``: :data:`lib.common.presets.BUDGETS`):

* **Target spacing**: volumes are resampled to the median in-plane spacing (nnU-Net); a 2D image
  folder has none (each image is scaled whole, aspect ratio kept); the demo budget resizes whole
  slices.
* **Locator (roi)**: the crop must hold the structure (every class as one, 90th percentile of its
  longer in-plane extent) plus 25 % context, rounded up to a multiple of 32 and at least 64 px. A
  locator pays when that crop is at most half the field of view (the largest scan at the target
  spacing, a multiple of 32): the network then sees a quarter of the pixels or fewer. Never for 2D
  folders (images are segmented whole, borders kept) or the demo budget.
* **Image size**: the crop with a locator, else the whole field of view at the target spacing
  (2D folders and the demo: the median longer side), at most the budget's ``max_image_size``;
  a volume too large for it is resampled more coarsely (the plan says by how much). An image
  size given explicitly is the crop when the structure with context fits it (and the locator
  pays), else the whole slice, resampled so that the field of view fits it.
* **Batch size**: the largest power of two (up to the budget's ``max_batch``) whose training
  activations fit the budget's memory, at :data:`BYTES_PER_PIXEL` per pixel of a slice.
* **Context slices (2.5D)**: one neighbour on either side for volumes whose structure spans at
  least 3 slices (median); none for 2D folders or the demo.
* **Normalisation**: CT (dataset.json) is clipped to a window from the training patients'
  labelled voxels (0.5-99.5 percentiles, :func:`lib.data.slices.ct_window_from_data`); anything
  else is clipped to its own 0.5-99.5 percentiles and z-scored. A modality the intensities
  contradict (HU-like or not) is named in the reason.
* **Time**: the budget's minutes; the epochs are capped only by the demo budget (or the time
  decides); the locator gets 10 % of the time. Early stopping needs ``patience`` epochs *and*
  a third of the time budget without a better validation Dice, so a run never stops in the
  first third of its budget.
* **TTA, learning-rate search, architecture variants, generators' training state**: from the budget.

The plan is saved as ``<run_dir>/plan.json`` and travels in every checkpoint trained with it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lib.common.atomic import write_json
from lib.common.paths import run_dir as resolve_run_dir
from lib.common.presets import UNCAPPED_EPOCHS, budget
from lib.data.fingerprint import dataset_fingerprint
from lib.data.source import resolve_task

PLAN_VERSION = 1
FILE_NAME = "plan.json"
STEP = 32  # image sizes are multiples of 32: five halvings of the encoder
MIN_CROP = 64  # a smaller crop leaves the encoder's deepest stage at one pixel
CONTEXT = 0.25  # share of the structure's extent added around it in a crop
LOCATOR_SHARE = 0.5  # a locator pays when the crop is at most this share of the field of view (per side)
LOCATOR_TIME = 0.1  # share of the time budget that trains the locator
PATIENCE_EPOCHS = 15
PATIENCE_TIME = 1 / 3  # share of the time budget without a better validation Dice before early stopping
# Training memory of a ResNet-18 U-Net per pixel of a slice: measured 1.6-1.9 kB in fp32 on a CPU
# (peak resident memory of forward + backward at 128 and 256 px), with headroom.
BYTES_PER_PIXEL = 2500
# The fields a plan sets, in the order they are decided; notebooks' parameters of the same names.
PLANNED = ("time_budget_min", "epochs", "spacing", "roi", "image_size", "context_slices", "batch_size",
           "roi_minutes", "patience", "patience_minutes", "tta", "normalisation", "ct_window",
           "hp_lrs", "hp_epochs", "variant_epochs", "variants", "keep_train_state")


def round_up(n: float, step: int = STEP) -> int:
    """``n`` rounded up to a multiple of ``step`` (at least ``step``)."""
    return max(step, step * math.ceil(n / step - 1e-9))


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else repr(value) if isinstance(value, str) else str(value)


@dataclass
class Plan:
    """A run's settings with their reasons.

    Attributes:
        preset: the budget's name.
        fields: name -> {"value", "reason", "given"} (given: set by an explicit parameter).
        fingerprint: the dataset fingerprint it was made from.
    """

    preset: str
    fields: dict[str, dict[str, Any]]
    fingerprint: dict[str, Any] = field(repr=False)

    @property
    def values(self) -> dict[str, Any]:
        """Every field's value."""
        return {name: f["value"] for name, f in self.fields.items()}

    @property
    def given(self) -> list[str]:
        """The fields set by explicit parameters instead of the plan."""
        return [name for name, f in self.fields.items() if f["given"]]

    def fill(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The plan's value of every parameter in ``params`` left at None (not given)."""
        return {name: f["value"] for name, f in self.fields.items() if name in params and params[name] is None}

    def to_dict(self) -> dict[str, Any]:
        """The plan as saved in ``plan.json`` and in checkpoints."""
        fp = self.fingerprint
        return {"version": PLAN_VERSION, "preset": self.preset, "budget": budget(self.preset),
                "dataset": fp.get("dataset"), "folder": fp.get("folder"), "kind": fp.get("kind"),
                "fingerprint_key": fp.get("source_key"), "given": self.given, "fields": self.fields}

    def save(self, path: str | Path) -> Path:
        """Write ``plan.json`` atomically."""
        return write_json(path, self.to_dict())

    def table(self) -> Any:
        """The plan as a table: value, who chose it (plan or given) and why."""
        import pandas as pd

        rows = {name: {"value": _show(f["value"]), "chosen by": "given" if f["given"] else f"plan ({self.preset})",
                       "reason": f["reason"]} for name, f in self.fields.items()}
        return pd.DataFrame.from_dict(rows, orient="index")

    def __str__(self) -> str:
        shown = ("image_size", "spacing", "roi", "context_slices", "batch_size", "time_budget_min", "epochs",
                 "patience_minutes", "tta", "normalisation")
        parts = [f"{name} {_show(self.fields[name]['value'])}{' (given)' if self.fields[name]['given'] else ''}"
                 for name in shown]
        return f"plan for {self.fingerprint.get('folder')} ({self.preset} budget): " + ", ".join(parts)


def plan_problem(plan: Any) -> str | None:
    """What makes ``plan`` (as :meth:`Plan.to_dict` gives it, e.g. read from a checkpoint)
    unusable, or None when it is well formed."""
    if not isinstance(plan, dict):
        return f"is a {type(plan).__name__}, not an object"
    fields = plan.get("fields")
    if not isinstance(fields, dict):
        return "has no fields"
    for name, entry in fields.items():
        if not isinstance(entry, dict) or not {"value", "reason", "given"} <= set(entry):
            return f"field {name!r} lacks a value, reason or given flag"
    return None


def _geometry(fp: dict[str, Any], b: dict[str, Any], preset: str, given: Mapping[str, Any]
              ) -> dict[str, tuple[Any, str]]:
    """Target spacing, locator and image size with their reasons (see the module docstring)."""
    biggest = b["max_image_size"]
    unit = fp.get("spacing_unit", "mm")
    if fp["kind"] == "2d" or not b["resample"]:
        side = fp["longer_side_px"]["median"]
        size = min(biggest, round_up(side))
        why = "2D images are scaled whole" if fp["kind"] == "2d" else f"the {preset} budget resizes whole slices"
        return {
            "spacing": (False, f"{why} (no target spacing)"),
            "roi": (False, "2D images are segmented whole, borders kept (no locator)" if fp["kind"] == "2d"
                    else f"the {preset} budget trains no locator"),
            "image_size": (size, f"{why}: median longer side {side:g} px, the {preset} budget allows at most "
                                 f"{biggest} px"),
        }
    median = fp["in_plane_spacing_mm"]["median"]
    spacing, spacing_why = median, f"median in-plane spacing of the {fp['cases']} scans, as nnU-Net"
    target = given.get("spacing", median)
    target = median if target == "median" or target is True else target
    if target is False:  # given: whole slices, no target spacing
        return {"spacing": (spacing, spacing_why), "roi": (False, "no target spacing: crops need one"),
                "image_size": (min(biggest, round_up(fp["longer_side_px"]["median"])),
                               f"whole slices resized; the {preset} budget allows at most {biggest} px")}
    target = float(target)
    fov_mm = max(fp["field_of_view_mm"]["max"])
    structure = fp["foreground"]["all"]
    extent_mm = structure["longer_in_plane_mm"]["p90"] if structure["cases"] else fov_mm
    canvas = round_up(fov_mm / target)
    needed = extent_mm * (1 + CONTEXT) / target  # structure + context, pixels at the target spacing
    crop = max(MIN_CROP, round_up(needed))
    decided = int(given["image_size"]) if "image_size" in given else crop  # an explicit size is the crop
    if not b["locator"]:
        roi, roi_why = False, f"the {preset} budget trains no locator"
    elif needed <= decided <= LOCATOR_SHARE * canvas:
        roi, roi_why = True, (f"the structure (90th percentile {extent_mm:.0f} {unit}, {extent_mm / target:.0f} px) "
                              f"with {CONTEXT:.0%} context fits a {decided} px crop, at most half of the {canvas} px "
                              f"field of view: a locator finds it and the network sees "
                              f"{decided * decided / canvas ** 2:.0%} of the pixels")
    elif needed > decided:
        roi, roi_why = False, (f"the structure (90th percentile {extent_mm:.0f} {unit}) with {CONTEXT:.0%} context "
                               f"needs {needed:.0f} px, more than a {decided} px crop: whole slices")
    else:
        roi, roi_why = False, (f"the structure (90th percentile {extent_mm:.0f} {unit}) with {CONTEXT:.0%} context "
                               f"needs {decided} px, more than half of the {canvas} px field of view: whole slices")
    roi_used = given.get("roi", roi)
    size = crop if roi_used else canvas
    size_why = (f"crop around the structure ({extent_mm:.0f} {unit} + {CONTEXT:.0%} context at {target:g} mm)"
                if roi_used else f"the largest field of view ({fov_mm:.0f} mm) at {target:g} mm")
    # A whole slice larger than the budget's (or the given) size, or a crop larger than the budget's, is
    # resampled more coarsely so that it fits; a given spacing, or a given crop size, is kept.
    limit = int(given["image_size"]) if "image_size" in given else biggest
    if size > limit and "spacing" in given:
        size_why += f", more than {limit} px at the given spacing"
    elif size > limit and not (roi_used and "image_size" in given):
        coarser = math.ceil(target * (needed if roi_used else fov_mm / target) / limit * 1000) / 1000
        spacing_why += f", coarsened to {coarser:g} mm so that the {size} px it needs fits {limit} px"
        spacing, size = coarser, limit
        size_why += f": {limit} px at {coarser:g} mm"
    return {"spacing": (spacing, spacing_why), "roi": (roi, roi_why), "image_size": (size, size_why)}


def _normalisation(fp: dict[str, Any]) -> tuple[str, str]:
    """The intensity normalisation and why, naming a modality the intensities contradict."""
    mod, first = fp["modality"], fp["intensity"]["0"]
    if mod["is_ct"]:
        inside = first.get("foreground") or {}
        why = ("CT: clipped to a window from the training patients' labelled voxels (0.5-99.5 percentiles, "
               "nnU-Net)")
        if inside:
            why += f"; over all patients those are {inside['0.5']:g} to {inside['99.5']:g}"
        if not mod["intensities_look_like_hu"]:
            why += f" (but the intensities do not look like HU: 0.5 percentile {first['all']['0.5']:g})"
        return "ct_window", why
    why = "not CT: each scan clipped to its 0.5-99.5 percentiles and z-scored"
    if mod["intensities_look_like_hu"]:
        why += (f" (the intensities look like HU, 0.5 percentile {first['all']['0.5']:g}: declare the modality CT "
                "in dataset.json for a HU window)")
    return "zscore", why


def make_plan(fingerprint: dict[str, Any], preset: str, given: Mapping[str, Any] | None = None) -> Plan:
    """Plan a run's settings from a dataset fingerprint and a preset's budget (rules: module docstring).

    Args:
        fingerprint: :func:`lib.data.fingerprint.dataset_fingerprint`.
        preset: "demo", "cpu" or "gpu" (:data:`lib.common.presets.BUDGETS`).
        given: parameters set explicitly; None values count as not given. They win, later
            decisions follow them (an explicit image size sets the batch size), and the plan
            records each with what it would have chosen.

    Raises:
        ValueError: an unknown preset.
    """
    b = budget(preset)
    given = {k: v for k, v in (given or {}).items() if k in PLANNED and v is not None}
    fields: dict[str, dict[str, Any]] = {}

    def put(name: str, value: Any, reason: str) -> Any:
        if name in given:
            fields[name] = {"value": given[name], "given": True,
                            "reason": f"given explicitly (the plan: {_show(value)}; {reason})"}
        else:
            fields[name] = {"value": value, "given": False, "reason": reason}
        return fields[name]["value"]

    fp, is_2d = fingerprint, fingerprint["kind"] == "2d"
    minutes = put("time_budget_min", b["time_budget_min"], f"the {preset} budget")
    if b["epochs"] is None:
        put("epochs", UNCAPPED_EPOCHS, "no cap: the time budget decides")
    elif "time_budget_min" in given:
        put("epochs", UNCAPPED_EPOCHS, "a time budget given explicitly is spent: no epoch cap")
    else:
        put("epochs", b["epochs"], f"the {preset} budget: {b['epochs']} epochs (or {minutes:g} minutes)")
    geometry = _geometry(fp, b, preset, given)
    put("spacing", *geometry["spacing"])
    roi = put("roi", *geometry["roi"])
    size = int(put("image_size", *geometry["image_size"]))
    slices = fp["foreground_slices"]["slices_with_foreground"]["median"]
    if is_2d:
        put("context_slices", 0, "2D images have no neighbouring slices")
    elif not b["context"]:
        put("context_slices", 0, f"the {preset} budget feeds single slices")
    elif slices >= 3:
        put("context_slices", 1, f"2.5D: the structure spans {slices:g} slices (median; anisotropy "
                                 f"{fp['anisotropy']['median']:g}), so each slice gets a neighbour on either side")
    else:
        put("context_slices", 0, f"the structure spans {slices:g} slices (median): neighbours add little")
    per_slice = size * size * BYTES_PER_PIXEL
    fits = int(b["memory_gb"] * 1e9 // per_slice)
    batch = min(b["max_batch"], 2 ** int(math.log2(fits))) if fits >= 2 else 2
    put("batch_size", batch, f"{fits} slices of {size} px fit {b['memory_gb']:g} GB of training memory (about "
                             f"{per_slice / 1e6:.0f} MB each); the {preset} budget takes at most {b['max_batch']}"
        if fits >= 2 else f"{size} px slices need about {per_slice / 1e6:.0f} MB each, more than half of "
                          f"{b['memory_gb']:g} GB: 2 anyway (a smaller image_size would fit)")
    if roi:
        put("roi_minutes", round(LOCATOR_TIME * minutes, 2), f"{LOCATOR_TIME:.0%} of the time budget trains the locator")
    else:
        put("roi_minutes", 0.0, "no locator")
    put("patience", PATIENCE_EPOCHS, "epochs without a better validation Dice before early stopping")
    put("patience_minutes", round(PATIENCE_TIME * minutes, 2),
        f"and a third of the {minutes:g}-minute budget without a better validation Dice: training never stops "
        "early in the first third of its budget")
    put("tta", b["tta"], f"flip test-time augmentation {'on' if b['tta'] else 'off'} in the {preset} budget")
    scheme, why = _normalisation(fp)
    put("normalisation", scheme, why)
    put("ct_window", None, "from the training patients' labelled voxels when the run is prepared" if scheme == "ct_window"
        else "not CT")
    for name, what in (("hp_lrs", "learning rates tried"), ("hp_epochs", "epochs of each learning-rate trial"),
                       ("variant_epochs", "epochs of each architecture variant"),
                       ("variants", "architecture variants"),
                       ("keep_train_state", "generators keep their optimiser state (to be continued)")):
        put(name, b[name], f"{what} in the {preset} budget")
    return Plan(preset, fields, fingerprint)


def plan_run(preset: str, params: Mapping[str, Any], *, workers: int = 2, progress: bool = False) -> Plan:
    """The plan of a notebook run: fingerprint ``params["data"]`` (cached in the run folder
    ``params["run_dir"]``), plan it with every parameter in ``params`` that is not None as
    given, and save ``<run_dir>/plan.json``.

    Args:
        params: the notebook's parameters (``globals()``).
    """
    budget(preset)  # an unknown preset fails before any data is read
    task = resolve_task(params.get("data") or "demo")
    out = resolve_run_dir(params.get("run_dir"))
    fingerprint = dataset_fingerprint(task, out, workers=workers, progress=progress)
    plan = make_plan(fingerprint, preset, {k: params[k] for k in PLANNED if params.get(k) is not None})
    plan.save(out / FILE_NAME)
    return plan
