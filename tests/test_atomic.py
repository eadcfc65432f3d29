"""Atomic writes: no half files, stale temporary files cleaned, concurrent JSON writers lose nothing."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket

import pytest

from lib.common.atomic import atomic_path, clean_stale_temps, read_json, update_json, write_json


def _dead_pid() -> int:
    proc = mp.get_context("spawn").Process(target=os.getpid)
    proc.start()
    proc.join()
    return proc.pid


def test_a_killed_writers_temporary_file_is_removed_at_the_next_write_and_a_live_ones_kept(tmp_path):
    target = tmp_path / "best.pt"
    host = socket.gethostname()
    stale = tmp_path / f".best.pt.{host}-{_dead_pid()}.abc123.tmp.pt"
    live = tmp_path / f".best.pt.{host}-{os.getpid()}.def456.tmp.pt"
    other_file = tmp_path / f".last.pt.{host}-{_dead_pid()}.abc123.tmp.pt"
    for path in (stale, live, other_file):
        path.write_bytes(b"x" * 1000)
    write_json(target, {"a": 1})
    assert not stale.exists(), "a dead writer's temporary file must be cleaned"
    assert live.exists(), "a running writer's temporary file must be kept"
    assert other_file.exists(), "only temporary files of the file being written are touched"
    assert read_json(target) == {"a": 1}
    assert clean_stale_temps(tmp_path / "last.pt") == [other_file]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "r.json"
    write_json(target, [1])
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert read_json(target) == [1]
    assert [p.name for p in tmp_path.iterdir() if p.name != "r.json"] == []


def _append_records(path: str, worker: int, count: int) -> None:
    for i in range(count):
        update_json(path, lambda records, i=i: records + [{"worker": worker, "i": i}], default=[])


def test_concurrent_writers_of_one_json_file_lose_no_record(tmp_path):
    path = tmp_path / "study" / "results.json"
    ctx = mp.get_context("spawn")
    workers = [ctx.Process(target=_append_records, args=(str(path), w, 6)) for w in range(4)]
    for proc in workers:
        proc.start()
    for proc in workers:
        proc.join(60)
        assert proc.exitcode == 0
    records = json.loads(path.read_text())
    assert sorted((r["worker"], r["i"]) for r in records) == [(w, i) for w in range(4) for i in range(6)]
