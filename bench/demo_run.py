"""What ``make run`` costs on this machine: wall-clock of the whole demo (notebooks 01-05 on the
embedded demo data) and of each notebook, and the run folder's size at its peak and at the end.

    python bench/demo_run.py [--run runs/demo_bench] [--out bench/demo_run_cpu_2cores.json]

The run folder is removed first, so the slice cache and every training start from nothing, as
on a fresh clone. The folder's size is sampled every second while the notebooks run. Not part
of the test suite (a timed test would fail on a busy machine, not on slow code).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib.common.atomic import write_json  # noqa: E402
from lib.common.env import git_sha, hardware  # noqa: E402
from lib.common.paths import PROJECT_ROOT  # noqa: E402


def folder_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:  # written and renamed meanwhile
                pass
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo_bench"))
    parser.add_argument("--out", type=Path, default=Path("bench/demo_run_cpu_2cores.json"))
    args = parser.parse_args()
    run = (PROJECT_ROOT / args.run).resolve()
    shutil.rmtree(run, ignore_errors=True)
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.wait(1.0):
            peak[0] = max(peak[0], folder_bytes(run))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    subprocess.run(["make", "run", f"RUN={run}"], cwd=PROJECT_ROOT, check=True)
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    final = folder_bytes(run)
    notebooks = {}
    for nb in sorted((run / "notebooks").glob("*.ipynb")):
        meta = json.loads(nb.read_text())["metadata"].get("papermill", {})
        notebooks[nb.stem] = round(float(meta.get("duration") or 0.0), 1)
    report = {"command": f"make run RUN={args.run}", "commit": git_sha(), "hardware": hardware(),
              "precision_env": os.environ.get("MSDSEG_AMP", "unset (autocast where the hardware has it)"),
              "wall_s": round(wall, 1), "notebook_seconds": notebooks,
              "peak_mb": round(max(peak[0], final) / 2**20, 1), "final_mb": round(final / 2**20, 1)}
    write_json(args.out, report)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
