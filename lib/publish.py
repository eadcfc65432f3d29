"""Publish a run folder for readers: ``results/<dataset>/`` with the executed notebooks, the
key figures, the machine-readable results, the run log and an index page, small enough for GitHub.

Only what a reader needs is copied: no checkpoints, caches or predictions. Every file is
written atomically, so publishing into an existing folder updates it file by file and an
interruption never leaves half a file. Images are downscaled until each file is at most
``MAX_FILE_BYTES``; absolute paths of the machine that ran are made relative.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import nbformat
import pandas as pd
from PIL import Image

from lib.common import viz
from lib.common.atomic import read_json, write_text, write_with
from lib.common.diary import RUN_LOG
from lib.common.paths import PROJECT_ROOT, relative_paths
from lib.seg.tables import comparison_table, cross_validation_table, paired_differences
from lib.study.analysis import (
    generator_quality_table,
    provenance_table,
    quality_figure,
    steps_figure,
    study_conclusions,
    study_figure,
    study_table,
    write_summary,
)
from lib.study.design import read_design

RESULTS_ROOT = PROJECT_ROOT / "results"
MAX_FILE_BYTES = 5 * 2**20  # GitHub renders notebooks and images of this size comfortably
MAX_DATASET_BYTES = 25 * 2**20
MAX_IMAGE_BYTES = 2**20  # one figure file
NOTEBOOK_IMAGE_BYTES = 2**18  # one image inside a published notebook (its figures are published as files too)
FIGURES = ("data/*.png", "comparison.png", "*/curves.png", "*/patient_*.png", "*/patient_*.gif",
           "generators/*.png", "study/*.png")
RECORDS = ("split.json", "*/metrics.json", "*/postprocessing.json", "*/history.json", "*/fit.json",
           "hp/*/fit.json", "hp/*/history.json", "generators/quality.json", "study/results.json",
           "study/summary.json", "study/design.json", "study/steps.json", "cross_validation.csv")
PUBLISHED_AS = {"generators": "synthesis"}  # run-folder sub-folders published under a reader's name


def published_path(relative: Path) -> Path:
    """Where a file of the run folder (path relative to it) goes in the results folder."""
    head, *rest = relative.parts
    return Path(PUBLISHED_AS.get(head, head), *rest)


def markdown_table(df: pd.DataFrame, digits: int = 3) -> str:
    """A DataFrame as a GitHub Markdown table (index included)."""
    df = df.reset_index().rename(columns={"index": ""})
    fmt = lambda v: f"{v:.{digits}f}" if isinstance(v, float) else str(v)  # noqa: E731
    rows = [[fmt(v) for v in row] for row in df.itertuples(index=False)]
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def shrink_image(data: bytes, limit: int = MAX_IMAGE_BYTES) -> bytes:
    """Downscale a PNG or (animated) GIF until it takes at most ``limit`` bytes.

    GIFs also drop every other frame while they are more than twice too large.
    """
    scale = 1.0
    while len(data) > limit:
        image = Image.open(io.BytesIO(data))
        scale *= max(0.5, min(0.9, math.sqrt(limit / len(data))))
        data = _encode(image, scale, drop_frames=image.format == "GIF" and len(data) > 2 * limit)
    return data


def _encode(image: Image.Image, scale: float, drop_frames: bool) -> bytes:
    out = io.BytesIO()
    size = (max(16, round(image.width * scale)), max(16, round(image.height * scale)))
    if image.format == "GIF":
        frames, durations = [], []
        for i in range(getattr(image, "n_frames", 1)):
            image.seek(i)
            if drop_frames and i % 2:
                continue
            frames.append(image.convert("RGB").resize(size, Image.Resampling.LANCZOS))
            durations.append(image.info.get("duration", 100) * (2 if drop_frames else 1))
        frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0)
    else:
        image.convert("RGBA" if image.mode in ("RGBA", "LA", "P") else "RGB").resize(
            size, Image.Resampling.LANCZOS).save(out, format="PNG", optimize=True)
    return out.getvalue()


def clean_notebook(path: Path, image_limit: int = NOTEBOOK_IMAGE_BYTES) -> str:
    """An executed notebook as JSON text: images shrunk, absolute paths made relative, widget
    state (which papermill does not keep working) dropped."""
    nb = nbformat.read(path, as_version=4)
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        cell.source = relative_paths(cell.source)
        for output in cell.get("outputs", []):
            if "text" in output:
                output["text"] = relative_paths(output["text"])
            for mime, value in output.get("data", {}).items():
                if mime in ("image/png", "image/gif"):
                    small = shrink_image(base64.b64decode(value), image_limit)
                    output["data"][mime] = base64.b64encode(small).decode()
                elif mime.startswith("text/"):
                    output["data"][mime] = relative_paths(value if isinstance(value, str) else "".join(value))
    params = nb.metadata.get("papermill", {}).get("parameters", {})
    for key, value in params.items():
        if isinstance(value, str):
            params[key] = relative_paths(value)
    for key in ("input_path", "output_path"):
        if key in nb.metadata.get("papermill", {}):
            nb.metadata.papermill[key] = relative_paths(str(nb.metadata.papermill[key]))
    return nbformat.writes(nb)


def notebook_parameters(path: Path) -> dict[str, Any]:
    """The parameters papermill injected into an executed notebook (paths made relative)."""
    params = nbformat.read(path, as_version=4).metadata.get("papermill", {}).get("parameters", {})
    return {k: relative_paths(v) if isinstance(v, str) else v for k, v in params.items()}


def _matches(run_dir: Path, patterns: Iterable[str]) -> list[Path]:
    """The run folder's files matching ``patterns``; a study that recorded no condition (a run of
    notebook 05 for its quality table only) is left out, so it never overwrites a published study."""
    study_ran = (run_dir / "study" / "results.json").is_file()
    return sorted({p for pattern in patterns for p in run_dir.glob(pattern)
                   if p.is_file() and (study_ran or p.relative_to(run_dir).parts[0] != "study")})


def publish(run_dir: str | Path, dataset: str | None = None, results_root: str | Path = RESULTS_ROOT,
            *, command: str | None = None) -> Path:
    """Copy what a reader needs from ``run_dir`` to ``results_root/<dataset>/`` and write its index.

    Args:
        dataset: folder name (default: the task folder named in ``run_dir/run.json``).
        command: the command that made the run, quoted in the index.

    Returns:
        The dataset's results folder.

    Raises:
        FileNotFoundError: ``run_dir`` is not a run folder (no ``run.json``).
        ValueError: a file or the whole folder is over the size limits after shrinking.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file():
        raise FileNotFoundError(f"{run_dir}: not a run folder (no run.json); run notebook 01 first")
    dataset = dataset or read_json(run_dir / "run.json")["task"]
    out = Path(results_root) / dataset
    written: list[Path] = []
    for nb in sorted((run_dir / "notebooks").glob("*.ipynb")):
        written.append(write_text(out / "notebooks" / nb.name, clean_notebook(nb)))
    for path in _matches(run_dir, FIGURES):
        data = shrink_image(path.read_bytes())
        written.append(write_with(out / published_path(path.relative_to(run_dir)), lambda p, d=data: p.write_bytes(d)))
    for path in _matches(run_dir, RECORDS):
        written.append(write_text(out / published_path(path.relative_to(run_dir)),
                                  relative_paths(path.read_text(encoding="utf-8"))))
    log = run_dir / RUN_LOG  # the automatic entries of lib.common.diary
    if log.is_file():
        written.append(write_text(out / RUN_LOG, merged_run_log(out / RUN_LOG, relative_paths(log.read_text(
            encoding="utf-8")))))
    written.append(write_text(out / "README.md", index_page(run_dir, out, dataset, command)))
    _check_sizes(out, written)
    refresh_parent_index(out, results_root)
    return out


