"""Atomic file writes: write to a temporary file in the same folder, then rename.

A crash or interrupt leaves either the old file or the new one, never half of one. The
temporary file's name holds the host and process id of its writer, so the next write of the
same file removes what a killed writer left behind (never the file of a writer still running).
:func:`update_json` read-merge-writes a shared JSON file under a file lock, so concurrent
writers (several processes, or several machines on a shared folder) lose nothing.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)


def _tmp_prefix(path: Path, host: str = "", pid: int | None = None) -> str:
    return f".{path.name}.{host or socket.gethostname()}-{os.getpid() if pid is None else pid}."


def clean_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that killed writers of ``path`` on this host left next to it
    (their process no longer exists); returns what was removed."""
    path, host = Path(path), socket.gethostname()
    removed = []
    for tmp in path.parent.glob(f".{path.name}.{host}-*.tmp*"):
        pid = tmp.name[len(f".{path.name}.{host}-"):].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path``.

    Args:
        path: final destination.
        suffix: suffix for the temporary file (some writers need the right extension,
            e.g. ``.npz`` or ``.nii.gz``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=".tmp" + suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``.<name>.lock`` (a hidden sibling file, kept: removing a lock
    file that another writer waits on would let two writers in) for the block's duration."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def update_json(path: str | os.PathLike, update: Callable[[Any], Any], default: Any = None) -> Any:
    """Read ``path`` (``default`` when missing), apply ``update`` to its content and write the
    result atomically, all under :func:`locked`: what another writer added in the meantime is
    read, never overwritten. Returns the written content."""
    path = Path(path)
    with locked(path):
        content = update(read_json(path) if path.is_file() else default)
        write_json(path, content)
    return content


def write_with(path: str | os.PathLike, writer: Callable[[Path], None], suffix: str = "") -> Path:
    """Call ``writer(tmp_path)`` and atomically move the result to ``path``."""
    with atomic_path(path, suffix=suffix) as tmp:
        writer(tmp)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically write a UTF-8 text file."""
    return write_with(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, naming the file in the error when it is not valid JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def _json_default(obj: Any) -> Any:
    """Make numpy scalars, arrays and paths JSON-serialisable."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
