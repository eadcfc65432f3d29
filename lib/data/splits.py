"""Patient-level train/val/test splits, deterministic by seed, saved as split.json.

Slices of one patient always stay in one split: splitting by slice would leak
near-identical neighbouring slices between training and test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lib.common.atomic import read_json, write_json

SPLITS = ("train", "val", "test")


def make_split(case_ids: list[str], seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2) -> dict[str, list[str]]:
    """Shuffle patients by ``seed`` and cut them into train/val/test.

    Val and test get at least one patient each; train gets the rest.
    """
    ids = sorted(set(case_ids))
    if len(ids) < 3:
        raise ValueError(f"need at least 3 patients for a train/val/test split, got {len(ids)}")
    order = np.random.default_rng(seed).permutation(ids).tolist()
    n_test = max(1, round(test_fraction * len(ids)))
    n_val = max(1, round(val_fraction * len(ids)))
    if n_test + n_val >= len(ids):
        raise ValueError(f"{len(ids)} patients leave none for training with these fractions")
    return {
        "train": sorted(order[n_test + n_val:]),
        "val": sorted(order[n_test:n_test + n_val]),
        "test": sorted(order[:n_test]),
    }


def make_folds(case_ids: list[str], k: int = 5, seed: int = 0,
               start: dict[str, list[str]] | None = None) -> list[dict[str, list[str]]]:
    """Patient-level k-fold cross-validation: every patient is tested exactly once.

    Patients are shuffled by ``seed`` into ``k`` groups; fold ``i`` tests on group ``i``,
    validates on group ``i + 1`` (mod k) and trains on the rest.

    Args:
        start: an existing split to extend: its test and val patients become groups 0
            and 1 (so fold 0 is that split) and the others are shuffled into the rest.
    """
    ids = sorted(set(case_ids))
    if not 3 <= k <= len(ids):
        raise ValueError(f"need 3 <= k <= {len(ids)} patients, got k={k}")
    fixed = []
    if start is not None:
        check_split(start, ids, "start split")
        fixed = [sorted(start["test"]), sorted(start["val"])]
    rest = [c for c in np.random.default_rng(seed).permutation(ids).tolist() if not any(c in g for g in fixed)]
    groups = fixed + [sorted(g.tolist()) for g in np.array_split(np.array(rest, dtype=object), k - len(fixed))]
    if min(map(len, groups)) == 0:
        raise ValueError(f"{len(ids)} patients cannot fill {k} folds around the start split")
    return [
        {"train": sorted(c for j, g in enumerate(groups) if j not in (i, (i + 1) % k) for c in g),
         "val": groups[(i + 1) % k], "test": groups[i]}
        for i in range(k)
    ]


def check_split(split: dict[str, list[str]], case_ids: list[str], source: str = "split") -> None:
    """Raise ValueError if a patient is in two splits, unknown, or a split is missing."""
    missing = [s for s in SPLITS if s not in split]
    if missing:
        raise ValueError(f"{source}: missing split(s) {missing}")
    seen: dict[str, str] = {}
    for name in SPLITS:
        if not split[name] and name != "val":
            raise ValueError(f"{source}: split {name!r} is empty")
        for cid in split[name]:
            if cid in seen:
                raise ValueError(f"{source}: patient {cid!r} is in both {seen[cid]!r} and {name!r}")
            seen[cid] = name
    unknown = sorted(set(seen) - set(case_ids))
    if unknown:
        raise ValueError(f"{source}: patients {unknown} are not in the dataset")


def resolve_split(run_dir: str | Path, case_ids: list[str], seed: int = 0, split_file: str | Path | None = None) -> dict[str, list[str]]:
    """The split every notebook of a run uses, saved as ``run_dir/split.json``.

    ``split_file`` (a JSON with train/val/test lists) wins when given; otherwise an
    existing ``run_dir/split.json`` is reused if it matches the seed, else a new
    split is made by seed.
    """
    out = Path(run_dir) / "split.json"
    if split_file:
        split = read_json(split_file)
        source = str(split_file)
    elif out.is_file() and read_json(out).get("seed") == seed:
        split = read_json(out)
        source = split.get("source", str(out))
    else:
        split = make_split(case_ids, seed)
        source = "generated"
    split = {name: list(split[name]) for name in SPLITS} | {"seed": seed, "source": source}
    check_split(split, case_ids, source)
    write_json(out, split)
    return split