CV_FILES = ("split_file.json", "{name}/metrics.json", "{name}/postprocessing.json", "{name}/history.json",
            "{name}/fit.json", "locator/history.json", "locator/fit.json")


def publish_cross_validation(root: str | Path, name: str, dataset: str, results_root: str | Path = RESULTS_ROOT,
                             *, command: str | None = None, folder: str = "cross_validation") -> Path:
    """Publish a cross-validation (``tools/cross_validate.py``) to ``results/<dataset>/<folder>/``:
    the per-patient table, each fold's records and curves, the first fold's executed notebook
    as an example, and an index
    naming the hardware and precision the folds trained on (from their ``fit.json``).

    Raises:
        FileNotFoundError: ``root`` holds no ``cross_validation.csv``.
    """
    root = Path(root)
    if not (root / "cross_validation.csv").is_file():
        raise FileNotFoundError(f"{root}: no cross_validation.csv; run tools/cross_validate.py first")
    out = Path(results_root) / dataset / folder
    folds = sorted(p for p in root.glob("fold_*") if (p / name / "metrics.json").is_file())
    written = [write_text(out / "cross_validation.csv", (root / "cross_validation.csv").read_text())]
    for fold in folds:
        for pattern in CV_FILES:
            path = fold / pattern.format(name=name)
            if path.is_file():
                written.append(write_text(out / fold.name / path.relative_to(fold), relative_paths(path.read_text())))
        for nb in fold.glob("*.ipynb") if fold == folds[0] else ():  # one executed fold as an example
            written.append(write_text(out / fold.name / nb.name, clean_notebook(nb)))
        curves = fold / name / "curves.png"
        if curves.is_file():
            data = shrink_image(curves.read_bytes())
            written.append(write_with(out / fold.name / name / "curves.png", lambda p, d=data: p.write_bytes(d)))
    table = cross_validation_table(folds, name)
    hardware = sorted({_fold_hardware(f, name) for f in folds})
    lines = [f"# Cross-validation: {name} on {dataset}", "",
             f"{len(folds)} folds, every patient tested once by a model that never saw it. Hardware and precision "
             f"of the training: {'; '.join(hardware) or 'not recorded'}. Made by:", "", "```bash",
             relative_paths(command or f"python tools/cross_validate.py --root {root}"), "```", "",
             "Per test patient: 3D Dice at the original resolution as the notebook reports it (`dice`, with its "
             "`tta` and component setting), HD95 in mm, the Dice without TTA or component filtering (`dice_plain`) "
             "and with flip TTA and the largest component (`dice_tta`), and the fold's best validation Dice and "
             "epochs.", "", markdown_table(table), "",
             f"**Mean over {len(table)} patients: Dice {table['dice'].mean():.3f} ± {table['dice'].std():.3f} (sd), "
             f"plain {table['dice_plain'].mean():.3f}, with flip TTA + largest component "
             f"{table['dice_tta'].mean():.3f} (lowest patient {table['dice_tta'].min():.3f}), "
             f"HD95 {table['hd95_mm'].mean():.1f} mm.**", "",
             "Each fold's records (`metrics.json`, `postprocessing.json`, `history.json`, `fit.json`, the locator's) and "
             f"curves are in its `fold_<i>/` folder, and {folds[0].name}'s executed notebook shows one fold whole "
             "(the others ran the same notebook with their split):", "",
             *[f"- [{f.name}]({f.name}/)" for f in folds], ""]
    written.append(write_text(out / "README.md", "\n".join(lines)))
    _check_sizes(out, written)
    refresh_parent_index(out, results_root)
    return out


