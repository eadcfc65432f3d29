"""Patient-level k-fold cross-validation of one segmentation notebook (default: 04_unet).

    python tools/cross_validate.py --data PATH --root runs/heart_cv [--folds 5] [--seed 0] \
        [--start-split runs/heart/split.json] [--notebook 04_unet --name unet] \
        [--engine ray|serial] [--address auto] [--fold-cpus 1] [--fold-gpus 0] \
        -- -p preset cpu

Writes ``<root>/fold_<i>/split_file.json`` (:func:`lib.data.splits.make_folds`: every patient
is tested once), runs the notebook by papermill into ``<root>/fold_<i>/`` with that split
and the papermill arguments after ``--`` (a fold already scored is skipped; an
interrupted one resumes from ``last.pt``), the folds side by side as jobs of
:mod:`lib.common.engine` (a local Ray with every core by default, shared out among the folds: a
2-core machine trains two folds at a time with one thread each; ``--fold-cpus`` sets it;
``--address`` joins a Ray cluster; ``--engine serial`` one after the other). It then prints one row per
test patient and the mean over all patients, and writes ``<root>/cross_validation.csv``.
``--only 3 4`` trains just those folds (a screen of a setting on the folds that matter); the
table then covers the folds scored so far.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lib.common.atomic import read_json  # noqa: E402
from lib.common.engine import ENGINES, EngineConfig  # noqa: E402
from lib.publish import publish_cross_validation  # noqa: E402
from lib.seg.cross_validation import fold_jobs, run_folds  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="an MSD task folder, archive, task name or 'demo'")
    parser.add_argument("--root", type=Path, required=True, help="folder for the fold run folders")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient shuffle")
    parser.add_argument("--start-split", type=Path, help="split.json that becomes fold 0 (its val: fold 1's test)")
    parser.add_argument("--only", type=int, nargs="+", metavar="FOLD", help="train only these folds")
    parser.add_argument("--notebook", default="04_unet")
    parser.add_argument("--name", default="unet", help="model sub-folder the notebook writes")
    parser.add_argument("--engine", choices=ENGINES, default="ray")
    parser.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--fold-cpus", type=float, help="CPUs (torch threads) per fold (default: the cores shared "
                                                        "out among the folds, at least one each)")
    parser.add_argument("--fold-gpus", type=float, default=0, help="GPUs per fold (0.5: two folds share a GPU)")
    parser.add_argument("--max-retries", type=int, default=1, help="further tries of a fold that failed")
    parser.add_argument("--publish", metavar="DATASET", help="also publish to results/DATASET/cross_validation/")
    parser.add_argument("--publish-as", default="cross_validation", metavar="FOLDER",
                        help="sub-folder of results/DATASET/ to publish to (e.g. cross_validation_bf16)")
    args, papermill_args = parser.parse_known_args()
    papermill_args = [a for a in papermill_args if a != "--"]
    start = read_json(args.start_split) if args.start_split else None
    fold_dirs, jobs = fold_jobs(args.data, args.root, folds=args.folds, seed=args.seed, start_split=start,
                                only=args.only, notebook=args.notebook, name=args.name, papermill_args=papermill_args)
    engine = EngineConfig(args.engine, args.address, args.fold_cpus, args.fold_gpus, args.max_retries)
    table = run_folds(args.root, fold_dirs, jobs, args.name, engine)
    print(table.round(3).to_string())
    if args.publish:
        command = " ".join(["python tools/cross_validate.py", *sys.argv[1:]])
        out = publish_cross_validation(args.root, args.name, args.publish, command=command, folder=args.publish_as)
        print(f"published to {out}")
    print(f"\nmean over {len(table)} patients: Dice {table['dice'].mean():.3f} ± {table['dice'].std():.3f}, "
          f"with flip TTA {table['dice_tta'].mean():.3f}, HD95 {table['hd95_mm'].mean():.1f} mm")


if __name__ == "__main__":
    main()
