"""Where data and run folders live.

Relative paths are taken from the project root, so notebooks (run from notebooks/)
and scripts (run from the root) agree. Environment variables override the defaults:
``MSDSEG_HOME`` (the folder that holds downloaded data and run folders instead of the
project root: a Google Drive folder on Colab keeps them across virtual machines),
``MSDSEG_DATA_ROOT`` (downloaded and generated datasets) and ``MSDSEG_RUN_DIR`` (the run
folder when a notebook's ``run_dir`` parameter is None).
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RUN_DIR = "runs/demo"


def project_path(path: str | Path) -> Path:
    """``path`` made absolute against the project root (absolute paths are kept)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else PROJECT_ROOT / path


def home() -> Path:
    """Where data and run folders live: ``$MSDSEG_HOME`` when set, else the project root."""
    home = os.environ.get("MSDSEG_HOME")
    return Path(home).expanduser() if home else PROJECT_ROOT


def home_path(path: str | Path) -> Path:
    """``path`` made absolute against :func:`home` (absolute paths are kept)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else home() / path


def data_root() -> Path:
    """Folder for downloaded and generated datasets."""
    return home_path(os.environ.get("MSDSEG_DATA_ROOT", "data"))


def run_dir(path: str | Path | None = None) -> Path:
    """The run folder: ``path``, else ``$MSDSEG_RUN_DIR``, else ``runs/demo``, relative to
    :func:`home`; created."""
    out = home_path(path or os.environ.get("MSDSEG_RUN_DIR") or DEFAULT_RUN_DIR)
    out.mkdir(parents=True, exist_ok=True)
    return out


def relative_paths(text: str) -> str:
    """``text`` with the absolute paths of the project (and of ``../shared`` beside it) made
    relative, for what is published or written to a run log."""
    return text.replace(f"{PROJECT_ROOT.parent}/shared/", "../shared/").replace(f"{PROJECT_ROOT}/", "")