def _fold_hardware(fold: Path, name: str) -> str:
    """Hardware and precision of a fold's training: its ``fit.json``, else the environment line its
    executed notebook printed (``lib.common.env.print_env``)."""
    fit = fold / name / "fit.json"
    if fit.is_file() and "hardware" in (record := read_json(fit)):
        return str(record["hardware"])
    for nb in fold.glob("*.ipynb"):
        if found := re.search(r"hardware: ([^|\\\n]+?) \|", nb.read_text()):
            return found.group(1)
    return "not recorded"


STUDY_RECORDS = ("spec.json", "design.json", "steps.json", "results.json", "summary.json")


def publish_study(run_dir: str | Path, dataset: str | None = None, results_root: str | Path = RESULTS_ROOT,
                  *, command: str | None = None) -> Path:
    """Publish the synthetic-data study of ``run_dir`` (notebook 05) to ``results/<dataset>/study/``.

    The summary (paired differences, intervals, verdicts) and the figures are made from the
    records written so far, so a study that runs in chunks can be published between them; the
    index says how many of the design's conditions are done. Also copies notebook 05 as executed.

    Raises:
        FileNotFoundError: ``run_dir`` holds no study (``study/design.json``, ``steps.json``).
    """
    # the study's runner imports torch: only here
    from lib.study.run import load_records, read_steps, record_key, unfinished_records

    run_dir = Path(run_dir)
    src = run_dir / "study"
    if not (src / "design.json").is_file() or not (src / "steps.json").is_file():
        raise FileNotFoundError(f"{src}: no study design and steps; run notebook 05 with study_n_real first")
    design = read_design(src / "design.json")
    steps = read_steps(src / "steps.json")
    records = load_records(src / "results.json", design)
    have = {record_key(r) for r in records}  # with the finished conditions of unfinished cells, so an interruption loses less
    records += [r for r in unfinished_records(src, design) if record_key(r) not in have]
    conclusions = study_conclusions(records)
    write_summary(src, design, conclusions, steps, records)
    viz.save_figure(study_figure(records, conclusions), src / "study.png")
    viz.save_figure(steps_figure(steps), src / "steps.png")
    viz.save_figure(quality_figure(records), src / "quality.png")
    out = Path(results_root) / (dataset or read_json(run_dir / "run.json")["task"]) / "study"
    written = [write_text(out / name, relative_paths((src / name).read_text(encoding="utf-8")))
               for name in STUDY_RECORDS if name != "results.json" and (src / name).is_file()]
    written.append(write_text(out / "results.json", relative_paths(json.dumps(records, indent=1))))
    for name in ("study.png", "steps.png", "quality.png"):
        data = shrink_image((src / name).read_bytes())
        written.append(write_with(out / name, lambda p, d=data: p.write_bytes(d)))
    notebook = run_dir / "notebooks" / "05_vae_synthesis.ipynb"
    if notebook.is_file():  # a grid run elsewhere (msdseg-study) keeps the notebook published with its spec
        written.append(write_text(out / "notebooks" / notebook.name, clean_notebook(notebook)))
    index = study_index(design, steps, records, conclusions, command,
                        notebook=(out / "notebooks" / notebook.name).is_file())
    written.append(write_text(out / "README.md", index))
    _check_sizes(out, written)
    refresh_parent_index(out, results_root)
    return out


