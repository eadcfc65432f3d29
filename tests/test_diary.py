import datetime as dt

from lib.diary import append_entry, format_entry


def test_entry_format():
    text = format_entry("run", notebook="nb.ipynb", dataset="demo", params={"seed": 0}, results={"dice": 0.81234},
                        figures=["a.png"], notes="ok", when=dt.datetime(2026, 1, 2, 3, 4))
    assert text.startswith("## 2026-01-02 03:04 run")
    assert "`seed=0`" in text and "dice: 0.8123" in text and "`a.png`" in text and text.rstrip().endswith("ok")


def test_append_keeps_previous_entries(tmp_path):
    path = tmp_path / "diary.md"
    append_entry("first", path=path, notebook="a", dataset="d", params={}, results={"x": 1})
    append_entry("second", path=path, notebook="b", dataset="d", params={}, results={"x": 2})
    text = path.read_text()
    assert text.startswith("# Research diary") and text.index("first") < text.index("second")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".diary")]


def test_env_variable_redirects_diary(tmp_path, monkeypatch):
    monkeypatch.setenv("MSDSEG_DIARY", str(tmp_path / "other.md"))
    assert append_entry("x", notebook="a", dataset="d", params={}, results={}) == tmp_path / "other.md"
