"""Named budgets for the notebooks: one ``preset`` says how much time, device memory and image size
a run may spend; the settings themselves follow the data (:mod:`lib.data.plan` turns a dataset's
fingerprint and a budget into a plan, nnU-Net style). Any parameter given explicitly (not None)
still wins, and the plan records it::

    preset = "cpu"
    image_size = None  # None: from the plan
    ...
    data_plan = plan.plan_run(preset, globals())
    globals().update(data_plan.fill(globals()))
"""

from __future__ import annotations

from typing import Any

UNCAPPED_EPOCHS = 100_000  # epochs when the time budget decides

DEMO_VARIANTS = {"depth4": {"encoder_depth": 4, "decoder": {"decoder_channels": [256, 128, 64, 32]}},
                 "narrow": {"decoder": {"decoder_channels": [64, 32, 16, 8, 4]}},
                 "scse": {"decoder": {"decoder_attention_type": "scse"}}}

BUDGETS: dict[str, dict[str, Any]] = {
    # A fresh clone on a laptop: every notebook in minutes, numbers only show that it works. Whole
    # slices squeezed to at most 64 px, no resampling, locator or context slices, 4 epochs or 3 minutes;
    # generators keep no optimiser state (keep_train_state: it would only be needed to continue them).
    "demo": {"time_budget_min": 3.0, "max_image_size": 64, "memory_gb": 2.0, "max_batch": 16, "epochs": 4,
             "resample": False, "locator": False, "context": False, "tta": False, "keep_train_state": False,
             "hp_lrs": [3e-4, 1e-3, 3e-3], "hp_epochs": 1, "variant_epochs": 2, "variants": DEMO_VARIANTS},
    # A CPU (2 cores will do): 15 minutes, at most 256 px, 4 GB for training activations; the time budget
    # decides the epochs; no learning-rate search or architecture variants (each would cost another budget).
    "cpu": {"time_budget_min": 15.0, "max_image_size": 256, "memory_gb": 4.0, "max_batch": 16, "epochs": None,
            "resample": True, "locator": True, "context": True, "tta": True, "keep_train_state": True,
            "hp_lrs": [], "hp_epochs": 1, "variant_epochs": 10, "variants": {}},
    # One GPU (Colab T4 or better; not yet measured): 10 minutes, at most 512 px, 12 GB, and a learning-rate
    # search of 3 short trials.
    "gpu": {"time_budget_min": 10.0, "max_image_size": 512, "memory_gb": 12.0, "max_batch": 32, "epochs": None,
            "resample": True, "locator": True, "context": True, "tta": True, "keep_train_state": True,
            "hp_lrs": [3e-4, 1e-3, 3e-3], "hp_epochs": 3, "variant_epochs": 30, "variants": {}},
}


def budget(preset: str) -> dict[str, Any]:
    """The budget named ``preset`` (a copy).

    Raises:
        ValueError: an unknown preset name.
    """
    if preset not in BUDGETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(BUDGETS)}")
    return dict(BUDGETS[preset])
