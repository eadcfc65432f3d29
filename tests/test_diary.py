import datetime as dt

from lib.diary import append_entry, format_entry


def test_entry_is_compact_plain_text():
    text = format_entry("run", notebook="nb.ipynb", dataset="demo", setup={"seed": 0, "split": {"train": 8, "val": 2}},
                        results={"dice": 0.81234, "per_class": {"a": 0.5}}, record="runs/x/unet", notes="ok",
                        when=dt.datetime(2026, 1, 2, 3, 4))
    assert text.startswith("## 2026-01-02 03:04 · run")
    assert "seed 0 · split train 8, val 2" in text and "dice 0.8123" in text and "per_class a 0.5" in text
    assert "`runs/x/unet`" in text and text.rstrip().endswith("ok")
    assert "{" not in text and '"' not in text  # no JSON blobs
    assert len(text.splitlines()) <= 8


def test_append_keeps_previous_entries(tmp_path):
    path = tmp_path / "diary.md"
    append_entry("first", path=path, notebook="a", dataset="d", setup={}, results={"x": 1})
    append_entry("second", path=path, notebook="b", dataset="d", setup={}, results={"x": 2})
    text = path.read_text()
    assert text.startswith("# Research diary") and text.index("first") < text.index("second")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".diary") and p.suffix != ".lock"]


def test_env_variable_redirects_diary(tmp_path, monkeypatch):
    monkeypatch.setenv("MSDSEG_DIARY", str(tmp_path / "other.md"))
    assert append_entry("x", notebook="a", dataset="d", setup={}, results={}) == tmp_path / "other.md"
