"""A study as a file: everything its cells need, saved before any result, run from a notebook
or from the command line.

Notebook 05 writes ``<run_dir>/study/spec.json`` (the data and run folder, the design, the
segmenter, generator, VAE and shape-model settings, the steps' calibration) and runs it with
:func:`run_spec`; ``msdseg-study`` runs the same file without a notebook, for batch jobs on a
workstation or a cluster::

    msdseg-study runs/heart_study/study/spec.json                    # a local Ray, every core
    msdseg-study runs/heart_study/study/spec.json --address auto     # the Ray cluster of this node
    msdseg-study runs/heart_study/study/spec.json --cell-gpus 0.25    # four cells per GPU
    msdseg-study runs/heart_study/study/spec.json --engine serial     # one cell after the other

Re-running resumes: cells with records are not run again. On a cluster the run folder must be
on storage every machine sees at the same path (checked before any cell is submitted). A
published study (``results/<dataset>/study/spec.json``, its paths relative to the project) is
continued on another machine by running its spec from the project folder: its design, steps and
records are copied into the run folder it names, and only the cells without records run::

    msdseg-study results/LA2018_dev/study/spec.json

The spec and every record name the commit they were made with (``code``): a grid that runs for
hours runs from a ``git worktree`` of that commit, so work on the project meanwhile cannot change
it halfway; running a spec from other code warns.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import MISSING, asdict, fields, is_dataclass
from pathlib import Path
from typing import Any

from lib.common.atomic import read_json, write_json
from lib.common.engine import ENGINES, EngineConfig
from lib.common.env import code_version, get_device
from lib.data.run import Run, prepare_run
from lib.seg.models import ModelConfig
from lib.seg.train import TrainConfig
from lib.study.analysis import study_conclusions, study_table, write_summary
from lib.study.design import StudyDesign, design_from_dict, design_run, read_design
from lib.study.run import add_records, calibrate_steps, load_records, run_study
from lib.synth import diffusion, gan, vae
from lib.synth.shapes import ShapeModelConfig

SPEC_VERSION = 1
GENERATOR_CONFIGS = {"spade_gan": gan.SPADEGANConfig, "diffusion": diffusion.DiffusionConfig}


def spec_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "study" / "spec.json"


def write_spec(run: Run, design: StudyDesign, model_cfg: ModelConfig, train_cfg: TrainConfig,
               generator_cfg: gan.SPADEGANConfig | diffusion.DiffusionConfig, vae_cfg: vae.VAEConfig, *,
               shape_cfg: ShapeModelConfig | None, generator_samples: int | None, max_epochs: int,
               device: str = "auto", ct_window: tuple[float, float] | None = None,
               arm_cfg: gan.SPADEGANConfig | diffusion.DiffusionConfig | None = None) -> Path:
    """Save the study of ``run`` (the run folder of notebook 01) as ``study/spec.json``
    (``arm_cfg``: the settings of the design's second generator, if it has one); refuses a folder
    whose spec describes another study (ValueError)."""
    if (design.arm is None) != (arm_cfg is None) or (
            arm_cfg is not None and not isinstance(arm_cfg, GENERATOR_CONFIGS[design.arm])):
        raise ValueError(f"study spec: the design's second arm is {design.arm!r} but its settings are "
                         f"{type(arm_cfg).__name__ if arm_cfg is not None else None}")
    spec = {"version": SPEC_VERSION,
            "prepare": {"data": str(run.task.root), "run_dir": str(run.run_dir), "image_size": run.slice_cfg.image_size,
                        "seed": run.seed, "ct_window": list(ct_window) if ct_window else None},
            "design": asdict(design) | {"id": design.id}, "model": model_cfg.to_dict(), "train": train_cfg.to_dict(),
            "generator": asdict(generator_cfg), "vae": asdict(vae_cfg),
            **({"arm": asdict(arm_cfg)} if arm_cfg is not None else {}),
            "shape": None if shape_cfg is None else asdict(shape_cfg),
            "generator_samples": generator_samples, "max_epochs": max_epochs, "device": device}
    path = spec_path(run.run_dir)
    if path.is_file():
        _same_study(path, _with_defaults(read_json(path), type(generator_cfg)), spec)
        return path
    return write_json(path, spec | {"code": code_version()})


def _same_study(path: Path, saved: dict[str, Any], spec: dict[str, Any]) -> None:
    """Raise ValueError unless the spec saved at ``path`` describes the study ``spec`` (the
    commit each was written with aside)."""
    if _plain(saved) == _plain(spec) or _plain({**saved, "code": None}) == _plain({**spec, "code": None}):
        return
    changed = sorted(k for k in set(spec) | set(saved) if k != "code" and _plain(saved.get(k)) != _plain(spec.get(k)))
    raise ValueError(f"{path} describes another study (differs in {', '.join(changed)}); use another run_dir "
                     "or delete the study folder to start over")


def _with_defaults(saved: Any, generator: type) -> Any:
    """A saved spec with the generator settings added since it was written at their defaults (a
    diffusion study saved before ``sampler`` existed sampled with DDIM, the default)."""
    try:
        return saved | {"generator": asdict(rebuild(generator, saved["generator"]))}
    except (KeyError, TypeError, ValueError):  # not such a generator's settings: compared as they are
        return saved


def _plain(value: Any) -> Any:
    """``value`` as JSON gives it back (tuples become lists)."""
    return json.loads(json.dumps(value, default=str))


def rebuild(cls: type, data: dict[str, Any]) -> Any:
    """A config dataclass from its JSON dict: lists back to tuples where the field's default is a
    tuple, nested dataclasses rebuilt; unknown keys raise ValueError."""
    names = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} settings: {unknown}")
    kwargs = {}
    for key, value in data.items():
        f = names[key]
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else None)
        if isinstance(default, tuple) and isinstance(value, list):
            value = _tuples(value)
        elif is_dataclass(default) and isinstance(value, dict):
            value = rebuild(type(default), value)
        kwargs[key] = value
    return cls(**kwargs)


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def load_spec(path: str | Path) -> dict[str, Any]:
    """The study of ``spec.json`` with its settings rebuilt: prepare (prepare_run's arguments),
    design, model, train, generator, arm (None without a second generator), vae, shape,
    generator_samples, max_epochs, device."""
    path = Path(path)
    spec = read_json(path)
    if not isinstance(spec, dict) or spec.get("version") != SPEC_VERSION:
        raise ValueError(f"{path}: not a study spec of version {SPEC_VERSION}")
    design = design_from_dict(spec["design"])
    kind = GENERATOR_CONFIGS.get(design.generator)
    if kind is None:
        raise ValueError(f"{path}: unknown generator {design.generator!r}")
    arm = None
    if design.arm is not None:
        if "arm" not in spec:
            raise ValueError(f"{path}: the design's second arm {design.arm!r} has no settings ('arm')")
        arm = rebuild(GENERATOR_CONFIGS[design.arm], spec["arm"])
    return spec | {"design": design, "model": rebuild(ModelConfig, spec["model"]), "arm": arm,
                   "train": rebuild(TrainConfig, spec["train"]), "generator": rebuild(kind, spec["generator"]),
                   "vae": rebuild(vae.VAEConfig, spec["vae"]),
                   "shape": None if spec["shape"] is None else rebuild(ShapeModelConfig, spec["shape"])}


def run_spec(path: str | Path, engine: EngineConfig | None = None, *, cells: bool = True, progress: bool = True
             ) -> tuple[Run, dict[int, dict[str, Any]], list[dict[str, Any]]]:
    """Run (or resume) the study of ``spec.json``: the steps' calibration first, once, then every
    cell not yet recorded on ``engine`` (:mod:`lib.common.engine`); with ``cells=False`` the
    calibration only (so ``bench/study_cost.py`` can cost the grid before it starts).

    Returns:
        The study's run (its split: the design's), the steps per patient count, every record.
    """
    spec = load_spec(path)
    prepare = spec["prepare"]
    _take_over(Path(path), spec)
    if spec.get("code") and spec["code"] != (now := code_version()):
        print(f"msdseg-study: this study was written with commit {spec['code']}, this checkout is {now}: run it "
              f"from `git worktree add ../study-{spec['code']} {spec['code'].split('+')[0]}` to keep its code",
              file=sys.stderr)
    run = prepare_run(prepare["data"], prepare["run_dir"], None, prepare["image_size"], prepare["seed"],
                      ct_window=tuple(prepare["ct_window"]) if prepare["ct_window"] else None, progress=progress)
    design = spec["design"]
    srun = design_run(run, design)
    device = str(get_device(spec["device"]))
    steps = calibrate_steps(srun, design, spec["model"], spec["train"], max_epochs=spec["max_epochs"],
                            device=device, progress=progress)
    if not cells:
        return srun, steps, load_records(srun.run_dir / "study" / "results.json", design)
    engine = engine or EngineConfig()
    if engine.num_gpus == 0 and device.startswith("cuda") and engine.engine == "ray":
        engine = EngineConfig(engine.engine, engine.address, engine.num_cpus, 0.25, engine.max_retries)
    records = run_study(srun, design, spec["model"], spec["train"], steps, spec["generator"], spec["vae"],
                        arm_cfg=spec["arm"], shape_cfg=spec["shape"], generator_samples=spec["generator_samples"], device=device,
                        engine=engine, progress=progress)
    return srun, steps, records


STUDY_FILES = ("spec.json", "design.json", "steps.json")  # with results.json: what continues a study elsewhere


def _take_over(path: Path, spec: dict[str, Any]) -> None:
    """A spec outside the run folder it names (a published study): copy its spec, design and
    steps there where that folder has none (refusing another study's), and merge its records
    into the folder's, so the run goes on from where the published one stopped."""
    target = spec_path(spec["prepare"]["run_dir"])
    if target.resolve() == path.resolve():
        return
    for name in STUDY_FILES:
        src, dst = path.parent / name, target.parent / name
        if not src.is_file():
            continue
        if not dst.is_file():
            write_json(dst, read_json(src))
        elif name == "spec.json":  # the same study, its paths written absolute or relative to the project
            _same_study(dst, _resolved(read_json(dst)), _resolved(read_json(src)))
    published = path.parent / "results.json"
    if published.is_file():
        add_records(target.parent / "results.json", read_json(published), spec["design"])


def _resolved(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` with the data and run folders as absolute paths (a published spec's are relative)."""
    prepare = spec.get("prepare", {})
    return spec | {"prepare": prepare | {k: str(Path(prepare[k]).resolve()) for k in ("data", "run_dir")
                                         if prepare.get(k)}}


def main(argv: list[str] | None = None) -> int:
    """Command line: run a study from its spec.json; exit status 1 when cells failed."""
    parser = argparse.ArgumentParser(prog="msdseg-study", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", type=Path, help="study/spec.json written by notebook 05")
    parser.add_argument("--engine", choices=ENGINES, default="ray")
    parser.add_argument("--address", help="Ray cluster to join ('auto': this node's; default: $RAY_ADDRESS, "
                                          "else a local Ray with every core)")
    parser.add_argument("--cell-cpus", type=float, help="CPUs (torch threads) per cell (default: a machine's cores "
                                                        "shared out among the cells, at least one each)")
    parser.add_argument("--cell-gpus", type=float, default=0,
                        help="GPUs per cell (0.25: four cells share a GPU; default with a CUDA device: 0.25)")
    parser.add_argument("--max-retries", type=int, default=1, help="further tries of a cell that failed")
    parser.add_argument("--steps-only", action="store_true", help="choose the steps on validation and stop "
                        "(then `python bench/study_cost.py RUN_DIR` costs the grid before it starts)")
    args = parser.parse_args(argv)
    engine = EngineConfig(args.engine, args.address, args.cell_cpus, args.cell_gpus, args.max_retries)
    try:
        srun, steps, records = run_spec(args.spec, engine, cells=not args.steps_only)
    except RuntimeError as err:  # cells failed: the others are saved
        print(f"msdseg-study: {err}", file=sys.stderr)
        return 1
    conclusions = study_conclusions(records)
    write_summary(srun.run_dir / "study", read_design(srun.run_dir / "study" / "design.json"),
                  conclusions, steps, records)
    print(study_table(records).round(3).to_string())
    print(conclusions.round(2).to_string())
    print(f"{len(records)} records in {srun.run_dir / 'study' / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
