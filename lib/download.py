"""Download and safely extract Medical Segmentation Decathlon (MSD) task archives.

The URLs and MD5 checksums are the ones MONAI uses in ``monai.apps.DecathlonDataset``.
Downloads go to a temporary file that is renamed only once its checksum is verified, and
archives are checked member by member before anything is extracted.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import tarfile
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from lib.atomic import atomic_path

_BASE_URL = "https://msd-for-monai.s3-us-west-2.amazonaws.com"
_MD5 = {
    "Task01_BrainTumour": "240a19d752f0d9e9101544901065d872",
    "Task02_Heart": "06ee59366e1e5124267b774dbd654057",
    "Task03_Liver": "a90ec6c4aa7f6a3d087205e23d4e6397",
    "Task04_Hippocampus": "9d24dba78a72977dbd1d2e110310f31b",
    "Task05_Prostate": "35138f08b1efaef89d7424d2bcc928db",
    "Task06_Lung": "8afd997733c7fc0432f71255ba4e52dc",
    "Task07_Pancreas": "4f7080cfca169fa8066d17ce6eb061e4",
    "Task08_HepaticVessel": "641d79e80ec66453921d997fbf12a29c",
    "Task09_Spleen": "410d4a301da4e5b2f6f86ec3ddba524e",
    "Task10_Colon": "bad7a188931dc2f6acf72b08eb6202d0",
}

#: Official MSD tasks: name -> {"url": archive URL, "md5": archive checksum}.
MSD_TASKS: dict[str, dict[str, str]] = {
    task: {"url": f"{_BASE_URL}/{task}.tar", "md5": md5} for task, md5 in _MD5.items()
}

_CHUNK = 1 << 20


def download_msd_task(
    task: str = "Task02_Heart",
    dest: str | Path = "data",
    *,
    url: str | None = None,
    md5: str | None = None,
    progress: bool = True,
) -> Path:
    """Download, verify and extract one MSD task; return its folder ``dest/<task>``.

    Nothing is done when ``dest/<task>/dataset.json`` already exists (extraction is
    atomic, so an existing folder is complete). The download is skipped when the archive
    is already in ``dest`` with the right checksum; an archive with a wrong checksum is
    deleted and downloaded again.

    Args:
        task: official task name, e.g. ``"Task02_Heart"`` (see ``MSD_TASKS``).
        dest: folder that receives the archive and the extracted task folder.
        url: archive URL overriding the official one (``file://`` URLs work too).
        md5: expected MD5 of the archive; defaults to the official checksum of ``task``.
        progress: show a tqdm progress bar while downloading.

    Raises:
        ValueError: unknown task, checksum mismatch, or an archive without
            ``<task>/dataset.json``.
    """
    if task not in MSD_TASKS:
        raise ValueError(f"unknown MSD task {task!r}; valid names: {', '.join(MSD_TASKS)}")
    dest = Path(dest)
    task_dir = dest / task
    if (task_dir / "dataset.json").is_file():
        return task_dir
    url = url or MSD_TASKS[task]["url"]
    md5 = (md5 or MSD_TASKS[task]["md5"]).lower()
    name = PurePosixPath(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name
    archive = dest / (name or f"{task}.tar")
    if archive.is_file() and _file_md5(archive) != md5:
        archive.unlink()  # stale or corrupt archive from an earlier run
    if not archive.is_file():
        _download(url, archive, md5, progress)
    safe_extract(archive, dest)
    if not (task_dir / "dataset.json").is_file():
        raise ValueError(f"{archive}: archive has no {task}/dataset.json")
    return task_dir


def safe_extract(archive: str | Path, dest: str | Path) -> list[Path]:
    """Extract a ``.tar``/``.tar.gz``/``.tgz`` archive into ``dest`` after checking every member.

    Members with an absolute path, a ``..`` component, a link pointing outside ``dest``, or
    that are devices or fifos are refused before anything is written. macOS junk
    (``._*`` files, ``__MACOSX/``) is skipped. The archive is extracted into a temporary
    folder inside ``dest`` and its top-level entries are then moved into place.

    Args:
        archive: tar archive, optionally gzip/bz2/xz compressed.
        dest: destination folder (created if missing).

    Returns:
        The extracted paths under ``dest``, in archive order.

    Raises:
        ValueError: the archive has unsafe members (all of them are named).
        FileExistsError: a top-level entry of the archive already exists in ``dest``.
    """
    archive, dest = Path(archive), Path(dest)
    with tarfile.open(archive, "r:*") as tar:
        members = [m for m in tar.getmembers() if not _is_macos_junk(m.name)]
        unsafe = [f"{m.name!r} ({reason})" for m in members if (reason := _unsafe_reason(m))]
        if unsafe:
            raise ValueError(f"{archive}: refusing to extract unsafe members: {', '.join(unsafe)}")
        dest.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{archive.name}.", suffix=".extract", dir=dest))
        try:
            filter_kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, members=members, **filter_kw)
            entries = sorted(tmp.iterdir())
            clashes = [str(dest / e.name) for e in entries if (dest / e.name).exists()]
            if clashes:
                raise FileExistsError(f"{archive}: already present, not overwriting: {clashes}")
            for entry in entries:
                os.replace(entry, dest / entry.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return [dest.joinpath(*PurePosixPath(m.name).parts) for m in members]


def find_task_dir(root: str | Path) -> Path:
    """Return the folder holding ``dataset.json`` in an extraction folder.

    ``root`` itself qualifies; otherwise exactly one of its subfolders must hold one.

    Raises:
        FileNotFoundError: no ``dataset.json`` in ``root`` or its subfolders.
        ValueError: several subfolders hold one.
    """
    root = Path(root)
    if (root / "dataset.json").is_file():
        return root
    found = sorted(p.parent for p in root.glob("*/dataset.json"))
    if not found:
        raise FileNotFoundError(f"{root}: no dataset.json in it or in its subfolders")
    if len(found) > 1:
        raise ValueError(
            f"{root}: several task folders hold dataset.json: {[p.name for p in found]}"
        )
    return found[0]


def _download(url: str, archive: Path, md5: str, progress: bool) -> None:
    """Stream ``url`` to ``archive`` atomically, checking its MD5 before the final rename."""
    digest = hashlib.md5()
    with (
        atomic_path(archive, suffix=".part") as tmp,
        urllib.request.urlopen(url) as response,
        open(tmp, "wb") as out,
        tqdm(
            total=int(response.headers.get("Content-Length") or 0) or None,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=archive.name,
            disable=not progress,
        ) as bar,
    ):
        while chunk := response.read(_CHUNK):
            out.write(chunk)
            digest.update(chunk)
            bar.update(len(chunk))
        actual = digest.hexdigest()
        if actual != md5:
            raise ValueError(
                f"{archive.name} downloaded from {url}: MD5 mismatch, "
                f"expected {md5}, got {actual}; the file was removed"
            )


def _file_md5(path: Path) -> str:
    """MD5 hex digest of a file, read in chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _is_macos_junk(name: str) -> bool:
    """True for AppleDouble ``._*`` files and anything under ``__MACOSX/``."""
    parts = PurePosixPath(name).parts
    return "__MACOSX" in parts or (bool(parts) and parts[-1].startswith("._"))


def _escapes(path: str) -> bool:
    """True if a path relative to the extraction root is absolute or leaves the root."""
    norm = posixpath.normpath(path)
    return posixpath.isabs(norm) or norm == ".." or norm.startswith("../")


def _unsafe_reason(member: tarfile.TarInfo) -> str | None:
    """Why ``member`` must not be extracted, or None if it is safe."""
    if PurePosixPath(member.name).is_absolute():
        return "absolute path"
    if ".." in PurePosixPath(member.name).parts:
        return "'..' in path"
    if member.issym():
        target = posixpath.join(posixpath.dirname(member.name), member.linkname)
        if _escapes(target):
            return f"symlink to {member.linkname!r} outside the destination"
    elif member.islnk():
        if _escapes(member.linkname):
            return f"hardlink to {member.linkname!r} outside the destination"
    elif not (member.isfile() or member.isdir()):
        return "device or fifo"
    return None
