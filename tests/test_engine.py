"""The job engine: Ray on a local 2-worker cluster against the serial loop, retries of a worker
that dies, failures reported by name while the other jobs go on, the shared-folder check."""

from __future__ import annotations

import functools
import time

import pytest

from lib.common.engine import EngineConfig, Job, run_jobs
from tests.helpers import exit_once

RAY = EngineConfig("ray", num_cpus=1, max_retries=1)
SERIAL = EngineConfig("serial", num_cpus=1, max_retries=1)


pytestmark = pytest.mark.slow  # starts a local Ray


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray = pytest.importorskip("ray")
    yield
    ray.shutdown()


def square(x: int, pause: float = 0.0) -> int:
    time.sleep(pause)
    return x * x


def fail(x: int) -> int:
    raise ValueError(f"job {x} cannot run")


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def collect(jobs: list[Job], cfg: EngineConfig, **kwargs) -> tuple[dict[str, list], dict[str, str]]:
    got: dict[str, list] = {}
    failed = run_jobs(jobs, cfg, lambda job, result: got.setdefault(job.name, []).append(result), progress=False,
                      **kwargs)
    return got, failed


def test_ray_and_serial_give_the_same_results_and_jobs_get_their_cpus_as_torch_threads(tmp_path):
    jobs = [Job(f"x{i}", square, {"x": i, "pause": 0.2}) for i in range(6)]
    by_ray, by_serial = collect(jobs, RAY, shared_dir=tmp_path), collect(jobs, SERIAL)
    assert by_ray == by_serial == ({f"x{i}": [i * i] for i in range(6)}, {})
    assert collect([Job("t", torch_threads)], RAY)[0] == {"t": [1]}


def test_two_jobs_finishing_at_once_are_both_handed_over():
    jobs = [Job(f"x{i}", square, {"x": i}) for i in range(8)]  # no pause: they finish together
    got, failed = collect(jobs, RAY)
    assert got == {f"x{i}": [i * i] for i in range(8)} and not failed


def test_a_worker_killed_in_the_middle_of_a_job_is_retried_and_its_result_handed_over_once(tmp_path):
    marker = tmp_path / "died-once"
    jobs = [Job("dies", exit_once, {"marker": str(marker), "fn": functools.partial(square, 7)}),
            Job("fine", square, {"x": 2})]
    got, failed = collect(jobs, RAY)
    assert marker.exists() and got == {"dies": [49], "fine": [4]} and not failed


@pytest.mark.parametrize("cfg", [RAY, SERIAL], ids=["ray", "serial"])
def test_a_job_that_fails_every_try_is_reported_by_name_and_the_others_go_on(cfg, capsys):
    got, failed = collect([Job("bad", fail, {"x": 1}), Job("good", square, {"x": 3})], cfg)
    assert got == {"good": [9]} and set(failed) == {"bad"} and "job 1 cannot run" in failed["bad"]
    assert "bad failed" in capsys.readouterr().err


def test_a_folder_the_workers_cannot_see_is_refused_before_anything_runs(tmp_path, monkeypatch):
    from lib.common import engine

    monkeypatch.setattr(engine, "_sees", lambda path, token: False)  # as a node without the shared disk
    with pytest.raises(RuntimeError, match="not visible from Ray node.*shared"):
        collect([Job("x", square, {"x": 1})], RAY, shared_dir=tmp_path)


def test_bad_settings_are_refused():
    for kwargs in ({"engine": "dask"}, {"num_cpus": 0}, {"max_retries": -1}):
        with pytest.raises(ValueError):
            EngineConfig(**kwargs)
