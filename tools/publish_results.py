"""Publish a run folder's results for readers (``make publish RUN=runs/<name>``).

    python tools/publish_results.py RUN_DIR [--dataset NAME] [--command "make run ..."] [--study]

Writes ``results/<dataset>/`` (default: the task folder's name): the executed notebooks,
key figures, metrics/history/quality/study JSON and an index README.md, each file at most
5 MB (images are downscaled), 25 MB in all; see :mod:`lib.publish`. With ``--study``, only
the synthetic-data study of notebook 05, to ``results/<dataset>/study/``, summarised from the
records so far (a study that runs in chunks can be published between them).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib.publish import publish, publish_study  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--dataset", help="results/ sub-folder (default: the run's task folder name)")
    parser.add_argument("--command", help="the command that made the run, quoted in the index")
    parser.add_argument("--study", action="store_true", help="publish only the study, to results/<dataset>/study/")
    args = parser.parse_args()
    out = (publish_study if args.study else publish)(args.run_dir, args.dataset, command=args.command)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"published {args.run_dir} -> {out} ({total / 2**20:.1f} MB)")


if __name__ == "__main__":
    main()
