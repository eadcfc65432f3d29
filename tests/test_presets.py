"""Presets are budgets (time, memory, largest image); the settings follow the data (tests/test_plan.py)."""

import pytest

from lib.common.presets import BUDGETS, budget


def test_budgets_grow_from_demo_to_gpu():
    assert BUDGETS["demo"]["max_image_size"] < BUDGETS["cpu"]["max_image_size"] < BUDGETS["gpu"]["max_image_size"]
    assert BUDGETS["demo"]["memory_gb"] < BUDGETS["cpu"]["memory_gb"] < BUDGETS["gpu"]["memory_gb"]
    assert BUDGETS["demo"]["time_budget_min"] < BUDGETS["gpu"]["time_budget_min"] < BUDGETS["cpu"]["time_budget_min"]
    assert BUDGETS["demo"]["epochs"] == 4 and BUDGETS["cpu"]["epochs"] is None  # the demo stays minutes long
    assert not BUDGETS["demo"]["locator"] and BUDGETS["cpu"]["locator"] and BUDGETS["cpu"]["tta"]


def test_budget_is_a_copy_and_unknown_presets_are_refused():
    copy = budget("cpu")
    copy["max_image_size"] = 1
    assert BUDGETS["cpu"]["max_image_size"] == 256
    with pytest.raises(ValueError, match="unknown preset 'laptop'.*cpu"):
        budget("laptop")
