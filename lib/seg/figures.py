"""Figures of a run's trained models (notebooks 02-04), drawn from :mod:`lib.seg.tables`."""

from __future__ import annotations

import pandas as pd


def comparison_figure(table: pd.DataFrame):
    """Bar charts of test Dice (± std over patients), HD95, training time and size."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    names = list(table.index)
    axes[0].bar(names, table["test_dice"], yerr=table["test_dice_std"], capsize=3)
    axes[0].set(title="test Dice (mean ± sd over patients)", ylim=(0, 1))
    axes[1].bar(names, table["test_hd95"])
    unit = table["hd95_unit"].iloc[0] if "hd95_unit" in table else "mm"
    axes[1].set(title=f"test HD95 ({unit}, lower is better)")
    axes[2].bar(names, table["train_min"])
    axes[2].set(title="training time (min)")
    axes[3].bar(names, table["params_M"])
    axes[3].set(title="parameters (millions)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=60)
    fig.tight_layout()
    return fig
