"""Named bundles of notebook settings: one ``preset`` parameter sets image size, 2.5D context,
budget and recipe together; any parameter given explicitly (not None) still wins.

    preset = "cpu"
    image_size = None  # None: from the preset
    ...
    globals().update(presets.fill(preset, globals()))
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

UNCAPPED_EPOCHS = 100_000  # epochs when an explicit time budget decides

PRESETS: dict[str, dict[str, Any]] = {
    # A fresh clone on a laptop: every notebook in minutes, numbers only show that it works.
    "demo": {"image_size": 64, "keep_train_state": False, "context_slices": 0, "spacing": False, "roi": False, "roi_minutes": 0.0,
             "epochs": 4, "time_budget_min": 3.0, "patience": 15, "batch_size": 16, "tta": False, "hp_lrs": [3e-4, 1e-3, 3e-3], "hp_epochs": 1, "variant_epochs": 2,
             "variants": {"depth4": {"encoder_depth": 4, "decoder": {"decoder_channels": [256, 128, 64, 32]}},
                          "narrow": {"decoder": {"decoder_channels": [64, 32, 16, 8, 4]}},
                          "scse": {"decoder": {"decoder_attention_type": "scse"}}}},
    # The recommended CPU training (README "Without a GPU"): every scan resampled to the task's median
    # in-plane spacing, a 64 px locator (1.5 of the 15 minutes) and 96 px crops around what it finds, each
    # slice with its two neighbours, the learning rate decaying over the budget, flip TTA; no learning-rate
    # search or architecture variants (each would cost another budget).
    "cpu": {"image_size": 96, "keep_train_state": True, "context_slices": 1, "spacing": "median", "roi": True, "roi_minutes": 1.5,
            "epochs": 60, "time_budget_min": 15.0, "patience": 15, "batch_size": 16, "tta": True, "hp_lrs": [], "hp_epochs": 1, "variant_epochs": 10, "variants": {}},
    # One GPU (Colab T4 or better; not yet measured): the CPU recipe with more epochs, bigger batches and a
    # learning-rate search of 3 short trials, 10 minutes.
    "gpu": {"image_size": 128, "keep_train_state": True, "context_slices": 1, "spacing": "median", "roi": True, "roi_minutes": 1.0,
            "epochs": 200, "time_budget_min": 10.0, "patience": 15, "batch_size": 32, "tta": True, "hp_lrs": [3e-4, 1e-3, 3e-3], "hp_epochs": 3, "variant_epochs": 30, "variants": {}},
}


def fill(preset: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The preset's value of every parameter in ``params`` that is None (not given).

    Names the preset does not set, and parameters given a value, are left alone. A
    ``time_budget_min`` given explicitly lifts the preset's ``epochs`` (unless ``epochs`` is
    given too), so the budget the user asked for is what stops training (or early stopping
    with ``patience``; the training log says which).

    Raises:
        ValueError: an unknown preset name.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    filled = {name: value for name, value in PRESETS[preset].items() if name in params and params[name] is None}
    if params.get("time_budget_min") is not None and "epochs" in filled:
        filled["epochs"] = UNCAPPED_EPOCHS  # a budget given explicitly is spent: the preset's epoch cap is lifted
    return filled
