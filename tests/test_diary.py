import datetime as dt
import json
import re
from concurrent.futures import ProcessPoolExecutor

import pytest

from lib.common.diary import RUN_LOG, append_entry, format_entry, run_folder
from lib.common.paths import PROJECT_ROOT

DIARY = PROJECT_ROOT / "diary.md"


def make_run(root):
    """A run folder as prepare_run leaves it (run.json), with a model folder."""
    (root / "unet").mkdir(parents=True)
    (root / "run.json").write_text(json.dumps({"task": "Task99_Test"}))
    return root


def test_entry_is_compact_plain_text():
    text = format_entry("run", notebook="nb.ipynb", dataset="demo",
                        setup={"seed": 0, "split": {"train": 8, "val": 2}},
                        results={"dice": 0.81234, "per_class": {"a": 0.5}}, record="runs/x/unet",
                        notes="ok", when=dt.datetime(2026, 1, 2, 3, 4))
    assert text.startswith("## 2026-01-02 03:04 · run")
    assert "seed 0 · split train 8, val 2" in text and "dice 0.8123" in text
    assert "per_class a 0.5" in text
    assert "`runs/x/unet`" in text and text.rstrip().endswith("ok")
    assert "{" not in text and '"' not in text  # no JSON blobs
    assert len(text.splitlines()) <= 8


def test_an_entry_goes_to_the_run_log_of_its_run_folder_and_never_to_the_diary(tmp_path):
    run = make_run(tmp_path / "run")
    diary = DIARY.read_bytes()
    # the notebooks' call: the run folder is the one holding the record
    path = append_entry("first", notebook="a", dataset="d", setup={}, results={"x": 1},
                        record=run / "unet")
    assert path == run / RUN_LOG
    append_entry("second", run_dir=run, notebook="b", dataset="d", setup={}, results={"x": 2})
    text = path.read_text()
    assert text.startswith("# Run log") and text.index("first") < text.index("second")
    assert text.count("(automatic entry)") == 2 and f"`{run / 'unet'}`" in text
    temps = [p for p in run.iterdir() if p.name.startswith(f".{RUN_LOG}") and p.suffix != ".lock"]
    assert not temps
    assert DIARY.read_bytes() == diary


def test_an_entry_outside_a_run_folder_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not inside a run folder"):
        append_entry("x", notebook="a", dataset="d", setup={}, results={}, record=tmp_path / "unet")
    with pytest.raises(ValueError, match="needs run_dir"):
        append_entry("x", notebook="a", dataset="d", setup={}, results={})
    assert run_folder(make_run(tmp_path / "r") / "unet" / "metrics.json") == tmp_path / "r"


def _append_many(run: str, writer: int, count: int) -> None:
    for i in range(count):
        append_entry(f"writer {writer} entry {i}", notebook="nb", dataset="d", setup={},
                     results={"i": i}, record=f"{run}/unet")


def test_concurrent_appends_lose_nothing(tmp_path):
    run = make_run(tmp_path / "run")
    with ProcessPoolExecutor(4) as pool:
        list(pool.map(_append_many, [str(run)] * 4, range(4), [6] * 4))
    text = (run / RUN_LOG).read_text()
    assert text.count("(automatic entry)") == 24 and text.count("# Run log") == 1
    for writer in range(4):
        found = [int(i) for i in re.findall(rf"writer {writer} entry (\d+) \(automatic", text)]
        assert found == list(range(6))  # every entry, in the order its writer appended it


def test_the_diary_holds_written_entries_only():
    text = DIARY.read_text(encoding="utf-8")
    assert "(automatic entry)" not in text
    assert not re.findall(r"\b[Ii]ssues?[ -]\d+|\b[Ii]tems? \d+", text)  # no internal issue numbers
    headings = re.findall(r"^## (.+)$", text, flags=re.M)
    assert headings and all(re.match(r"\d{4}-\d{2}-\d{2} — ", h) for h in headings)  # all dated
    index = text.split("\n## ", 1)[0]
    assert [h for h in headings if f"- [{h}](#" not in index] == []  # every entry in the index
