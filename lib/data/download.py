"""Download and safely extract Medical Segmentation Decathlon (MSD) task archives.

The URLs and MD5 checksums are the ones MONAI uses in ``monai.apps.DecathlonDataset``.
Downloads go to a temporary file that is renamed only once its checksum is verified.
Archives are checked member by member before anything is extracted: links (symbolic and
hard), devices, fifos, paths that are absolute or leave the destination, and duplicate paths
are refused. Extraction does not rely on tarfile's extraction filters (which some Python
versions get wrong, e.g. CVE-2025-4517): directories and regular files are written by this
module, so its safety does not depend on the Python version.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath, PureWindowsPath

from tqdm.auto import tqdm

from lib.common.atomic import atomic_path

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
# Create a new file only: O_EXCL fails on any existing entry, a link included.
_CREATE_FLAGS = (
    os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
)


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

    Refused before anything is written: symbolic and hard links (wherever they point),
    devices, fifos and other special files, absolute paths, ``..`` components, Windows
    drives or backslashes, members inside a non-directory member, and members whose path
    repeats an earlier one. macOS junk (``._*`` files, ``__MACOSX/``) and a ``.`` root entry
    are skipped. Directories and regular files are written by this function (new files only,
    mode 0o644 or 0o755 under the umask, no setuid) into a temporary folder inside ``dest``,
    whose top-level entries are then moved into place; the folder is removed on any failure.

    Args:
        archive: tar archive, optionally gzip/bz2/xz compressed.
        dest: destination folder (created if missing).

    Returns:
        The extracted paths under ``dest``, in archive order.

    Raises:
        ValueError: the archive has refused members (all of them are named, with reasons).
        FileExistsError: a top-level entry of the archive already exists in ``dest``.
    """
    archive, dest = Path(archive), Path(dest)
    with tarfile.open(archive, "r:*") as tar:
        members = [m for m in tar.getmembers() if not _is_skipped(m)]
        refused = _refusals(members)
        if refused:
            raise ValueError(f"{archive}: refusing to extract unsafe members: {', '.join(refused)}")
        dest.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{archive.name}.", suffix=".extract", dir=dest))
        try:
            _write_members(archive, tar, members, tmp)
            entries = sorted(tmp.iterdir())
            clashes = [str(dest / e.name) for e in entries if os.path.lexists(dest / e.name)]
            if clashes:
                raise FileExistsError(f"{archive}: already present, not overwriting: {clashes}")
            for entry in entries:
                os.replace(entry, dest / entry.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return [dest.joinpath(*_parts(m.name)) for m in members]


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


def _parts(name: str) -> tuple[str, ...]:
    """Components of a member name, without empty and ``.`` components."""
    return PurePosixPath(name).parts


def _is_skipped(member: tarfile.TarInfo) -> bool:
    """True for macOS junk and for a directory entry naming the archive root (``.``)."""
    return _is_macos_junk(member.name) or (member.isdir() and not _parts(member.name))


def _is_macos_junk(name: str) -> bool:
    """True for AppleDouble ``._*`` files and anything under ``__MACOSX/``."""
    parts = _parts(name)
    return "__MACOSX" in parts or (bool(parts) and parts[-1].startswith("._"))


def _refusals(members: list[tarfile.TarInfo]) -> list[str]:
    """``'name' (reason)`` for every member that must not be extracted, in archive order."""
    first: dict[tuple[str, ...], tarfile.TarInfo] = {}
    for member in members:
        first.setdefault(_parts(member.name), member)
    refused = []
    for member in members:
        parts = _parts(member.name)
        reason = _unsafe_reason(member)
        if reason is None and first[parts] is not member:
            reason = f"same path as member {first[parts].name!r}"
        if reason is None:
            above = (first.get(parts[:i]) for i in range(1, len(parts)))
            blocker = next((m for m in above if m is not None and not m.isdir()), None)
            if blocker is not None:
                reason = f"inside non-directory member {blocker.name!r}"
        if reason is not None:
            refused.append(f"{member.name!r} ({reason})")
    return refused


def _unsafe_reason(member: tarfile.TarInfo) -> str | None:
    """Why ``member`` on its own must not be extracted, or None if it may be."""
    if PurePosixPath(member.name).is_absolute():
        return "absolute path"
    if "\\" in member.name or PureWindowsPath(member.name).drive:
        return "Windows drive or backslash in path"
    if ".." in _parts(member.name):
        return "'..' in path"
    if not _parts(member.name):
        return "empty path"
    if member.issym():
        return f"symbolic link to {member.linkname!r}"
    if member.islnk():
        return f"hard link to {member.linkname!r}"
    if not (member.isfile() or member.isdir()):
        return "device, fifo or other special file"
    return None


def _write_members(
    archive: Path, tar: tarfile.TarFile, members: list[tarfile.TarInfo], root: Path
) -> None:
    """Create the directories and regular files of checked ``members`` in the new folder ``root``.

    Files are created with ``O_EXCL``, which never follows a link and never overwrites, and
    every folder written to must resolve inside ``root``.
    """
    real_root = os.path.realpath(root)
    dirs = []
    for member in members:
        target = root.joinpath(*_parts(member.name))
        folder = target if member.isdir() else target.parent
        folder.mkdir(mode=0o755, parents=True, exist_ok=True)
        if os.path.commonpath([real_root, os.path.realpath(folder)]) != real_root:
            raise ValueError(f"{archive}: {member.name!r} resolves outside the extraction folder")
        if member.isdir():
            dirs.append((target, member.mtime))
            continue
        mode = 0o755 if member.mode & 0o111 else 0o644
        fd = os.open(target, _CREATE_FLAGS, mode)
        with os.fdopen(fd, "wb") as out, tar.extractfile(member) as src:
            shutil.copyfileobj(src, out, _CHUNK)
        _set_mtime(target, member.mtime)
    for target, mtime in reversed(dirs):  # after their contents, which change them
        _set_mtime(target, mtime)


def _set_mtime(path: Path, mtime: float) -> None:
    """Set access and modification times of ``path``; a bad archive time is ignored."""
    with contextlib.suppress(OSError, OverflowError, ValueError):
        os.utime(path, (mtime, mtime))
