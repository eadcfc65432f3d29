"""The research diary: every notebook run appends one compact, dated entry to diary.md.

An automatic entry names the notebook, the data and split, the settings and hardware,
the headline results and the run folder that holds the full record (metrics.json,
history.json, figures). Values are written as plain text, never as JSON blobs; the
hand-written entries of diary.md interpret them.

Entries are appended atomically (read, add, write a temporary file, rename) under a
file lock, so a crash never truncates the diary and two runs never interleave.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lib.atomic import locked, write_text
from lib.paths import PROJECT_ROOT, relative_paths

HEADER = ("# Research diary\n\nDated entries, oldest first. Automatic entries are written by "
          "`lib.diary.append_entry` at the end of each notebook run.\n")


def diary_path(path: str | Path | None = None) -> Path:
    """The diary file: ``path``, else ``$MSDSEG_DIARY``, else ``<project>/diary.md``."""
    return Path(path or os.environ.get("MSDSEG_DIARY") or PROJECT_ROOT / "diary.md")


def format_value(value: Any) -> str:
    """A value as short plain text: floats to 4 significant digits, lists joined by commas,
    mappings as ``key value`` pairs (one level deep)."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k} {format_value(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(format_value(v) for v in value) or "none"
    return str(value)


def _pairs(values: Mapping[str, Any]) -> str:
    return " · ".join(f"{k} {format_value(v)}" for k, v in values.items())


def format_entry(
    title: str,
    *,
    notebook: str,
    dataset: str,
    setup: Mapping[str, Any],
    results: Mapping[str, Any],
    record: str | Path | None = None,
    notes: str = "",
    when: dt.datetime | None = None,
) -> str:
    """Render one automatic entry as a few lines of Markdown.

    Args:
        setup: split, seed, settings and hardware, as ``{name: value}``.
        results: the headline numbers, as ``{name: value}``.
        record: the run folder (or file) holding the full record.
    """
    when = when or dt.datetime.now().astimezone()
    lines = [
        f"## {when:%Y-%m-%d %H:%M} · {title} (automatic entry)",
        "",
        f"- **Run**: `{notebook}` on {dataset}",
        f"- **Setup**: {_pairs(setup)}",
        f"- **Result**: {_pairs(results)}",
    ]
    if record is not None:
        lines.append(f"- **Full record**: `{Path(record).resolve()}` (run folder, not committed)")
    if notes:
        lines += ["", notes.strip()]
    return relative_paths("\n".join(lines) + "\n")


def append_entry(title: str, *, path: str | Path | None = None, **fields: Any) -> Path:
    """Append an entry (see :func:`format_entry` for the fields) to the diary.

    Returns:
        The diary's path.
    """
    target = diary_path(path)
    entry = format_entry(title, **fields)
    with locked(target):
        old = target.read_text(encoding="utf-8") if target.exists() else HEADER
        write_text(target, old.rstrip("\n") + "\n\n" + entry)
    return target
