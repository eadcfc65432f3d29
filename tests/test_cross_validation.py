"""Cross-validation folds as jobs: on a local Ray 2 folds at a time they give the serial table,
a fold whose worker dies is retried once, and a re-run skips the folds already scored."""

from __future__ import annotations

import functools

import nbformat
import pytest

from lib.common.engine import EngineConfig
from lib.seg.cross_validation import fold_jobs, run_folds
from tests.helpers import exit_once, make_task

FAKE_FOLD = '''
import json, os, zlib
from pathlib import Path
split = json.loads(Path(split_file).read_text())
score = {c: (zlib.crc32(c.encode()) % 1000) / 1000 for c in split["test"]}
out = Path(run_dir) / "unet"
out.mkdir(parents=True, exist_ok=True)
cases = {c: {"dice": s, "hd95": 10 * s} for c, s in score.items()}
(out / "metrics.json").write_text(json.dumps({"cases": cases, "best_val_dice": 0.5, "epochs_trained": 3}))
(out / "postprocessing.json").write_text(json.dumps({"tta+lcc": {"cases": cases}, "plain": {"cases": cases}}))
(out / "threads.txt").write_text(os.environ.get("OMP_NUM_THREADS", ""))
'''


pytestmark = pytest.mark.slow  # starts a local Ray


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pytest.importorskip("ray")
    root = tmp_path_factory.mktemp("cv")
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('data = "demo"\nrun_dir = None\nsplit_file = None\npreset = "demo"')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(FAKE_FOLD)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, root / "fake_fold.ipynb")
    return make_task(root / "Task91_Folds", 6, shape=(16, 16, 4)), root / "fake_fold.ipynb", root


def test_folds_on_ray_give_the_serial_table_survive_a_killed_worker_and_resume(setup, tmp_path):
    data, notebook, _ = setup
    tables = {}
    for name in ("serial", "ray"):
        root = tmp_path / name
        fold_dirs, jobs = fold_jobs(data, root, folds=3, notebook=notebook, papermill_args=["-p", "preset", "cpu"])
        assert len(jobs) == 3 and [j.name[:6] for j in jobs] == ["fold 0", "fold 1", "fold 2"]
        if name == "ray":  # the worker of fold 1 dies on its first try
            jobs[1] = jobs[1].__class__(jobs[1].name, exit_once, {"marker": str(tmp_path / "died"),
                                                                  "fn": functools.partial(jobs[1].fn, **jobs[1].kwargs)})
        engine = EngineConfig(name, num_cpus=1, max_retries=1)
        tables[name] = run_folds(root, fold_dirs, jobs, engine=engine, progress=False)
        assert (root / "cross_validation.csv").is_file()
        assert {(d / "unet" / "threads.txt").read_text() for d in fold_dirs} == {"1"}  # one thread per fold
    assert (tmp_path / "died").exists()
    assert tables["ray"].equals(tables["serial"]) and len(tables["ray"]) == 6  # every patient tested once
    fold_dirs, jobs = fold_jobs(data, tmp_path / "ray", folds=3, notebook=notebook)
    assert jobs == [] and len(fold_dirs) == 3  # scored folds are not trained again


def test_a_failing_fold_is_named_and_the_others_are_kept(setup, tmp_path):
    data, notebook, root = setup
    broken = root / "broken.ipynb"
    nb = nbformat.read(notebook, 4)
    nb.cells[1].source = "if split_file.endswith('fold_0/split_file.json'):\n    raise ValueError('no memory')\n" \
                         + nb.cells[1].source
    nbformat.write(nb, broken)
    fold_dirs, jobs = fold_jobs(data, tmp_path, folds=3, only=[0, 1], notebook=broken)
    with pytest.raises(RuntimeError, match=r"1 of 2 fold\(s\) failed.*fold 0 .*no memory"):
        run_folds(tmp_path, fold_dirs, jobs, engine=EngineConfig("ray", max_retries=0), progress=False)
    assert (tmp_path / "fold_1" / "unet" / "metrics.json").is_file()
