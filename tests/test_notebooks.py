"""The committed notebooks are the source users edit: thin, consistent and runnable by papermill.

nbval (``--nbval-lax``, configured in pyproject.toml) executes every notebook in
notebooks/ after these tests; here we check their structure, that the three model
notebooks share their code, the Colab cell, and one papermill run with injected parameters.
"""

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import nbformat
import papermill as pm
import pytest
import tomllib

from lib.common import paths
from lib.common.paths import PROJECT_ROOT

NB_DIR = PROJECT_ROOT / "notebooks"
NOTEBOOKS = sorted(p.stem for p in NB_DIR.glob("*.ipynb"))
MODEL_NOTEBOOKS = ["02_pspnet", "03_fpn", "04_unet"]
SHARED_NAMES = ["data", "preset", "run_dir", "split_file", "image_size", "seed"]


def cells(name, kind=None, folder=None):
    nb = nbformat.read((folder or NB_DIR) / f"{name}.ipynb", as_version=4)
    return [c for c in nb.cells if kind is None or c.cell_type == kind]


def is_parameters(cell) -> bool:
    return "parameters" in cell.metadata.get("tags", [])


def assigned_names(source: str) -> list[str]:
    return [t.id for node in ast.parse(source).body if isinstance(node, ast.Assign) for t in node.targets]


def model_notebook_drift(names: list[str], folder=None) -> list[str]:
    """Where the model notebooks differ in anything but parameter values and prose."""
    ref, problems = names[0], []
    ref_cells = cells(ref, folder=folder)
    for other in names[1:]:
        other_cells = cells(other, folder=folder)
        if [c.cell_type for c in ref_cells] != [c.cell_type for c in other_cells]:
            problems.append(f"{other} has other cells than {ref} (cell types "
                            f"{[c.cell_type[0] for c in other_cells]} vs {[c.cell_type[0] for c in ref_cells]})")
            continue
        for i, (a, b) in enumerate(zip(ref_cells, other_cells)):
            if a.cell_type != "code":
                continue
            if is_parameters(a) != is_parameters(b):
                problems.append(f"cell {i}: tagged `parameters` in only one of {ref} and {other}")
            elif is_parameters(a):
                if assigned_names(a.source) != assigned_names(b.source):
                    problems.append(f"cell {i} (parameters): {other} sets {assigned_names(b.source)}, "
                                    f"{ref} sets {assigned_names(a.source)}")
            elif a.source != b.source:
                problems.append(f"cell {i} ({a.source.splitlines()[0][:60]!r}) differs between {ref} and {other}")
    return problems


def test_model_notebooks_differ_only_in_parameters_and_prose():
    problems = model_notebook_drift(MODEL_NOTEBOOKS)
    assert not problems, "notebooks 02-04 must share their code cells:\n" + "\n".join(problems)


def test_drift_is_reported_with_the_cell(tmp_path):
    for name in ("02_pspnet", "03_fpn"):
        nb = nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)
        if name == "03_fpn":
            code = [c for c in nb.cells if c.cell_type == "code" and not is_parameters(c)]
            code[3].source += "\nprint('edited')"
        nbformat.write(nb, tmp_path / f"{name}.ipynb")
    problems = model_notebook_drift(["02_pspnet", "03_fpn"], folder=tmp_path)
    assert len(problems) == 1 and problems[0].startswith("cell ") and "differs between 02_pspnet and 03_fpn" in problems[0]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_parameters_cell_shares_names(name):
    params = [c for c in cells(name, "code") if is_parameters(c)]
    assert len(params) == 1
    for var in SHARED_NAMES:
        assert var in assigned_names(params[0].source)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_papermill_understands_every_parameter(name):
    """papermill skips a line it cannot parse (a comment holding a quote and an "=") and warns that the
    parameter passed with -p is unknown: every assignment must be one it lists."""
    params = next(c for c in cells(name, "code") if is_parameters(c))
    listed = set(pm.inspect_notebook(str(NB_DIR / f"{name}.ipynb")))
    assert set(assigned_names(params.source)) <= listed


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebooks_stay_thin(name):
    for cell in cells(name, "code"):
        if "Colab setup" in cell.source or is_parameters(cell) or cell.source.startswith("%matplotlib"):
            continue  # the setup, parameters and imports cells may be long
        assert len(cell.source.splitlines()) <= 25, cell.source[:80]
        assert "def " not in cell.source and "class " not in cell.source


