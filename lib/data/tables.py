"""Dataset statistics for notebook 01, read from the slice cache (no volume is reloaded)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from lib.data.slices import HIST_BINS, SliceSet


def patient_table(slices: SliceSet) -> pd.DataFrame:
    """One row per patient: shape, spacing, raw intensity percentiles, foreground."""
    rows = {}
    for cid, meta in slices.cases.items():
        s = meta.stats
        rows[cid] = {
            "shape": "x".join(map(str, meta.shape)),
            "spacing_mm": "x".join(f"{v:.2f}" for v in meta.spacing),
            "raw_p0.5": s["raw_percentiles"]["0.5"],
            "raw_median": s["raw_percentiles"]["50"],
            "raw_p99.5": s["raw_percentiles"]["99.5"],
            "foreground_%": 100 * s["foreground_fraction"],
            "slices_with_fg": f"{s['foreground_slices']}/{meta.shape[2]}",
        }
    return pd.DataFrame.from_dict(rows, orient="index")


def foreground_per_slice(slices: SliceSet) -> dict[str, np.ndarray]:
    """Foreground fraction of every slice, per patient (at the cached resolution)."""
    frac = (slices.masks > 0).reshape(len(slices), -1).mean(1)
    return {cid: frac[slices.case_ids == cid] for cid in slices.cases}


def statistics_figure(slices: SliceSet) -> Figure:
    """Normalised intensity histograms, foreground per slice and per patient."""
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 3.8))
    centres = (HIST_BINS[:-1] + HIST_BINS[1:]) / 2
    for cid, meta in slices.cases.items():
        hist = np.asarray(meta.stats["norm_hist"], dtype=float)
        a.plot(centres, hist / hist.sum(), lw=0.8, label=cid)
    a.set(xlabel="normalised intensity", ylabel="share of voxels", title="intensity histograms", yscale="log")
    for frac in foreground_per_slice(slices).values():
        b.plot(np.linspace(0, 1, len(frac)), 100 * frac, lw=0.8)
    b.set(xlabel="relative axial position", ylabel="foreground %", title="foreground per slice")
    ids = list(slices.cases)
    c.bar(range(len(ids)), [100 * slices.cases[i].stats["foreground_fraction"] for i in ids])
    c.set_xticks(range(len(ids)), ids, rotation=90, fontsize=7)
    c.set(ylabel="foreground % of voxels", title="foreground per patient")
    if len(ids) <= 12:
        a.legend(fontsize=6)
    fig.tight_layout()
    return fig


def split_table(split: dict, slices: SliceSet) -> pd.DataFrame:
    """Patients and slices per split."""
    rows = {}
    for name in ("train", "val", "test"):
        sel = np.isin(slices.case_ids, split[name])
        rows[name] = {"patients": len(split[name]), "slices": int(sel.sum()),
                      "slices_with_fg": int((slices.masks[sel].reshape(int(sel.sum()), -1).max(1) > 0).sum())}
    return pd.DataFrame.from_dict(rows, orient="index")


def slice_browser(slices: SliceSet):
    """An ipywidgets browser (patient, slice) over the cached slices, or None without ipywidgets.

    Widget state does not survive papermill: notebooks also show a static figure.
    """
    try:
        import ipywidgets as widgets
    except ImportError:
        return None
    ids = list(slices.cases)

    def show(case_id: str, position: float) -> None:
        sl = slices.patient(case_id)
        i = int(round(position * (len(sl) - 1)))
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.imshow(np.rot90(sl.images[i, 0].astype(np.float32)), cmap="gray")
        if sl.masks[i].any():
            ax.contour(np.rot90(sl.masks[i] > 0), levels=[0.5], colors="lime")
        ax.set_title(f"{case_id} slice {sl.slice_index[i]}")
        ax.axis("off")
        plt.show()

    return widgets.interactive(show, case_id=widgets.Dropdown(options=ids),
                               position=widgets.FloatSlider(min=0, max=1, step=0.01, value=0.5))


def _sizes(stats: dict, digits: int = 0) -> str:
    """``median (p10 to p90)`` of per-axis statistics, axes joined by x."""
    def axes(values):
        values = values if isinstance(values, list) else [values]
        return "x".join(f"{v:.{digits}f}" for v in values)
    return f"{axes(stats['median'])} ({axes(stats['p10'])} to {axes(stats['p90'])})"


def fingerprint_table(fp: dict) -> pd.DataFrame:
    """A dataset fingerprint (:mod:`lib.data.fingerprint`) as a two-column table for notebook 01."""
    unit = fp["spacing_unit"]
    rows = {
        "dataset": f"{fp['dataset']} ({fp['folder']}): {fp['cases']} {'images' if fp['kind'] == '2d' else 'volumes'}",
        "image size px, median (10th to 90th percentile)": _sizes(fp["image_size_px"]),
        f"spacing {unit}": _sizes(fp["spacing_mm"], 3),
        "anisotropy (largest / smallest spacing)": f"{fp['anisotropy']['median']:.2f} (largest {fp['anisotropy']['max']:.2f})",
        "modality": (f"{', '.join(fp['modality']['channels'].values())}; CT {fp['modality']['is_ct']}; "
                     f"intensities look like HU {fp['modality']['intensities_look_like_hu']}"),
    }
    for entry in fp["intensity"].values():
        for part in ("all", "foreground"):
            if entry[part]:
                rows[f"intensity {entry['name']} ({part}) 0.5 / 50 / 99.5 %"] = " / ".join(f"{v:g}" for v in entry[part].values())
    for entry in fp["foreground"].values():
        if entry["cases"]:
            rows[f"{entry['name']}: longer in-plane extent {unit}, median (10th to 90th)"] = (
                f"{_sizes(entry['longer_in_plane_mm'])}, {entry['longer_in_plane_px']['p90']:.0f} px (90th), "
                f"in {entry['cases']} of {fp['cases']}")
    share = fp["foreground_slices"]
    rows["slices with foreground"] = (f"{100 * share['share']:.0f} % "
                                      f"(median {share['slices_with_foreground']['median']:g} per scan)")
    return pd.DataFrame.from_dict(rows, orient="index", columns=["value"])
