"""Run independent jobs (the study's cells, the cross-validation's folds) on one machine or many.

``engine="ray"`` (the default) submits every job as a Ray task: on a laptop ``ray.init()``
starts a local Ray with all its cores, so a 2-core machine runs two jobs at a time; with an
address (``RAY_ADDRESS`` or ``address="auto"`` / ``"ray://head:10001"``) the same code joins
an existing cluster (``ray start --head`` on one machine, ``ray start --address=...`` on the
others; Ray on Slurm or Kubernetes likewise). Each job asks for ``num_cpus`` CPUs (its torch
threads; by default the cores are shared out, so two jobs on a 2-core laptop get one each and a
single job gets both) and ``num_gpus`` GPUs, where a fraction shares one GPU (``0.25``: four jobs
on one GPU). A worker that dies in the middle of a job (killed, out of memory, a lost node) is
retried up to ``max_retries`` times, and so is a job that raised; a job that still fails is
reported by name with its error while the others go on. ``engine="serial"`` runs the same
jobs one after the other in this process, for debugging.

Only the driver (the process calling :func:`run_jobs`) writes results: each job returns its
result, and ``on_result`` is called in the driver as jobs finish. On a cluster the run folder
must be on storage that every machine sees at the same path; :func:`run_jobs` checks this
before it submits anything.
"""

from __future__ import annotations

import os
import sys
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from lib.common.paths import PROJECT_ROOT

ENGINES = ("ray", "serial")


@dataclass(frozen=True)
class EngineConfig:
    """Where and how jobs run.

    Attributes:
        engine: "ray" or "serial".
        address: a Ray cluster to join (None: ``$RAY_ADDRESS`` if set, else a local Ray).
        num_cpus: CPUs per job (also its torch threads); None: the CPUs of the largest machine
            shared out among the jobs, at least one each.
        num_gpus: GPUs per job; a fraction shares a GPU between jobs.
        max_retries: further tries of a job whose worker died or that raised.
    """

    engine: str = "ray"
    address: str | None = None
    num_cpus: float | None = None
    num_gpus: float = 0
    max_retries: int = 1

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine {self.engine!r}: use one of {', '.join(ENGINES)}")
        if (self.num_cpus is not None and self.num_cpus <= 0) or self.num_gpus < 0 or self.max_retries < 0:
            raise ValueError(f"num_cpus must be > 0, num_gpus and max_retries >= 0: {self}")

    @property
    def cluster_address(self) -> str | None:
        return self.address or os.environ.get("RAY_ADDRESS") or None


@dataclass(frozen=True)
class Job:
    """One independent piece of work: ``fn(**kwargs)``, named for progress and errors."""

    name: str
    fn: Callable[..., Any]
    kwargs: dict[str, Any] = field(default_factory=dict)


def _threads(num_cpus: float) -> int:
    return max(1, int(num_cpus))


