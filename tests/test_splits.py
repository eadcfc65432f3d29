import json

import pytest

from lib.data.splits import check_split, make_folds, make_split, resolve_split

IDS = [f"la_{i:03d}" for i in range(20)]


def test_split_is_by_patient_and_complete():
    split = make_split(IDS, seed=3)
    sets = [set(split[k]) for k in ("train", "val", "test")]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert set().union(*sets) == set(IDS)
    assert [len(s) for s in sets] == [12, 4, 4]


def test_split_deterministic_by_seed():
    assert make_split(IDS, 1) == make_split(list(reversed(IDS)), 1)
    assert make_split(IDS, 1) != make_split(IDS, 2)


def test_small_datasets():
    split = make_split(["a", "b", "c"], 0)
    assert [len(split[k]) for k in ("train", "val", "test")] == [1, 1, 1]
    with pytest.raises(ValueError, match="at least 3"):
        make_split(["a", "b"], 0)


def test_check_split_rejects_overlap_and_unknown():
    with pytest.raises(ValueError, match="both"):
        check_split({"train": ["a", "b"], "val": ["c"], "test": ["a"]}, ["a", "b", "c"])
    with pytest.raises(ValueError, match="not in the dataset"):
        check_split({"train": ["a"], "val": ["c"], "test": ["zzz"]}, ["a", "b", "c"])


def test_resolve_split_saves_and_reuses(tmp_path):
    split = resolve_split(tmp_path, IDS, seed=5)
    saved = json.loads((tmp_path / "split.json").read_text())
    assert saved["train"] == split["train"] and saved["seed"] == 5
    assert resolve_split(tmp_path, IDS, seed=5)["test"] == split["test"]


def test_split_file_wins(tmp_path):
    fixed = {"train": IDS[:10], "val": IDS[10:15], "test": IDS[15:]}
    (tmp_path / "fixed.json").write_text(json.dumps(fixed))
    split = resolve_split(tmp_path / "run", IDS, seed=0, split_file=tmp_path / "fixed.json")
    assert split["test"] == IDS[15:]
    bad = dict(fixed, test=IDS[:2])
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="bad.json"):
        resolve_split(tmp_path / "run2", IDS, seed=0, split_file=tmp_path / "bad.json")


def test_folds_test_every_patient_once_and_never_mix():
    ids = [f"p{i:02d}" for i in range(11)]
    folds = make_folds(ids, k=5, seed=3)
    assert sorted(c for f in folds for c in f["test"]) == ids
    for i, fold in enumerate(folds):
        check_split(fold, ids)
        assert sorted(fold["train"] + fold["val"] + fold["test"]) == ids
        assert fold["val"] == folds[(i + 1) % 5]["test"]
    assert make_folds(ids, k=5, seed=3) == folds and make_folds(ids, k=5, seed=4) != folds


def test_folds_can_start_from_an_existing_split():
    ids = [f"p{i:02d}" for i in range(10)]
    start = make_split(ids, seed=0)
    folds = make_folds(ids, k=5, seed=1, start=start)
    assert folds[0] == {k: start[k] for k in ("train", "val", "test")}
    assert sorted(c for f in folds for c in f["test"]) == ids
    with pytest.raises(ValueError, match="3 <= k"):
        make_folds(ids, k=11)
    with pytest.raises(ValueError, match="cannot fill"):
        make_folds(ids[:5], k=5, start={"train": ["p00"], "val": ["p01", "p02"], "test": ["p03", "p04"]})
