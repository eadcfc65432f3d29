import io
import tarfile

import pytest

from lib.data.run import prepare_run
from lib.data.source import resolve_task
from lib.data.task import MSDDataError
from tests.helpers import make_task


def test_demo_resolves_through_its_archive(tmp_path):
    task = resolve_task("demo", tmp_path)
    assert task.root == tmp_path / "Task02_HeartDemo"
    assert (tmp_path / "archives" / "Task02_HeartDemo.tar").is_file()
    assert len(task.cases) == 12 and task.labels == {0: "background", 1: "left atrium"}


def test_task_folder_and_archive(tmp_path):
    folder = make_task(tmp_path / "src" / "Task99_Test", 3)
    assert len(resolve_task(str(folder), tmp_path / "data").cases) == 3
    archive = tmp_path / "Task99_Test.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="Task99_Test")
    task = resolve_task(str(archive), tmp_path / "data")
    assert task.root == tmp_path / "data" / "Task99_Test" and len(task.cases) == 3


def test_unsafe_archive_is_refused(tmp_path):
    archive = tmp_path / "Task98_Evil.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("../outside.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(ValueError, match="outside.txt"):
        resolve_task(str(archive), tmp_path / "data")
    assert not (tmp_path / "outside.txt").exists()


def test_empty_folder_and_nonsense(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MSDDataError, match="empty"):
        resolve_task(str(tmp_path / "empty"), tmp_path)
    with pytest.raises(MSDDataError, match="not 'demo'"):
        resolve_task("Task77_Nothing", tmp_path)


def test_prepare_run_writes_split_and_cache(tmp_path):
    folder = make_task(tmp_path / "Task99_Test", 5)
    run = prepare_run(str(folder), tmp_path / "run", image_size=32, seed=1, progress=False)
    assert (tmp_path / "run" / "split.json").is_file() and (tmp_path / "run" / "run.json").is_file()
    assert len(run.slices("train")) == 3 * 12 and run.labels == [1]
    again = prepare_run(str(folder), tmp_path / "run", image_size=32, seed=1, progress=False)
    assert again.split == run.split and again.cache_dir == run.cache_dir


def test_context_run_feeds_neighbouring_slices_as_channels(tmp_path):
    folder = make_task(tmp_path / "Task99_Test", 5)
    run = prepare_run(str(folder), tmp_path / "run", image_size=32, seed=1, context=1, progress=False)
    assert run.data_settings()["in_channels"] == 3 and run.data_settings()["context_slices"] == 1
    assert run.slices("val").images.shape[1] == 3 and run.slices("val", context=0).images.shape[1] == 1
    plain = prepare_run(str(folder), tmp_path / "run", image_size=32, seed=1, progress=False)
    assert plain.data_settings() != run.data_settings()  # a 2.5D checkpoint is refused on single slices