def _ids(patients: Iterable[str], shown: int = 10) -> str:
    patients = list(patients)
    return ", ".join(patients) if len(patients) <= shown else f"{len(patients)} (listed in `design.json`)"


def study_index(design: Any, steps: dict[int, dict[str, Any]], records: list[dict[str, Any]],
                conclusions: pd.DataFrame, command: str | None = None, *, notebook: bool = False) -> str:
    """The study folder's README.md: design, progress, steps, results table, verdicts, figures."""
    planned = sum(len(design.conditions(n)) for n, _ in design.cells())
    state = "complete" if len(records) >= planned else "in progress (resumable: the same command continues it)"
    lines = [f"# Synthetic-data study: {design.dataset}", "",
             f"Design `{design.id}` (`design.json`), fixed before any result: test patients {_ids(design.test)}; "
             f"validation {_ids(design.val)}; training pool {_ids(design.pool)}. Real training patients per "
             f"cell: {list(design.n_real)}, with {list(design.seeds)} seeds (each seed another subset of the pool). "
             f"Image generator: {design.generator} fed by the shape model, trained per cell on the cell's patients only; "
             f"synthetic pairs kept when the cell's real-only U-Net agrees (Dice >= {design.filter_threshold}).", "",
             f"**{len(records)} of {planned} conditions done: {state}.**", ""]
    if command:
        lines += ["Made by:", "", "```bash", relative_paths(command), "```", ""]
    lines += ["## Steps", "", "Every condition of a patient count trains the same optimiser steps: where real only "
              "reaches its validation plateau (`steps.json`).", "",
              markdown_table(pd.DataFrame({n: {"epochs": s["epochs"], "steps": s["steps"], "plateau reached": s["plateau"]}
                                           for n, s in sorted(steps.items())}).T.rename_axis("real patients")), "",
              "![validation Dice against steps](steps.png)", ""]
    if records:
        lines += ["## Mean test Dice", "", "Per condition: mean over seeds of the mean per-patient 3D Dice on the test "
                  "patients (`results.json` holds every record, with per-patient Dice).", "",
                  markdown_table(study_table(records)), "",
                  "## Against real only", "", "Mean paired difference in per-patient Dice (paired by seed, training "
                  "subset and test patient) with the statistics of the code that made `summary.json` (today: a 95 % "
                  "t-interval over the seeds, `ci_low`/`ci_high`, and a crossed bootstrap of seeds and test patients, "
                  "`boot_low`/`boot_high`, a verdict only when both exclude 0; summaries without `boot_` columns used "
                  "a two-stage bootstrap, seeds then test patients within each).", "", markdown_table(conclusions, digits=3), "", "![study](study.png)", ""]
        generators = generator_quality_table(records)
        if len(generators):
            lines += ["## The generators behind the comparisons", "", "Every cell's generator, trained on the cell's "
                      "patients only, measured against the validation patients (never the test ones): ratios to real "
                      "of the Fréchet distance (lower is closer), sharpness and mask agreement (the Dice of the cell's "
                      "real-only U-Net on the pairs' images against their masks; the filter keeps pairs it agrees with, "
                      "so above 1 is expected), the share of "
                      "drawn pairs the filter kept and the share of unique pairs; means over the seeds, the worst "
                      "Fréchet ratio and unique share beside them. Each cell's point: `quality.png`.", "",
                      markdown_table(generators, digits=2), "", "![quality against effect](quality.png)", ""]
        provenance = provenance_table(records)
        mixed = int(provenance["mixed_cells"].sum())
        lines += ["## Where the records were made", "", "Each record names the commit (`code`) and the machine "
                  "with its precision (`hardware`) that made it; a cell's conditions are paired with its own real "
                  "only, so they compare like with like when the cell ran on one machine. "
                  + (f"{mixed} cell(s) hold records of more than one machine (`mixed_cells`): their paired "
                     "differences also carry the change of machine or precision." if mixed else
                     "Every cell's records come from one machine and precision."), "",
                  markdown_table(provenance), ""]
    if notebook:
        partial = "" if len(records) >= planned else " (while the study runs: up to its last saved cell)"
        lines += [f"[Notebook 05 as executed](notebooks/05_vae_synthesis.ipynb){partial}.", ""]
    return "\n".join(lines).rstrip() + "\n"


