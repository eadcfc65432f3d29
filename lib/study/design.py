"""Does synthetic data help segmentation? The design of the study of notebook 05.

Fixed before any result (:func:`make_design`, saved as ``study/design.json`` by
:func:`design_run`; its id marks every record): test and validation patients held out, the
rest a training *pool*; for each number of real patients ``n`` several seeds, each drawing
another subset of the pool. Every cell ``(n, seed)`` trains the conditions of
:meth:`StudyDesign.conditions` (``STRATEGIES``; what each trains: :mod:`lib.study.run`).

The study runs in :mod:`lib.study.run`, its tables, verdicts and figures are
:mod:`lib.study.analysis`, its cost :mod:`lib.study.cost`, and the spec file of the
``msdseg-study`` command :mod:`lib.study.spec`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lib.common.atomic import read_json, write_json

if TYPE_CHECKING:  # the design itself needs no torch: the run is only passed through
    from lib.data.run import Run

GENERATORS = ("spade_gan", "diffusion")  # image generators a design may name (lib.study.run trains them)


STRATEGIES = ("real", "add", "mix", "pretrain", "synthetic_only", "latent")
ABLATIONS = ("ratios", "deformed", "unfiltered", "mix")  # what the smallest patient count may also train
DEFAULT_STRATEGIES = ("real", "add", "pretrain", "synthetic_only", "latent")  # "mix" (replace) is an ablation


@dataclass(frozen=True)
class Condition:
    """One way of training the segmenter in a cell."""

    strategy: str
    ratio: float = 0.0  # synthetic slices per real slice (0 for real only and the latent segmenter)
    shapes: str | None = None  # "new" (shape model) or "deformed" (real masks); None without synthetic slices
    filtered: bool | None = None
    arm: str | None = None  # another image generator than the design's (its second arm); None: the design's

    @property
    def synthetic(self) -> bool:
        return self.strategy in ("add", "mix", "pretrain", "synthetic_only")


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
    strategies: tuple[str, ...] = STRATEGIES  # the studies published before "add" existed ran all of these
    ratio: float = 1.0
    ablation_n_real: int | None = 1
    ablation_ratios: tuple[float, ...] = (0.5, 2.0)
    filter_threshold: float = 0.5
    seed: int = 0
    arm: str | None = None  # a second image generator, run with the primary mix at ``arm_n_real`` only
    arm_n_real: int | None = None
    ceiling: bool = False  # real only once on the whole pool (its last entry of n_real, one seed): the ceiling
    ablations: tuple[str, ...] = ABLATIONS  # which of ABLATIONS run at ablation_n_real

    @property
    def id(self) -> str:
        """Short hash of the design: every record carries it."""
        fields = asdict(self)
        for name, default in (("arm", None), ("arm_n_real", None), ("ceiling", False), ("ablations", ABLATIONS)):
            if fields[name] in (default, False, None):  # added later: designs without them keep their ids
                del fields[name]
        text = json.dumps(fields, sort_keys=True)
        return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()

    def subset(self, n: int, seed: int) -> list[str]:
        """The ``n`` pool patients of seed ``seed``: consecutive runs through one fixed shuffle
        of the pool, so seeds give different subsets while the pool lasts."""
        perm = np.random.default_rng(self.seed + 1).permutation(len(self.pool))
        return sorted(self.pool[perm[(seed * n + i) % len(self.pool)]] for i in range(n))

    def cells(self) -> list[tuple[int, int]]:
        return [(n, s) for n, k in zip(self.n_real, self.seeds) for s in range(k)]

    def conditions(self, n: int) -> list[Condition]:
        """The conditions of a cell with ``n`` real patients, real only first. At
        ``ablation_n_real`` the primary mix ("add" if the design has it, else "mix") is also
        run at the ``ablation_ratios``, with deformed real masks, and without the filter; with
        "add" primary, "mix" (synthetic slices replacing real ones) is one more ablation (each of them
        only if named in ``ablations``). At
        ``arm_n_real`` the primary mix is run with the second generator ``arm`` too. With
        ``ceiling``, the whole pool trains real only, nothing else."""
        if self.ceiling and n == len(self.pool):
            return [Condition("real")]
        main = [Condition("real")] + [Condition(s, self.ratio, "new", True) for s in ("add", "mix", "pretrain",
                                                                                    "synthetic_only")
                                      if s in self.strategies] + [Condition("latent")] * ("latent" in self.strategies)
        primary = "add" if "add" in self.strategies else "mix"
        if self.arm and n == self.arm_n_real:
            main.append(Condition(primary, self.ratio, "new", True, self.arm))
        if n != self.ablation_n_real or primary not in self.strategies:
            return main
        extra = [Condition(primary, r, "new", True) for r in self.ablation_ratios] * ("ratios" in self.ablations)
        extra += [Condition(primary, self.ratio, "deformed", True)] * ("deformed" in self.ablations)
        extra += [Condition(primary, self.ratio, "new", False)] * ("unfiltered" in self.ablations)
        if primary == "add" and "mix" not in self.strategies and "mix" in self.ablations:
            extra.append(Condition("mix", self.ratio, "new", True))
        return main + extra

    def split(self) -> dict[str, Any]:
        return {"train": list(self.pool), "val": list(self.val), "test": list(self.test), "seed": self.seed,
                "source": f"study design {self.id}"}


def make_design(run: Run, *, n_test: int, n_val: int, n_real: list[int], seeds: list[int],
                generator: str = "spade_gan", strategies: list[str] = DEFAULT_STRATEGIES, ratio: float = 1.0,
                ablation_ratios: list[float] = (0.5, 2.0), filter_threshold: float = 0.5, seed: int = 0,
                ablations: bool | list[str] = True, arm: str | None = None, arm_n_real: int | None = None,
                ceiling: bool = False) -> StudyDesign:
    """Hold out ``n_test`` test and ``n_val`` validation patients of the run's task (drawn by
    ``seed`` from all its patients); the rest is the training pool. ``strategies`` (real only
    always among them) trims the grid; the ablations run at the smallest patient count with the
    primary mix (all of :data:`ABLATIONS` with ``ablations=True``, those named in a list, none with
    ``ablations=False``, as the demo's short study). ``arm``: a second
    image generator run with the primary mix at ``arm_n_real`` patients (default: the smallest).
    ``ceiling``: real only once more on the whole pool (added to ``n_real`` with one seed), what
    every real patient at hand reaches.

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
    if ceiling:
        if len(pool) in n_real:
            raise ValueError(f"study design: the ceiling trains the whole pool of {len(pool)} patients; "
                             f"leave {len(pool)} out of n_real={n_real}")
        n_real, seeds = [*n_real, len(pool)], [*seeds, 1]
    if bad_r := [r for r in (ratio, *ablation_ratios) if not r > 0]:
        raise ValueError(f"study design: synthetic:real ratios must be positive, got {bad_r}")
    if bad_g := [g for g in (generator, arm) if g is not None and g not in GENERATORS]:
        raise ValueError(f"study design: unknown generator {bad_g[0]!r}; choose one of {sorted(GENERATORS)}")
    if arm == generator:
        raise ValueError(f"study design: the second arm {arm!r} is the design's generator already")
    if arm is not None and not {"add", "mix"} & set(strategies):
        raise ValueError("study design: a second arm runs with the mix of real and synthetic slices: add 'add' or 'mix'")
    if arm is not None:
        arm_n_real = min(n_real) if arm_n_real is None else int(arm_n_real)
        if arm_n_real not in n_real or (ceiling and arm_n_real == len(pool)):
            raise ValueError(f"study design: the second arm's patient count {arm_n_real} is not among n_real={n_real}")
    else:
        arm_n_real = None
    if not 0 <= filter_threshold <= 1:
        raise ValueError(f"study design: filter threshold {filter_threshold} must lie in [0, 1]")
    kinds = ABLATIONS if ablations is True else tuple(a for a in ABLATIONS if a in (ablations or ()))
    if ablations not in (True, False) and (unknown := set(ablations) - set(ABLATIONS)):
        raise ValueError(f"study design: unknown ablations {sorted(unknown)}; choose from {ABLATIONS}")
    if "real" not in strategies or set(strategies) - set(STRATEGIES):
        raise ValueError(f"study design: strategies {list(strategies)} must include 'real' and come from {STRATEGIES}")
    return StudyDesign(run.task.name, tuple(sorted(test)), tuple(sorted(val)), tuple(sorted(pool)),
                       tuple(int(n) for n in n_real), tuple(int(k) for k in seeds), generator,
                       tuple(s for s in STRATEGIES if s in strategies), float(ratio),
                       min(n_real) if kinds and n_real else None, tuple(float(r) for r in ablation_ratios),
                       float(filter_threshold),
                       seed, arm, arm_n_real, bool(ceiling), kinds if kinds else ABLATIONS)


def design_run(run: Run, design: StudyDesign) -> Run:
    """The run with the design's split (same slice cache), checked against ``study/design.json``.

    Raises:
        ValueError: the run folder holds a study of another design.
    """
    path = run.run_dir / "study" / "design.json"
    saved = read_json(path) if path.is_file() else None
    if saved is not None and saved.get("id") != design.id:
        raise ValueError(f"{path} holds study design {saved.get('id')} (test {saved.get('test')}), not {design.id} "
                         f"(test {list(design.test)}); use another run_dir or delete the study folder to start over (to resize "
                         f"a grid before any cell ran, delete only design.json and spec.json: steps.json is reused)")
    if saved is None:
        write_json(path, asdict(design) | {"id": design.id})
    return replace(run, split=design.split())


def read_design(path: Path) -> StudyDesign:
    """The design saved by :func:`design_run` (``study/design.json``)."""
    return design_from_dict(read_json(path))


def design_from_dict(fields: dict[str, Any]) -> StudyDesign:
    """A design from its JSON fields (its ``id`` is recomputed)."""
    return StudyDesign(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items() if k != "id"})
