"""Turn the notebooks' ``data`` parameter into an MSD task folder.

``data`` may be ``"demo"`` (the embedded phantom, generated and packed as a .tar,
then unpacked like a real archive), an MSD task name such as ``"Task02_Heart"``
(downloaded), a path to an MSD archive (.tar / .tar.gz, unpacked safely), a path
to an unpacked task folder, or a folder of 2D images with ``images/`` and ``masks/``
(:mod:`lib.data.images2d`).
"""

from __future__ import annotations

from pathlib import Path

from lib.common.paths import data_root, project_path
from lib.data.demo import make_demo_task
from lib.data.download import MSD_TASKS, download_msd_task, safe_extract
from lib.data.images2d import is_image_folder, read_image_folder
from lib.data.task import MSDDataError, Task, read_task

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def unpack_archive(archive: str | Path, dest: str | Path) -> Path:
    """Safely unpack an MSD archive into ``dest`` (once) and return its task folder."""
    archive = Path(archive)
    name = archive.name
    for suffix in ARCHIVE_SUFFIXES:
        name = name.removesuffix(suffix)
    target = Path(dest) / name
    if not (target / "dataset.json").is_file():
        safe_extract(archive, dest)
    if not (target / "dataset.json").is_file():
        raise MSDDataError(f"{archive}: unpacked, but it holds no {name}/dataset.json")
    return target


def resolve_task(data: str | Path, root: str | Path | None = None) -> Task:
    """Resolve ``data`` (see module docstring) to a checked :class:`Task`.

    Args:
        data: "demo", an MSD task name, an archive path, or a task folder path.
        root: where archives are downloaded, generated and unpacked
            (default :func:`lib.common.paths.data_root`).
    """
    root = Path(root) if root else data_root()
    text = str(data)
    if text == "demo":
        archive = make_demo_task(root / "archives")
        return read_task(unpack_archive(archive, root))
    if text in MSD_TASKS:
        return read_task(download_msd_task(text, root))
    path = project_path(text)
    if path.is_file() and text.endswith(ARCHIVE_SUFFIXES):
        return read_task(unpack_archive(path, root))
    if path.is_dir():
        if not any(path.iterdir()):
            raise MSDDataError(f"{path}: folder is empty (expected dataset.json, imagesTr, labelsTr, "
                               "or images/ and masks/)")
        return read_image_folder(path) if is_image_folder(path) else read_task(path)
    raise MSDDataError(
        f"{text}: not 'demo', an MSD task name ({', '.join(MSD_TASKS)}), an archive, a task folder "
        "or an image folder"
    )