def _check_sizes(out: Path, written: list[Path]) -> None:
    big = [f"{p} ({p.stat().st_size / 2**20:.1f} MB)" for p in written if p.stat().st_size > MAX_FILE_BYTES]
    own = _sub_results(out)  # published on their own, each checked when it was published
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and not any(d in p.parents for d in own))
    if big or total > MAX_DATASET_BYTES:
        raise ValueError(f"{out}: over the size limits ({MAX_FILE_BYTES >> 20} MB a file, {MAX_DATASET_BYTES >> 20} MB "
                         f"in all; now {total / 2**20:.1f} MB): {', '.join(big) or 'too many files'}")


RUN_LOG_LINE = f"[Run log]({RUN_LOG}): what each notebook run recorded."


def merged_run_log(published: Path, new: str) -> str:
    """The published run log with the entries of ``new`` it does not hold yet appended (an entry:
    a ``## `` heading and what follows), so republishing never drops earlier runs' records."""
    if not published.is_file():
        return new
    old = published.read_text(encoding="utf-8")
    have = {line for line in old.splitlines() if line.startswith("## ")}
    entries = ["## " + part for part in new.split("\n## ")[1:]]
    added = [e for e in entries if e.splitlines()[0] not in have]
    return old.rstrip("\n") + "".join("\n\n" + e.rstrip("\n") for e in added) + "\n"


def index_page(run_dir: Path, out: Path, dataset: str, command: str | None = None) -> str:
    """The results folder's README.md: how it was made, headline tables, links to everything
    (the run log among them)."""
    from lib.seg.evaluate import class_table  # the evaluation: torch, only here

    lines = [f"# Results: {dataset}", "",
             f"Published by `python tools/publish_results.py {relative_paths(str(run_dir.resolve()))}` from a real run "
             "folder. Checkpoints, caches and predictions stay in the run folder and are not published.", ""]
    if (out / RUN_LOG).is_file():
        lines += [RUN_LOG_LINE, ""]
    if command:
        lines += ["The run was made by:", "", "```bash", relative_paths(command), "```", ""]
    notebooks = sorted((out / "notebooks").glob("*.ipynb"))
    if notebooks:
        lines += ["## Executed notebooks", "", "| notebook | parameters given |", "|---|---|"]
        for nb in notebooks:
            params = notebook_parameters(run_dir / "notebooks" / nb.name)
            shown = ", ".join(f"`{k}={v!r}`" for k, v in params.items())
            lines.append(f"| [{nb.stem}](notebooks/{nb.name}) | {shown} |")
        lines.append("")
    table = comparison_table(run_dir)
    if len(table):
        lines += ["## Segmentation: test patients", "",
                  "Mean per-patient 3D Dice and HD95 at the original resolution (a 2D image folder: per image, HD95 in "
                  "pixels unless a pixel spacing is given); validation Dice chose the checkpoint. Per-patient scores: "
                  "`<model>/metrics.json`.", "", markdown_table(table), ""]
        paired = paired_differences(run_dir)
        if len(paired):
            lines += ["Paired differences in per-patient test Dice to the model with the best validation Dice, with a "
                      "95 % bootstrap interval over the same test patients (a verdict only when it excludes 0):", "",
                      markdown_table(paired), ""]
        if (out / "comparison.png").is_file():
            lines += ["![model comparison](comparison.png)", ""]
        labels = read_json(run_dir / "run.json").get("labels", {})
        if len(labels) > 2:  # several classes: each scored on its own
            for model in table.index:
                metrics = read_json(run_dir / model / "metrics.json")
                lines += [f"Per class, {model} (mean over test patients; `hd95_n_inf`: patients where the class "
                          "was missed or invented):", "", markdown_table(class_table(metrics, labels)), ""]
    lines += _sub_sections(out)
    lines += _figure_links(out)
    quality = run_dir / "generators" / "quality.json"
    if quality.is_file():
        lines += _quality_section(read_json(quality))
    study = run_dir / "study" / "results.json"
    if study.is_file():
        records = read_json(study)
        lines += ["## Synthetic-data study", "", markdown_table(study_table(records)), "",
                  markdown_table(study_conclusions(records), digits=2), ""]
    return "\n".join(lines).rstrip() + "\n"


