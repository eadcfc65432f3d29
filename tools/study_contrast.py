"""Every condition of a study against another baseline than real only, with the study's statistics.

    python tools/study_contrast.py results/Task04_Hippocampus/study/results.json \
        --baseline "real + diffusion x1" [--n-real 2]

Paired by seed (training subset) and test patient, as the study's own comparisons with real only
(:func:`lib.study.analysis.study_conclusions`): a t-interval over the seeds and a crossed bootstrap of
seeds and test patients, in Dice points; "helps" means above the baseline. For contrasts inside one
design, such as synthetic pairs added on top against the same pairs replacing real slices, or one
generator against another.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib.common.atomic import read_json  # noqa: E402
from lib.study.analysis import setting_label, study_conclusions  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("records", type=Path, help="a study's study/results.json")
    parser.add_argument("--baseline", required=True, help='the condition compared with, e.g. "real + diffusion x1"')
    parser.add_argument("--n-real", type=int, help="only this patient count")
    args = parser.parse_args(argv)
    records = [r for r in read_json(args.records) if args.n_real in (None, r["n_real"])]
    if not any(setting_label(r) == args.baseline for r in records):
        found = sorted({setting_label(r) for r in records})
        raise SystemExit(f"{args.records}: no record of {args.baseline!r}; conditions: {', '.join(found) or 'none'}")
    print(study_conclusions(records, baseline=args.baseline).round(2).to_string())


if __name__ == "__main__":
    main()
