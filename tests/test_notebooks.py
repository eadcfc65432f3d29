"""The committed notebooks: generated from tools/build_notebooks.py, thin, and runnable by papermill.

nbval (``--nbval-lax``, configured in pyproject.toml) executes every notebook in
notebooks/ after these tests; here we check their structure and one papermill run
with injected parameters.
"""

import json

import nbformat
import papermill as pm
import pytest

from lib.paths import PROJECT_ROOT
from tools.build_notebooks import NOTEBOOKS, build

NB_DIR = PROJECT_ROOT / "notebooks"
SHARED_NAMES = ["data", "run_dir", "split_file", "image_size", "seed"]


def code_cells(name):
    nb = nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)
    return [c for c in nb.cells if c.cell_type == "code"]


def test_committed_notebooks_match_the_builder(tmp_path, monkeypatch):
    monkeypatch.setattr("tools.build_notebooks.NB_DIR", tmp_path)
    for path in build():
        fresh = nbformat.read(path, as_version=4)
        committed = nbformat.read(NB_DIR / path.name, as_version=4)
        assert [c.source for c in fresh.cells] == [c.source for c in committed.cells], (
            f"{path.name} is stale: run `python tools/build_notebooks.py`"
        )


@pytest.mark.parametrize("name", list(NOTEBOOKS))
def test_parameters_cell_shares_names(name):
    params = [c for c in code_cells(name) if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    for var in SHARED_NAMES:
        assert f"\n{var} = " in "\n" + params[0].source


def test_model_notebooks_differ_only_in_parameters():
    def body(name):
        return [c.source for c in code_cells(name) if "parameters" not in c.metadata.get("tags", [])]

    assert body("02_pspnet") == body("03_fpn")
    assert body("04_unet")[: len(body("02_pspnet")) - 1] != []  # 04 extends the same template
    template = set(body("02_pspnet"))
    assert template <= set(body("04_unet"))


@pytest.mark.parametrize("name", list(NOTEBOOKS))
def test_notebooks_stay_thin(name):
    for cell in code_cells(name):
        if "Colab setup" in cell.source or "parameters" in cell.metadata.get("tags", []):
            continue
        assert len(cell.source.splitlines()) <= 25, cell.source[:80]
        assert "def " not in cell.source and "class " not in cell.source


def test_papermill_run_with_injected_parameters(tmp_path):
    split = {"train": ["la_demo_000", "la_demo_001", "la_demo_002", "la_demo_003"], "val": ["la_demo_004"],
             "test": ["la_demo_005"]}
    (tmp_path / "split.json").write_text(json.dumps(split))
    out = tmp_path / "01.ipynb"
    pm.execute_notebook(
        str(NB_DIR / "01_data_analysis.ipynb"), str(out), cwd=str(NB_DIR), kernel_name="python3", progress_bar=False,
        parameters={"run_dir": str(tmp_path / "run"), "image_size": 32, "split_file": str(tmp_path / "split.json")},
    )
    saved = json.loads((tmp_path / "run" / "split.json").read_text())
    assert saved["test"] == ["la_demo_005"] and saved["train"] == split["train"]
    assert (tmp_path / "run" / "data" / "statistics.png").is_file()
    text = out.read_text()
    assert "(8, 1, 32, 32)" in text and "'train': 4, 'val': 1, 'test': 1" in text
