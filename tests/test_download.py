"""Tests for lib.data.download: MSD archive download, checksum, and safe extraction."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import stat
import tarfile
import urllib.request
from pathlib import Path
from typing import ClassVar

import pytest

from lib.data.download import MSD_TASKS, download_msd_task, safe_extract

TASK = "Task04_Hippocampus"


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _add_special(tar: tarfile.TarFile, name: str, kind: bytes, linkname: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    tar.addfile(info)


def make_task_archive(path: Path, task: str = TASK) -> str:
    """Write a small fake MSD task archive (with macOS junk members); return its MD5."""
    with tarfile.open(path, "w:gz") as tar:
        _add_special(tar, task, tarfile.DIRTYPE)
        _add_bytes(tar, f"{task}/dataset.json", json.dumps({"name": task}).encode())
        _add_bytes(tar, f"{task}/imagesTr/case_001.nii.gz", b"image")
        _add_bytes(tar, f"{task}/labelsTr/case_001.nii.gz", b"label")
        _add_bytes(tar, f"{task}/imagesTr/._case_001.nii.gz", b"junk")
        _add_bytes(tar, f"__MACOSX/{task}/._dataset.json", b"junk")
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def archive(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "src" / f"{TASK}.tar.gz"
    path.parent.mkdir()
    return path, make_task_archive(path)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("urlopen must not be called")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def test_download_file_url_extracts_task(archive: tuple[Path, str], tmp_path: Path) -> None:
    path, md5 = archive
    dest = tmp_path / "data"
    task_dir = download_msd_task(TASK, dest, url=path.as_uri(), md5=md5, progress=False)
    assert task_dir == dest / TASK
    assert json.loads((task_dir / "dataset.json").read_text()) == {"name": TASK}
    assert (task_dir / "imagesTr" / "case_001.nii.gz").read_bytes() == b"image"
    assert not list(dest.rglob("._*")) and not (dest / "__MACOSX").exists()
    assert sorted(p.name for p in dest.iterdir()) == sorted([TASK, path.name])


def test_wrong_md5_raises_and_leaves_no_archive(archive: tuple[Path, str], tmp_path: Path) -> None:
    path, md5 = archive
    dest = tmp_path / "data"
    with pytest.raises(ValueError, match=re.escape(path.name)) as err:
        download_msd_task(TASK, dest, url=path.as_uri(), md5="0" * 32, progress=False)
    assert "0" * 32 in str(err.value) and md5 in str(err.value)
    assert list(dest.iterdir()) == []


def test_interrupted_download_leaves_no_file(
    archive: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, md5 = archive

    class Broken(io.BytesIO):
        headers: ClassVar[dict[str, str]] = {}

        def read(self, size: int = -1) -> bytes:
            if self.tell():
                raise ConnectionResetError("connection lost")
            return super().read(4)

    monkeypatch.setattr(urllib.request, "urlopen", lambda url: Broken(path.read_bytes()))
    dest = tmp_path / "data"
    with pytest.raises(ConnectionResetError):
        download_msd_task(TASK, dest, url=path.as_uri(), md5=md5, progress=False)
    assert list(dest.iterdir()) == []


def test_second_call_skips_download(
    archive: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, md5 = archive
    dest = tmp_path / "data"
    first = download_msd_task(TASK, dest, url=path.as_uri(), md5=md5, progress=False)
    mtime = (dest / path.name).stat().st_mtime_ns
    monkeypatch.setattr(urllib.request, "urlopen", pytest.fail)
    assert download_msd_task(TASK, dest, url=path.as_uri(), md5=md5, progress=False) == first
    assert (dest / path.name).stat().st_mtime_ns == mtime


def test_existing_archive_is_extracted_without_download(
    archive: tuple[Path, str], tmp_path: Path, no_network: None
) -> None:
    path, md5 = archive
    dest = tmp_path / "data"
    dest.mkdir()
    shutil.copy(path, dest / path.name)
    task_dir = download_msd_task(TASK, dest, url=path.as_uri(), md5=md5, progress=False)
    assert (task_dir / "dataset.json").is_file()


def test_corrupt_existing_archive_is_downloaded_again(
    archive: tuple[Path, str], tmp_path: Path
) -> None:
    path, md5 = archive
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / path.name).write_bytes(b"truncated")
    task_dir = download_msd_task(TASK, dest, url=path.as_uri(), md5=md5, progress=False)
    assert (task_dir / "dataset.json").is_file()
    assert (dest / path.name).read_bytes() == path.read_bytes()


def test_unknown_task_lists_valid_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Task02_Heart") as err:
        download_msd_task("Task11_Nope", tmp_path)
    assert "Task11_Nope" in str(err.value) and "Task10_Colon" in str(err.value)


def test_msd_tasks_table() -> None:
    assert len(MSD_TASKS) == 10
    for number, (task, entry) in enumerate(MSD_TASKS.items(), start=1):
        assert task.startswith(f"Task{number:02d}_")
        assert entry["url"].startswith("https://") and entry["url"].endswith(f"/{task}.tar")
        assert re.fullmatch(r"[0-9a-f]{32}", entry["md5"])


def test_msd_tasks_match_monai_source() -> None:
    """Same URLs and checksums as monai.apps.DecathlonDataset (read as text, no slow import)."""
    spec = importlib.util.find_spec("monai")
    if spec is None or spec.origin is None:
        pytest.skip("monai not installed")
    source = (Path(spec.origin).parent / "apps" / "datasets.py").read_text()
    for task, entry in MSD_TASKS.items():
        assert f'"{task}": "{entry["url"]}"' in source
        assert f'"{task}": "{entry["md5"]}"' in source


UNSAFE_MEMBERS = {
    "absolute": ("/tmp/evil", tarfile.REGTYPE, ""),
    "dotdot": ("../evil", tarfile.REGTYPE, ""),
    "nested_dotdot": (f"{TASK}/../../evil", tarfile.REGTYPE, ""),
    "symlink_abs": (f"{TASK}/passwd", tarfile.SYMTYPE, "/etc/passwd"),
    "symlink_rel": (f"{TASK}/up", tarfile.SYMTYPE, "../../outside"),
    "hardlink": (f"{TASK}/hard", tarfile.LNKTYPE, "../outside"),
    "hardlink_abs": (f"{TASK}/hard", tarfile.LNKTYPE, "/etc/passwd"),
    "symlink_inside": (f"{TASK}/sub/link.json", tarfile.SYMTYPE, "../dataset.json"),
    "hardlink_inside": (f"{TASK}/hard.json", tarfile.LNKTYPE, f"{TASK}/dataset.json"),
    "chardev": (f"{TASK}/tty", tarfile.CHRTYPE, ""),
    "blockdev": (f"{TASK}/disk", tarfile.BLKTYPE, ""),
    "fifo": (f"{TASK}/pipe", tarfile.FIFOTYPE, ""),
    "backslash": (f"{TASK}\\..\\..\\evil", tarfile.REGTYPE, ""),
    "drive": ("C:evil", tarfile.REGTYPE, ""),
}


@pytest.mark.parametrize("member", UNSAFE_MEMBERS.values(), ids=UNSAFE_MEMBERS.keys())
def test_unsafe_member_rejected_and_nothing_extracted(
    tmp_path: Path, member: tuple[str, bytes, str]
) -> None:
    name, kind, linkname = member
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as tar:
        _add_bytes(tar, f"{TASK}/dataset.json", b"{}")  # a safe member before the bad one
        if kind == tarfile.REGTYPE:
            _add_bytes(tar, name, b"evil")
        else:
            _add_special(tar, name, kind, linkname)
    dest = tmp_path / "out"
    with pytest.raises(ValueError, match=re.escape(path.name)) as err:
        safe_extract(path, dest)
    assert repr(name) in str(err.value)
    assert not dest.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar"]


def _snapshot(root: Path) -> dict[str, str | bytes]:
    """Every entry under ``root``: link target, file content, or ``"dir"``."""
    return {
        str(p.relative_to(root)): (
            f"-> {p.readlink()}" if p.is_symlink() else p.read_bytes() if p.is_file() else "dir"
        )
        for p in root.rglob("*")
    }


def _trusting_extract(path: Path, root: Path) -> None:
    """Extract as tarfile does without a filter (the unprotected, pre-filter behaviour)."""
    root.mkdir(parents=True)
    trusted = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
    with tarfile.open(path) as tar:
        tar.extractall(root, **trusted)


# Link names and targets pass a textual check (each target, joined to the link's folder,
# stays inside), but resolved one after the other they lead two levels above the
# extraction root: out of safe_extract's temporary folder and out of ``dest``.
ESCAPES = {
    "simple": ([("link", "../..")], "link/pwned.txt"),
    "chain": ([("a/b/up", "../.."), ("esc", "a/b/up/../..")], "esc/sentinel.txt"),
}


@pytest.mark.parametrize(("links", "victim"), ESCAPES.values(), ids=ESCAPES.keys())
def test_symlink_escape_refused_and_nothing_written(
    tmp_path: Path, links: list[tuple[str, str]], victim: str
) -> None:
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:
        _add_special(tar, "a/b", tarfile.DIRTYPE)
        for name, target in links:
            _add_special(tar, name, tarfile.SYMTYPE, target)
        _add_bytes(tar, victim, b"pwned")
    probe = tmp_path / "probe"
    _trusting_extract(path, probe / "dest" / "root")
    escaped = probe / Path(victim).name
    assert escaped.read_bytes() == b"pwned", "the archive must escape an unprotected extraction"
    shutil.rmtree(probe)

    (tmp_path / "sentinel.txt").write_bytes(b"original")
    dest = tmp_path / "out"
    dest.mkdir()
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match=re.escape(path.name)) as err:
        safe_extract(path, dest)
    for name, target in links:
        assert f"{name!r} (symbolic link to {target!r})" in str(err.value)
    assert f"{victim!r} (inside non-directory member" in str(err.value)
    assert _snapshot(tmp_path) == before
    assert (tmp_path / "sentinel.txt").read_bytes() == b"original"
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize(
    ("kind", "linkname", "reason"),
    [
        (tarfile.SYMTYPE, "../dataset.json", "symbolic link to '../dataset.json'"),
        (tarfile.LNKTYPE, f"{TASK}/dataset.json", f"hard link to '{TASK}/dataset.json'"),
    ],
    ids=["symlink", "hardlink"],
)
def test_link_to_member_inside_archive_refused(
    tmp_path: Path, kind: bytes, linkname: str, reason: str
) -> None:
    path = tmp_path / "links.tgz"
    with tarfile.open(path, "w:gz") as tar:
        _add_bytes(tar, f"{TASK}/dataset.json", b"{}")
        _add_special(tar, f"{TASK}/sub/link.json", kind, linkname)
    dest = tmp_path / "out"
    with pytest.raises(ValueError, match=re.escape(f"'{TASK}/sub/link.json' ({reason})")):
        safe_extract(path, dest)
    assert not dest.exists()


def test_duplicate_members_refused(tmp_path: Path) -> None:
    path = tmp_path / "dup.tar"
    with tarfile.open(path, "w") as tar:
        _add_bytes(tar, f"{TASK}/dataset.json", b"{}")
        _add_bytes(tar, f"{TASK}/labelsTr/a.nii.gz", b"label")
        _add_bytes(tar, f"{TASK}/dataset.json", b"{}")
        _add_bytes(tar, f"./{TASK}//labelsTr/a.nii.gz", b"other")
    dest = tmp_path / "out"
    with pytest.raises(ValueError, match=re.escape(path.name)) as err:
        safe_extract(path, dest)
    message = str(err.value)
    assert f"'{TASK}/dataset.json' (same path as member '{TASK}/dataset.json')" in message
    assert f"'./{TASK}//labelsTr/a.nii.gz' (same path as member '{TASK}/labelsTr/a.nii.gz')" in (
        message
    )
    assert not dest.exists()


def test_extracted_modes_and_mtimes(tmp_path: Path) -> None:
    path = tmp_path / "modes.tar"
    with tarfile.open(path, "w") as tar:
        for name, mode in [("tool", 0o4777), ("data", 0o666)]:
            info = tarfile.TarInfo(f"{TASK}/{name}")
            info.size, info.mode, info.mtime = 1, mode, 1_000_000_000
            tar.addfile(info, io.BytesIO(b"x"))
    dest = tmp_path / "out"
    assert safe_extract(path, dest) == [dest / TASK / "tool", dest / TASK / "data"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((dest / TASK / "tool").stat().st_mode) == 0o755 & ~umask
    assert stat.S_IMODE((dest / TASK / "data").stat().st_mode) == 0o644 & ~umask
    assert (dest / TASK / "tool").stat().st_mtime == 1_000_000_000


def test_safe_extract_refuses_to_overwrite(archive: tuple[Path, str], tmp_path: Path) -> None:
    path, _ = archive
    dest = tmp_path / "out"
    (dest / TASK).mkdir(parents=True)
    with pytest.raises(FileExistsError, match=TASK):
        safe_extract(path, dest)
    assert [p.name for p in dest.iterdir()] == [TASK]
    assert list((dest / TASK).iterdir()) == []