def _share(cpus: float, jobs: int) -> int:
    """CPUs per job when ``jobs`` share a machine of ``cpus``: at least one each."""
    return max(1, int(cpus // max(1, jobs)))


def _call(fn: Callable[..., Any], kwargs: dict[str, Any], threads: int) -> Any:
    """Run one job with its granted CPUs as torch threads (restored afterwards, for the serial
    engine's own process), so both engines compute alike."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn(**kwargs)
    finally:
        torch.set_num_threads(before)


def _sees(path: str, token: str) -> bool:
    return (Path(path) / token).is_file()


def run_jobs(jobs: list[Job], cfg: EngineConfig, on_result: Callable[[Job, Any], None], *,
             shared_dir: str | Path | None = None, desc: str = "jobs", progress: bool = True) -> dict[str, str]:
    """Run ``jobs`` with ``cfg``; call ``on_result(job, result)`` in this process as each finishes.

    Args:
        shared_dir: a folder every worker must see (the run folder); checked on a cluster.

    Returns:
        The jobs that failed after their retries: name -> error (empty when all succeeded).
    """
    if not jobs:
        return {}
    if cfg.engine == "serial":
        return _run_serial(jobs, cfg, on_result, desc, progress)
    return _run_ray(jobs, cfg, on_result, shared_dir, desc, progress)


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=desc, disable=not progress, file=sys.stderr, dynamic_ncols=True)


def _status(bar: tqdm, running: int, failed: dict[str, str]) -> None:
    bar.set_postfix_str(f"running {running}, done {bar.n - len(failed)}, failed {len(failed)}")


def _run_serial(jobs: list[Job], cfg: EngineConfig, on_result: Callable[[Job, Any], None], desc: str,
                progress: bool) -> dict[str, str]:
    failed: dict[str, str] = {}
    threads = _threads(cfg.num_cpus or os.cpu_count() or 1)
    with _bar(len(jobs), desc, progress) as bar:
        for job in jobs:
            _status(bar, 1, failed)
            for attempt in range(cfg.max_retries + 1):
                try:
                    result = _call(job.fn, job.kwargs, threads)
                except Exception as err:  # a failed job is reported, the others go on
                    if attempt == cfg.max_retries:
                        failed[job.name] = _one_line(err)
                        print(f"{job.name} failed: {failed[job.name]}", file=sys.stderr)
                        traceback.print_exc()
                else:
                    on_result(job, result)
                    break
            bar.update()
        _status(bar, 0, failed)
    return failed


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[-1] if text else ''}".strip()


def init_ray(cfg: EngineConfig) -> Any:
    """Join the cluster at ``cfg.cluster_address``, or start a local Ray with every core."""
    import ray

    if ray.is_initialized():
        return ray
    address = cfg.cluster_address
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING", "log_to_driver": True}
    if address is None:  # a local Ray: workers import the project from this checkout
        path = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        kwargs |= {"runtime_env": {"env_vars": {"PYTHONPATH": path}},
                   "object_store_memory": 256 * 2**20}
    ray.init(address=address, **kwargs)
    return ray


def _check_shared(ray: Any, shared_dir: Path) -> None:
    """Refuse to start when a node of the cluster cannot see ``shared_dir`` (the run folder)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = f".engine-check-{uuid.uuid4().hex}"
    probe = shared_dir / token
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text("")
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        check = ray.remote(num_cpus=0)(_sees)
        seen = ray.get([check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                        .remote(str(shared_dir), token) for n in nodes])
    finally:
        probe.unlink(missing_ok=True)
    blind = [n["NodeManagerAddress"] for n, ok in zip(nodes, seen) if not ok]
    if blind:
        raise RuntimeError(f"{shared_dir}: not visible from Ray node(s) {', '.join(blind)}; on a cluster the run "
                           "folder must be on storage every machine mounts at the same path (NFS, a shared disk)")


def _run_ray(jobs: list[Job], cfg: EngineConfig, on_result: Callable[[Job, Any], None],
             shared_dir: str | Path | None, desc: str, progress: bool) -> dict[str, str]:
    ray = init_ray(cfg)
    if shared_dir is not None:
        _check_shared(ray, Path(shared_dir).resolve())
    num_cpus = cfg.num_cpus or _share(max(n["Resources"].get("CPU", 1) for n in ray.nodes() if n.get("Alive")),
                                      len(jobs))
    task = ray.remote(_call).options(num_cpus=num_cpus, num_gpus=cfg.num_gpus, max_retries=cfg.max_retries,
                                     retry_exceptions=True)
    pending = {task.remote(job.fn, job.kwargs, _threads(num_cpus)): job for job in jobs}
    failed: dict[str, str] = {}
    try:
        with _bar(len(jobs), desc, progress) as bar:
            _status(bar, min(len(pending), _slots(ray, num_cpus, cfg.num_gpus)), failed)
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=60.0)
                for ref in ready:
                    job = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except Exception as err:  # RayTaskError, WorkerCrashedError, ... after the retries
                        failed[job.name] = _one_line(getattr(err, "cause", None) or err)
                        print(f"{job.name} failed after {cfg.max_retries + 1} tries: {failed[job.name]}",
                              file=sys.stderr)
                    else:
                        on_result(job, result)
                    bar.update()
                _status(bar, min(len(pending), _slots(ray, num_cpus, cfg.num_gpus)), failed)
    finally:  # the driver stopped (interrupt, error): no job may go on writing into its folder
        for ref in pending:
            ray.cancel(ref, force=True)
    return failed


def _slots(ray: Any, num_cpus: float, num_gpus: float) -> int:
    """How many jobs the cluster runs at once."""
    resources = ray.cluster_resources()
    slots = resources.get("CPU", 1) / num_cpus
    if num_gpus:
        slots = min(slots, resources.get("GPU", 0) / num_gpus)
    return max(1, int(slots))