def colab_cell(name: str) -> str:
    return next(c.source for c in cells(name, "code") if "Colab setup" in c.source)


def test_colab_cell_is_the_same_everywhere_and_plain_python():
    sources = {colab_cell(name) for name in NOTEBOOKS}
    assert len(sources) == 1
    ast.parse(sources.pop())  # no IPython-only syntax: the same code runs anywhere


def _bare_repository(tmp_path: Path) -> Path:
    """A local stand-in for the GitHub repository: the project's pyproject.toml and notebooks/."""
    work, bare = tmp_path / "work", tmp_path / "origin.git"
    (work / "notebooks").mkdir(parents=True)
    shutil.copy(PROJECT_ROOT / "pyproject.toml", work / "pyproject.toml")
    (work / "notebooks" / "README.md").write_text("notebooks\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    for args in (["init", "-q"], ["add", "."], ["commit", "-qm", "stand-in"]):
        subprocess.run([*git, *args], cwd=work, check=True)
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True)
    return bare


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_colab_setup_cell_needs_no_edit_keeps_colabs_kernel_and_uses_drive(name, monkeypatch, tmp_path):
    source = colab_cell(name)
    repo = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    assert f'REPO_URL = "{repo}"  #@param' in source and "YOUR-ACCOUNT" not in source  # a form field, filled in
    assert subprocess.run([sys.executable, str(PROJECT_ROOT / "tools" / "set_repository.py"), "--check"]).returncode == 0
    # the user ticks DRIVE in the form; the repository is a local bare one, /content lives in tmp_path
    source = (source.replace(f'"{repo}"', f'"{_bare_repository(tmp_path)}"').replace("DRIVE = False", "DRIVE = True")
              .replace("/content", str(tmp_path / "content")))
    colab, drive, mounted, calls = types.ModuleType("google.colab"), types.ModuleType("drive"), [], []
    drive.mount = mounted.append
    colab.drive = drive
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setitem(sys.modules, "google.colab.drive", drive)
    for var in ("MSDSEG_HOME", "MSDSEG_RUN_DIR", "MSDSEG_DATA_ROOT"):
        monkeypatch.delenv(var, raising=False)
    run = subprocess.run

    def record(args, *a, **k):
        calls.append(list(args))
        return run(args, *a, **k) if args[0] == "git" else subprocess.CompletedProcess(args, 0)

    monkeypatch.setattr(subprocess, "run", record)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    exec(source, {})
    clone = tmp_path / "content" / "msd-synth-seg"
    assert mounted == [str(tmp_path / "content" / "drive")] and Path.cwd() == clone / "notebooks"
    home = tmp_path / "content" / "drive" / "MyDrive" / "msd-synth-seg"
    assert os.environ["MSDSEG_HOME"] == str(home) and paths.run_dir().parent.parent == home  # runs on Drive
    assert paths.data_root() == home / "data"
    pip = [c for c in calls if c[:3] == [sys.executable, "-m", "pip"]]
    assert pip == [[sys.executable, "-m", "pip", "install", "-q", "-e", str(clone)]]  # no upgrade of anything
    deps = tomllib.loads((clone / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not [d for d in deps if re.match(r"(ipykernel|ipywidgets|jupyter|notebook|ipython)\b", d)]
    monkeypatch.setattr(subprocess, "run", run)
    shutil.rmtree(clone)
    with pytest.raises(RuntimeError, match="git clone .*no-such-repo failed.*REPO_URL"):
        exec(source.replace(str(tmp_path / "origin.git"), str(tmp_path / "no-such-repo")), {})
    del sys.modules["google.colab"]
    exec(source, {})  # outside Colab: does nothing


@pytest.mark.slow
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


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_the_plan_sets_every_parameter_left_to_it(name):
    """A parameter whose default is "from the plan" (None) is a field every plan sets, and the
    setup cell takes the plan's values."""
    from lib.data.plan import PLANNED

    params = next(c for c in cells(name, "code") if is_parameters(c)).source
    left = [line.split(" = ")[0] for line in params.splitlines() if "from the plan" in line]
    assert "image_size" in left and "from the preset" not in params
    assert not (missing := [k for k in left if k not in PLANNED]), f"{name}: the plan does not set {missing}"
    setup = next(c.source for c in cells(name, "code") if "plan.plan_run(preset, globals()" in c.source)
    assert "globals().update(data_plan.fill(globals()))" in setup
    assert any("prepare_run(" in c.source and "plan=data_plan.to_dict()" in c.source for c in cells(name, "code"))