def _quality_section(quality: dict[str, Any]) -> list[str]:
    """The generators' quality table, their training runs and the sample grid."""
    training = quality.get("training", {})
    rows = {k: v for k, v in quality.items() if k not in ("training", "sample_grid")}
    lines = ["## Synthetic data quality", "",
             "Each generator's pairs against real slices of the validation and test patients "
             "(`synthesis/quality.json`; the `real` row is training against held-out real slices).", "",
             markdown_table(pd.DataFrame(rows).T), ""]
    if training:
        runs = {name: {"epochs": t["epochs"], "train minutes": t["train_minutes"]} for name, t in training.items()}
        lines += ["Training runs (settings in `synthesis/quality.json`):", "", markdown_table(pd.DataFrame(runs).T, 1), ""]
    if "sample_grid" in quality:
        lines += [f"![real and synthetic pairs](synthesis/{quality['sample_grid']})", ""]
    return lines


SUB_HEADINGS = ("## Cross-validation", "## Other runs published here")


def _sub_sections(out: Path) -> list[str]:
    """The index sections that link the sub-folders published on their own."""
    subs = _sub_results(out)
    cvs = [d for d in subs if d.name.startswith("cross_validation")]
    others = [d for d in subs if d not in cvs]
    lines = []
    if cvs:
        lines += [SUB_HEADINGS[0], "", "Every patient tested once, with the per-fold records and the hardware "
                  "each fold trained on:", "", *[f"- [{d.name}/]({d.name}/README.md)" for d in cvs], ""]
    if others:
        lines += [SUB_HEADINGS[1], "", *[f"- [{d.name}/]({d.name}/README.md)" for d in others], ""]
    return lines


def refresh_parent_index(out: Path, results_root: str | Path = RESULTS_ROOT) -> None:
    """After ``out`` was published inside a dataset's folder, relink the dataset index's sub-folder
    sections; the rest of the index stays as its main run wrote it. A dataset folder with no index
    (no main run published) gets one that lists its sub-folders."""
    parent = Path(out).parent
    if parent.resolve() == Path(results_root).resolve():
        return
    index = parent / "README.md"
    if not index.is_file():
        write_text(index, "\n".join([f"# Results: {parent.name}", "", "No main run is published for this dataset; "
                                     "these parts are published on their own:", "", *_sub_sections(parent)]))
        return
    kept: list[str] = []
    at = None  # where the old sub-folder sections stood
    skipping = False
    for line in index.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            skipping = line in SUB_HEADINGS
            if skipping and at is None:
                at = len(kept)
        if not skipping:
            kept.append(line)
    if at is None:  # first sub-folder: before the figures and generator sections, as index_page orders them
        at = next((i for i, line in enumerate(kept) if line.startswith("## ")
                   and line not in ("## Executed notebooks", "## Segmentation: test patients")), len(kept))
    write_text(index, "\n".join(kept[:at] + _sub_sections(parent) + kept[at:]).rstrip() + "\n")


def _sub_results(out: Path) -> list[Path]:
    """Sub-folders published on their own (each with its index), e.g. a cross-validation or another run."""
    return sorted(p.parent for p in out.glob("*/README.md"))


def _figure_links(out: Path) -> list[str]:
    own = _sub_results(out)
    figures = sorted(p.relative_to(out) for p in out.rglob("*") if p.suffix in (".png", ".gif")
                     and p.parent.name != "notebooks" and p.name != "comparison.png"
                     and not any(d in p.parents for d in own))
    if not figures:
        return []
    return ["## Figures", "", *[f"- [{p}]({p})" for p in figures], ""]
