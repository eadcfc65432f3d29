"""Patient-level k-fold cross-validation of one segmentation notebook (default: 04_unet).

    python tools/cross_validate.py --data PATH --root runs/heart_cv [--folds 5] [--seed 0] \
        [--start-split runs/heart/split.json] [--notebook 04_unet --name unet] \
        -- -p preset cpu

Writes ``<root>/fold_<i>/split_file.json`` (:func:`lib.splits.make_folds`: every patient
is tested once), runs the notebook by papermill into ``<root>/fold_<i>/`` with that split
and the papermill arguments after ``--`` (a fold already scored is skipped; an
interrupted one resumes from ``last.pt``), then prints one row per test patient and the
mean over all patients, and writes ``<root>/cross_validation.csv``. ``--only 3 4`` trains
just those folds (a screen of a setting on the folds that matter); the table then covers
the folds scored so far.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lib.atomic import read_json, write_json, write_with  # noqa: E402
from lib.data_source import resolve_task  # noqa: E402
from lib.publish import publish_cross_validation  # noqa: E402
from lib.segment import cross_validation_table  # noqa: E402
from lib.splits import make_folds  # noqa: E402


def scored(fold_dir: Path, name: str, test: list[str]) -> bool:
    """Whether ``fold_dir`` already holds test scores of ``name`` on exactly ``test``."""
    metrics, post = fold_dir / name / "metrics.json", fold_dir / name / "postprocessing.json"
    return (metrics.is_file() and post.is_file() and sorted(read_json(metrics)["cases"]) == sorted(test)
            and "cases" in read_json(post)["tta+lcc"])


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
    parser.add_argument("--publish", metavar="DATASET", help="also publish to results/DATASET/cross_validation/")
    parser.add_argument("--publish-as", default="cross_validation", metavar="FOLDER",
                        help="sub-folder of results/DATASET/ to publish to (e.g. cross_validation_bf16)")
    args, papermill_args = parser.parse_known_args()
    papermill_args = [a for a in papermill_args if a != "--"]

    data = str(Path(args.data).resolve()) if Path(args.data).exists() else args.data  # papermill runs in notebooks/
    task = resolve_task(data)
    start = read_json(args.start_split) if args.start_split else None
    folds = make_folds([c.case_id for c in task.cases], args.folds, args.seed, start)
    fold_dirs = []
    for i, split in enumerate(folds):
        fold_dir = (args.root / f"fold_{i}").resolve()
        fold_dirs.append(fold_dir)
        if scored(fold_dir, args.name, split["test"]):
            print(f"fold {i}: already scored, skipped")
            continue
        if args.only is not None and i not in args.only:
            fold_dirs.pop()
            continue
        split_file = write_json(fold_dir / "split_file.json", split)
        print(f"fold {i}: test {split['test']}, val {split['val']}", flush=True)
        subprocess.run(
            [sys.executable, "-m", "papermill", "--cwd", str(ROOT / "notebooks"), "-k", "python3",
             str(ROOT / "notebooks" / f"{args.notebook}.ipynb"), str(fold_dir / f"{args.notebook}.ipynb"),
             "-p", "data", data, "-p", "run_dir", str(fold_dir), "-p", "split_file", str(split_file),
             *papermill_args],
            check=True,
        )
    table = cross_validation_table(fold_dirs, args.name)
    write_with(args.root / "cross_validation.csv", lambda p: table.to_csv(p))
    print(table.round(3).to_string())
    if args.publish:
        command = " ".join(["python tools/cross_validate.py", *sys.argv[1:]])
        out = publish_cross_validation(args.root, args.name, args.publish, command=command, folder=args.publish_as)
        print(f"published to {out}")
    print(f"\nmean over {len(table)} patients: Dice {table['dice'].mean():.3f} ± {table['dice'].std():.3f}, "
          f"with flip TTA {table['dice_tta'].mean():.3f}, HD95 {table['hd95_mm'].mean():.1f} mm")


if __name__ == "__main__":
    main()
