"""Print the plan of each dataset under a preset's budget as a Markdown table (README "How the
settings are chosen"). Fingerprinting only: no training, nothing copied or written.

    python tools/plan_table.py [--preset cpu] [FOLDER ...]

Default folders: the shared datasets in ``../shared/data``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib.common.paths import PROJECT_ROOT  # noqa: E402
from lib.data.fingerprint import compute_fingerprint  # noqa: E402
from lib.data.plan import make_plan  # noqa: E402
from lib.data.source import resolve_task  # noqa: E402

SHARED = PROJECT_ROOT.parent / "shared" / "data"
DATASETS = ["ChestXray_lungs_dev", "Task02_Heart_dev", "LA2018_dev", "Task04_Hippocampus", "TaskKBP_HeadNeckCT_dev"]
COLUMNS = ["dataset", "median size px", "spacing mm", "structure, 90th pct", "image_size", "spacing", "locator",
           "context", "batch", "normalisation"]


def row(folder: Path, preset: str) -> list[str]:
    """One table row: what the fingerprint found and what the plan chose."""
    fp = compute_fingerprint(resolve_task(folder), progress=False)
    plan = make_plan(fp, preset).values
    structure = fp["foreground"]["all"]
    size = "x".join(f"{v:.0f}" for v in fp["image_size_px"]["median"][:2 if fp["kind"] == "2d" else 3])
    spacing = "–" if fp["spacing_unit"] == "px" else "x".join(f"{v:.3g}" for v in fp["spacing_mm"]["median"])
    unit = fp["spacing_unit"]
    extent = f"{structure['longer_in_plane_mm']['p90']:.0f} {unit}" if structure["cases"] else "–"
    return [folder.name, size, spacing, extent, f"{plan['image_size']} px",
            "–" if plan["spacing"] is False else f"{plan['spacing']:.3g} mm", "yes" if plan["roi"] else "no",
            str(plan["context_slices"]), str(plan["batch_size"]), plan["normalisation"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="*", help=f"dataset folders (default: {', '.join(DATASETS)} in {SHARED})")
    parser.add_argument("--preset", default="cpu", help="budget: demo, cpu or gpu (default cpu)")
    args = parser.parse_args(argv)
    folders = [Path(f) for f in args.folders] or [SHARED / name for name in DATASETS if (SHARED / name).is_dir()]
    if not folders:
        print(f"no datasets given and none found in {SHARED}", file=sys.stderr)
        return 2
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for folder in folders:
        print("| " + " | ".join(row(folder, args.preset)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
