"""Presets: one parameter sets several, and a parameter given a value wins."""

import pytest

from lib.common.presets import PRESETS, fill


def test_fill_takes_only_the_parameters_left_at_none():
    params = {"image_size": None, "epochs": 7, "tta": None, "unrelated": None}
    assert fill("cpu", params) == {"image_size": PRESETS["cpu"]["image_size"], "tta": PRESETS["cpu"]["tta"]}
    assert fill("demo", {"image_size": 96}) == {}


def test_presets_differ_where_they_should():
    assert PRESETS["demo"]["image_size"] < PRESETS["cpu"]["image_size"] <= PRESETS["gpu"]["image_size"]
    assert PRESETS["cpu"]["context_slices"] == 1 and PRESETS["cpu"]["tta"] is True
    assert not PRESETS["demo"]["roi"] and PRESETS["cpu"]["roi"] and PRESETS["cpu"]["spacing"] == "median"
    assert all(p["roi_minutes"] < p["time_budget_min"] for p in PRESETS.values())


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="unknown preset 'laptop'.*cpu"):
        fill("laptop", {"image_size": None})


def test_an_explicit_time_budget_lifts_the_presets_epoch_cap():
    params = {"epochs": None, "time_budget_min": 5.0, "patience": None}
    filled = fill("demo", params)
    assert filled["epochs"] > 1000 and "time_budget_min" not in filled  # the user's 5 minutes decide
    assert fill("demo", {"epochs": None, "time_budget_min": None})["epochs"] == PRESETS["demo"]["epochs"]
    assert fill("demo", {"epochs": 3, "time_budget_min": 5.0}) == {}  # both given: both kept
