"""Print a run folder's results as Markdown tables (for diary.md and reports).

    python tools/summarise_run.py runs/heart_dev [runs/heart_dev_64 ...]

Reads every ``<model>/metrics.json`` (segmentation) and ``study/results.json`` (synthetic
data study) it finds; prints nothing for what a run does not have.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib.common.atomic import read_json  # noqa: E402
from lib.publish import markdown_table as markdown  # noqa: E402
from lib.seg.tables import comparison_table  # noqa: E402
from lib.study.analysis import study_conclusions, study_table  # noqa: E402


def main(run_dirs: list[str]) -> None:
    for run_dir in map(Path, run_dirs):
        models = sorted(p.parent.name for p in run_dir.glob("*/metrics.json"))
        if models:
            print(f"### {run_dir}: segmentation (test patients, original resolution)\n")
            print(markdown(comparison_table(run_dir, models)) + "\n")
            for name in models:
                post = run_dir / name / "postprocessing.json"
                if post.is_file():
                    means = {k: v["mean"] for k, v in read_json(post).items()}
                    print(f"{name} post-processing (mean test Dice / HD95 mm): "
                          + ", ".join(f"{k} {v['dice']:.3f} / {v['hd95']:.1f}" for k, v in means.items()) + "\n")
        results = run_dir / "study" / "results.json"
        if results.is_file():
            records = read_json(results)
            print(f"### {run_dir}: synthetic data study ({len(records)} runs)\n")
            print(markdown(study_table(records)) + "\n")
            print(markdown(study_conclusions(records), digits=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
