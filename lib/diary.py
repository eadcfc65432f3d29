"""The research diary: every notebook run appends a dated, structured entry to diary.md.

Entries are appended atomically (read, add, write a temporary file, rename) under a
file lock, so a crash never truncates the diary and two runs never interleave.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lib.atomic import write_text
from lib.paths import PROJECT_ROOT

HEADER = "# Research diary\n\nOne entry per notebook run, newest last. Written by `lib.diary.append_entry`.\n"


def diary_path(path: str | Path | None = None) -> Path:
    """The diary file: ``path``, else ``$MSDSEG_DIARY``, else ``<project>/diary.md``."""
    return Path(path or os.environ.get("MSDSEG_DIARY") or PROJECT_ROOT / "diary.md")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Mapping | list | tuple):
        return "`" + json.dumps(value, default=str) + "`"
    return str(value)


def _relative(path: str | Path) -> str:
    """A path relative to the project root when it lies inside it."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        return str(path)


def format_entry(
    title: str,
    *,
    notebook: str,
    dataset: str,
    params: Mapping[str, Any],
    results: Mapping[str, Any],
    figures: Sequence[str | Path] = (),
    notes: str = "",
    when: dt.datetime | None = None,
) -> str:
    """Render one diary entry as Markdown."""
    when = when or dt.datetime.now().astimezone()
    lines = [
        f"## {when:%Y-%m-%d %H:%M} {title}",
        "",
        f"- **Notebook**: `{notebook}`",
        f"- **Dataset**: {dataset}",
        "- **Parameters**: " + ", ".join(f"`{k}={v!r}`" for k, v in params.items()),
        "- **Results**:",
        *[f"  - {k}: {_fmt(v)}" for k, v in results.items()],
    ]
    if figures:
        lines.append("- **Figures**: " + ", ".join(f"`{_relative(f)}`" for f in figures))
    if notes:
        lines += ["", notes.strip()]
    return "\n".join(lines) + "\n"


def append_entry(title: str, *, path: str | Path | None = None, **fields: Any) -> Path:
    """Append an entry (see :func:`format_entry` for the fields) to the diary.

    Returns:
        The diary's path.
    """
    target = diary_path(path)
    entry = format_entry(title, **fields)
    with _locked(target):
        old = target.read_text(encoding="utf-8") if target.exists() else HEADER
        write_text(target, old.rstrip("\n") + "\n\n" + entry)
    return target
