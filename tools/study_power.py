"""How many seeds (training subsets) a study needs to detect an effect, from an earlier study's records.

    python tools/study_power.py results/Task02_Heart_dev/study_mix_spade_gan/results.json --test-patients 20 \
        [--setting "real + spade_gan x1"] [--effect 3] [--power 0.8]

Per patient count: the spread of the seeds' mean paired differences to real only, split into the part
between training subsets and the residual that more test patients average away
(:func:`lib.study.analysis.power_table`), projected to ``--test-patients``, and the seeds a t-test over
seeds needs to detect ``--effect`` Dice points with ``--power`` at the 5 % level.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib.common.atomic import read_json  # noqa: E402
from lib.study.analysis import power_table  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("records", type=Path, help="an earlier study's study/results.json")
    parser.add_argument("--setting", default="real + spade_gan x1", help="the condition compared with real only")
    parser.add_argument("--effect", type=float, default=3.0, help="Dice points to detect")
    parser.add_argument("--power", type=float, default=0.8)
    parser.add_argument("--test-patients", type=int, help="test-set size of the planned study (default: the records')")
    args = parser.parse_args(argv)
    table = power_table(read_json(args.records), args.setting, args.effect / 100, args.power, args.test_patients)
    if table.empty:
        raise SystemExit(f"{args.records}: no patient count with 2 or more seeds of {args.setting!r}")
    print(table.round(2).to_string())


if __name__ == "__main__":
    main()
