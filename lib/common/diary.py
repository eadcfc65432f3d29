"""The run log: every notebook run appends one compact, dated entry to its run folder's
``run_log.md``.

An automatic entry names the notebook, the data and split, the settings and hardware,
the headline results and the folder that holds the full record (metrics.json,
history.json, figures). Values are written as plain text, never as JSON blobs.
``tools/publish_results.py`` copies the run log to ``results/<dataset>/run_log.md``; the
research diary, diary.md, holds written entries only and interprets these records.

Entries are appended atomically (read, add, write a temporary file, rename) under a
file lock, so a crash never truncates the log and two runs never interleave.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lib.common.atomic import locked, write_text
from lib.common.paths import relative_paths

RUN_LOG = "run_log.md"
HEADER = ("# Run log\n\nThe automatic records of the notebook runs in this folder, oldest first, "
          "written by `lib.common.diary.append_entry` at the end of each notebook run. "
          "The research diary (diary.md) interprets them.\n")


def run_folder(record: str | Path) -> Path:
    """The run folder that holds ``record``: the nearest of ``record`` and the folders above it
    with a ``run.json`` (written by :func:`lib.data.run.prepare_run`).

    Raises:
        ValueError: no such folder.
    """
    path = Path(record).resolve()
    for folder in (path, *path.parents):
        if (folder / "run.json").is_file():
            return folder
    raise ValueError(f"{record}: not inside a run folder (no run.json above it); pass run_dir")


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
        record: the run folder (or a folder or file in it) holding the full record.
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


def append_entry(title: str, *, run_dir: str | Path | None = None, **fields: Any) -> Path:
    """Append an entry (see :func:`format_entry` for the fields) to ``<run_dir>/run_log.md``.

    Args:
        run_dir: the run folder; default: the one holding ``fields["record"]``
            (:func:`run_folder`).

    Returns:
        The run log's path.

    Raises:
        ValueError: no ``run_dir`` and no ``record`` inside a run folder.
    """
    if run_dir is None:
        if fields.get("record") is None:
            raise ValueError("append_entry needs run_dir or a record inside a run folder")
        run_dir = run_folder(fields["record"])
    target = Path(run_dir) / RUN_LOG
    entry = format_entry(title, **fields)
    with locked(target):
        old = target.read_text(encoding="utf-8") if target.exists() else HEADER
        write_text(target, old.rstrip("\n") + "\n\n" + entry)
    return target
