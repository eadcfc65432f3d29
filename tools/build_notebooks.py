"""Write the five notebooks from the cell lists below (run: ``python tools/build_notebooks.py``).

The three model notebooks (02-04) come from one template and differ only in their
parameters and commentary, so no cell is copy-pasted between them by hand.
Outputs are not stored: ``make run`` writes executed copies into the run folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

ROOT = Path(__file__).resolve().parent.parent
NB_DIR = ROOT / "notebooks"

COLAB = """\
# Colab setup: installs this project when run on Google Colab; does nothing elsewhere.
import os
import sys

if "google.colab" in sys.modules and not os.path.isdir("/content/msd-synth-seg"):
    REPO_URL = os.environ.get("MSDSEG_REPO_URL", "https://github.com/msd-synth-seg/msd-synth-seg.git")
    !git clone -q {REPO_URL} /content/msd-synth-seg
    %pip install -q -e /content/msd-synth-seg
    os.chdir("/content/msd-synth-seg/notebooks")
    sys.path.insert(0, "/content/msd-synth-seg")"""

COMMON_PARAMS = """\
data = "demo"  # "demo", an MSD task name ("Task02_Heart": downloaded), an archive path or a task folder
run_dir = None  # None: $MSDSEG_RUN_DIR or runs/demo; notebooks 02-05 read what 01 left there
split_file = None  # optional JSON {"train": [...], "val": [...], "test": [...]} of patient ids
image_size = 64  # slice side fed to the networks (CPU demo: 64; full size on a GPU: 128-256)
seed = 0  # seed of the patient split and of training
device = "auto"  # "auto" (CUDA if available), "cpu" or "cuda\""""


def md(text: str) -> nbformat.NotebookNode:
    return new_markdown_cell(text.strip())


def code(text: str, *tags: str, expect: str | None = None) -> nbformat.NotebookNode:
    """A code cell; ``expect`` stores the output nbval checks (marked ``# NBVAL_CHECK_OUTPUT``)."""
    cell = new_code_cell(text.strip())
    if tags:
        cell.metadata["tags"] = list(tags)
    if expect is not None:
        cell.source = "# NBVAL_CHECK_OUTPUT\n" + cell.source
        cell.outputs = [new_output("stream", name="stdout", text=expect + "\n")]
        cell.execution_count = 1
    return cell


def imports(block: str) -> nbformat.NotebookNode:
    """The imports cell: every import of the notebook, then the environment report."""
    return code(f"%matplotlib inline\n{block.strip()}\n\nreport = env.print_env()")


def notebook_01() -> list:
    return [
        md("""
# 01 · Data analysis: MSD task → 2D slices → patient split

Takes a Medical Segmentation Decathlon task (default: the embedded demo phantom in MSD layout;
`data="Task02_Heart"` downloads the real left-atrium MRI task), unpacks the archive, reads the
NIfTI volumes with nibabel, converts each volume to normalised 2D axial slices (cached once per
patient), shows a patient, the dataset statistics and the patient-level split, and makes the
tensors the networks eat. Notebooks 02–05 reuse the run folder this notebook fills.
"""),
        code(COLAB),
        imports("""
import time

import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
import torch
from IPython.display import display

from lib import diary, env, stats, viz
from lib.data_source import resolve_task
from lib.msd import load_volume
from lib.pipeline import prepare_run"""),
        md("## Parameters\nShared by all notebooks, so one papermill command line drives them all."),
        code(COMMON_PARAMS, "parameters"),
        md("""
## 1. Get the task
`"demo"` generates the phantom task, packs it as an MSD-style `.tar` and unpacks it like a real
archive (unsafe member paths are refused). An MSD task name downloads the official archive and
checks its MD5.
"""),
        code("""
task = resolve_task(data)
print(f"{task.name}: {len(task.cases)} patients, modalities {task.modalities}, labels {task.labels}")
print(task.root)"""),
        md("## 2. Read one NIfTI volume\nVoxel order, spacing and affine are kept so predictions can be written back in the original geometry."),
        code("""
volume = load_volume(task, task.cases[0])
print(f"{volume.case_id}: image {volume.image.shape} (C, X, Y, Z), label {volume.label.shape}")
print(f"spacing {tuple(round(s, 3) for s in volume.spacing)} mm, orientation {nib.aff2axcodes(volume.affine)}")
print(f"intensity range {volume.image.min():.0f}..{volume.image.max():.0f}, label values {np.unique(volume.label).tolist()}")"""),
        md("""
## 3. Volumes → 2D slices (cached)
Per-volume normalisation (MRI: percentile clip + z-score; CT: HU window), every axial slice
resized to `image_size`, stored per patient as `<patient>.npz` (float16 images, uint8 masks,
geometry) in a cache folder named by the settings. A second call reuses a fresh cache.
"""),
        code("""
t0 = time.perf_counter()
run = prepare_run(data, run_dir, split_file, image_size, seed)
convert_seconds = time.perf_counter() - t0
print(f"slices ready in {convert_seconds:.1f} s -> {run.cache_dir}")
everyone = run.all_slices()
print(f"{len(everyone)} slices: images {everyone.images.shape} {everyone.images.dtype}, masks {everyone.masks.shape} {everyone.masks.dtype}")"""),
        md("## 4. One patient as an image + mask grid"),
        code("""
first = everyone.patient(task.cases[0].case_id)
fig = viz.patient_grid(first.images, first.masks, title=f"patient {task.cases[0].case_id}", slice_index=first.slice_index)
viz.save_figure(fig, run.run_dir / "data" / "patient_grid.png")
plt.show()"""),
        md("## 5. Dataset statistics\nVolume shapes and spacings, raw intensity percentiles, normalised intensity histograms, and how much of each slice and patient is foreground."),
        code("""
table = stats.patient_table(everyone)
display(table.round(2))
fig = stats.statistics_figure(everyone)
viz.save_figure(fig, run.run_dir / "data" / "statistics.png")
plt.show()"""),
        md("""
## 6. Slice browser
Interactive in JupyterLab/Colab (widget state does not survive papermill); the static figure
below shows every slice position of one patient for readers of the executed notebook.
"""),
        code("""
browser = stats.slice_browser(everyone)
if browser is not None:
    display(browser)
fig = viz.patient_grid(first.images, first.masks, n=24, cols=8, title="every slice position (static fallback)",
                       slice_index=first.slice_index)
plt.show()"""),
        md("## 7. Patient-level split\nSplit by patient, never by slice, deterministic by `seed`, saved as `split.json` in the run folder and reused by every notebook."),
        code("""
print({name: run.split[name] for name in ("train", "val", "test")})
display(stats.split_table(run.split, everyone))"""),
        code("""
sizes = {name: len(run.split[name]) for name in ("train", "val", "test")}
assert not set(run.split["train"]) & set(run.split["test"]) and not set(run.split["val"]) & set(run.split["test"])
print(sizes)""", expect="{'train': 8, 'val': 2, 'test': 2}"),
        md("## 8. Tensors for the network\nWhole splits stay in memory as compact arrays; batches become float tensors (N, C, H, W) and long masks (N, H, W)."),
        code("""
train = run.slices("train")
x = torch.from_numpy(train.images[:8]).float()
y = torch.from_numpy(train.masks[:8]).long()
print(tuple(x.shape), x.dtype, tuple(y.shape), y.dtype)""", expect="(8, 1, 64, 64) torch.float32 (8, 64, 64) torch.int64"),
        md("## Diary entry"),
        code("""
diary.append_entry(
    "01 data analysis",
    notebook="01_data_analysis.ipynb",
    dataset=run.dataset_name,
    params={"data": data, "image_size": image_size, "seed": seed},
    results={
        "patients": len(task.cases),
        "slices": len(everyone),
        "split": sizes,
        "conversion_seconds": round(convert_seconds, 2),
        "foreground_slices_%": round(100 * float((everyone.masks.reshape(len(everyone), -1).max(1) > 0).mean()), 1),
        "hardware": report["hardware"],
    },
    figures=[run.run_dir / "data" / "patient_grid.png", run.run_dir / "data" / "statistics.png"],
)"""),
    ]


SEG_PARAMS = """\
name = {name!r}  # sub-folder of run_dir for this model
arch = {arch!r}  # any segmentation-models-pytorch architecture name
encoder_name = "resnet18"
encoder_depth = None  # None: the architecture's default
decoder = {decoder!r}  # extra decoder options, e.g. {{"decoder_attention_type": "scse"}}
context_slices = 0  # 2.5D input: neighbouring slices on each side as extra channels (1: 3 slices per sample)
encoder_weights = None  # "imagenet" needs network access (e.g. Colab)
epochs = 4
time_budget_min = 3.0  # training stops gracefully when spent, then evaluates as usual
batch_size = 16
lr = 1e-3
augment = True
tta = False  # flip test-time augmentation for the reported scores
largest_component = True  # keep the largest 3D connected component (nnU-Net post-processing)"""


def seg_notebook(title: str, intro: str, name: str, arch: str, decoder: dict, extra: list) -> list:
    params = COMMON_PARAMS + "\n" + SEG_PARAMS.format(name=name, arch=arch, decoder=decoder)
    return [
        md(f"# {title}\n\n{intro.strip()}\n\nSame structure as the other model notebooks (02–04); only the parameters differ. Needs the run folder of notebook 01 (it is rebuilt if missing)."),
        code(COLAB),
        imports("""
import matplotlib.pyplot as plt
import torch
from IPython.display import Image, display

from lib import diary, env, segment, viz
from lib.augment import AugmentConfig, augment_batch
from lib.evaluate import metrics_table, postprocessing_table
from lib.pipeline import prepare_run
from lib.train import TrainConfig"""),
        md("## Parameters"),
        code(params, "parameters"),
        md("## Data\nThe cached slices and the patient split from notebook 01."),
        code("""
run = prepare_run(data, run_dir, split_file, image_size, seed, context=context_slices, progress=False)
dev = env.get_device(device)
train_cfg = TrainConfig(epochs=epochs, time_budget_min=time_budget_min, batch_size=batch_size, lr=lr, seed=seed,
                        device=str(dev), augment=AugmentConfig() if augment else None)
model_cfg = segment.model_config(run, arch, encoder_name, encoder_depth, decoder, encoder_weights)
print(run.dataset_name, {k: len(run.split[k]) for k in ("train", "val", "test")}, "| device:", dev)"""),
        md("## A training batch, as the network sees it (augmented; with context slices, the centre slice is shown)"),
        code("""
train = run.slices("train", context=0)
g = torch.Generator().manual_seed(seed)
xb, yb = augment_batch(torch.from_numpy(train.images[:: max(1, len(train) // 16)][:16]).float(),
                       torch.from_numpy(train.masks[:: max(1, len(train) // 16)][:16]).long(), AugmentConfig(), g)
plt.show(viz.pair_grid(xb.numpy(), yb.numpy(), title="augmented training slices"))"""),
        *extra,
        md("## Train\nDice + BCE loss, AdamW with warm-up and cosine decay (over the time budget when it ends before the epochs do), mixed precision where the hardware has fast bf16/fp16, per-patient 3D Dice on the validation patients every epoch; the best epoch is kept. Re-running resumes from `last.pt`."),
        code("""
result = segment.train_model(run, name, model_cfg, train_cfg)
print(f"stopped by {result.stopped} after {len(result.history)} epochs, {result.train_seconds / 60:.1f} min; "
      f"best val Dice {result.best_val_dice:.3f} at epoch {result.best_epoch}")"""),
        md("## Loss and Dice curves"),
        code("""
display(Image(filename=str(run.run_dir / name / "curves.png")))"""),
        md("## Save and reload\nThe checkpoint holds weights, architecture, data settings and metrics; reloading rebuilds the model and gives identical predictions."),
        code("""
model, meta = segment.reload_model(run, name, dev)
print(f"reloaded {meta['model_config']['arch']} / {meta['model_config']['encoder_name']} from epoch {meta['epoch']}")"""),
        code("""
difference = segment.max_prediction_difference(result.model, model, run.slices("val").images[:32])
print(f"identical predictions after reload: {difference < 1e-5}")""", expect="identical predictions after reload: True"),
        md("## Test patients\nScored at each volume's original resolution against its original label file (as the MSD challenge scores): 3D Dice, IoU, HD95 in mm, volumes in mL; `dice_train_res` is the Dice at the training resolution. Predictions are saved as NIfTI in `predictions/`."),
        code("""
metrics = segment.test_model(run, name, model, meta, tta=tta, largest_component=largest_component, device=dev)
display(metrics_table(metrics).round(3))
print(f"mean test Dice {metrics['mean']['dice']:.3f}, HD95 {metrics['mean']['hd95']:.1f} mm")"""),
        md("### What post-processing changes\nFlip test-time augmentation and largest-component filtering, each measured on the same test patients."),
        code("""
display(postprocessing_table(run.run_dir / name).round(3))"""),
        md("## One test patient, segmented\nGreen: truth, red: prediction. The GIF walks through all slices: image | truth | prediction."),
        code("""
fig, gif, case_id = segment.show_patient(run, name, model, device=dev)
plt.show()
display(Image(filename=str(gif)))"""),
        md("## Diary entry"),
        code("""
diary.append_entry(
    f"{name}: {arch} / {encoder_name}",
    notebook=f"{name} notebook",
    dataset=run.dataset_name,
    params={"image_size": image_size, "epochs": epochs, "time_budget_min": time_budget_min, "lr": lr,
            "batch_size": batch_size, "augment": augment, "seed": seed, "decoder": decoder,
            "context_slices": context_slices},
    results={
        "split": {k: len(run.split[k]) for k in ("train", "val", "test")},
        "stopped_by": result.stopped,
        "epochs_trained": len(result.history),
        "best_val_dice": round(result.best_val_dice, 4),
        "test_dice": round(metrics["mean"]["dice"], 4),
        "test_hd95_mm": round(metrics["mean"]["hd95"], 2),
        "train_minutes": round(result.train_seconds / 60, 2),
        "inference_s_per_volume": round(metrics["mean"]["inference_seconds_per_volume"], 3),
        "hardware": report["hardware"],
    },
    figures=[run.run_dir / name / "curves.png", run.run_dir / name / f"patient_{case_id}.png", gif],
)"""),
    ]


UNET_EXTRA = [
    md("""
## Hyperparameter choice (validation split only)
Short runs with several learning rates, scored on the **validation** patients; the test patients
are never looked at. The chosen rate trains the U-Net below.
"""),
    code("""
hp_table = segment.choose_learning_rate(run, model_cfg, train_cfg, hp_lrs, hp_epochs)
display(hp_table.round(4))
lr = float(hp_table["val_dice"].idxmax())
train_cfg.lr = lr
print(f"chosen learning rate: {lr:g}")"""),
]

UNET_AFTER = [
    md("""
## U-Net architecture changes
Each variant changes one thing of the U-Net (encoder depth, decoder width, scSE attention), is
trained with the same budget and scored on the same test patients.
"""),
    code("""
variant_table = segment.architecture_study(run, model_cfg, train_cfg, unet_variants, epochs=variant_epochs, device=dev)
display(variant_table.round(3))"""),
    md("""
## PSPNet vs FPN vs U-Net, and a recommendation
Reads each model's `metrics.json` (notebooks 02 and 03 must have run in this run folder). The
recommendation ranks by **validation** Dice (the test set only reports), then weighs time and size.
"""),
    code("""
comparison = segment.comparison_table(run.run_dir, ["pspnet", "fpn", "unet", *[f"unet_{v}" for v in unet_variants]])
display(comparison.round(3))
fig = segment.comparison_figure(comparison)
viz.save_figure(fig, run.run_dir / "comparison.png")
plt.show()
recommendation = segment.recommend(comparison)
print(recommendation)"""),
    code("""
diary.append_entry(
    "model comparison",
    notebook="04_unet.ipynb",
    dataset=run.dataset_name,
    params={"image_size": image_size, "epochs": epochs, "seed": seed},
    results={row: {k: round(float(v), 4) for k, v in vals.items() if isinstance(v, (int, float))}
             for row, vals in comparison.to_dict(orient="index").items()},
    figures=[run.run_dir / "comparison.png"],
    notes=recommendation,
)"""),
]

UNET_PARAMS_EXTRA = """
hp_lrs = [3e-4, 1e-3, 3e-3]  # learning rates compared on the validation split
hp_epochs = 1  # epochs of each short hyperparameter run
variant_epochs = 2  # epochs of each architecture variant (the main U-Net uses `epochs`)
unet_variants = {  # architecture changes, each trained like the main U-Net
    "depth4": {"encoder_depth": 4, "decoder": {"decoder_channels": [256, 128, 64, 32]}},
    "narrow": {"decoder": {"decoder_channels": [64, 32, 16, 8, 4]}},
    "scse": {"decoder": {"decoder_attention_type": "scse"}},
}"""


def unet_notebook() -> list:
    cells = seg_notebook(
        "04 · U-Net",
        "U-Net (Ronneberger et al. 2015): encoder–decoder with skip connections at every scale, the "
        "backbone of nnU-Net. This notebook also holds the bonus items: a learning rate chosen on the "
        "validation split, U-Net architecture changes with their measured effect, and the comparison "
        "of the three models with a recommendation.",
        "unet", "unet", {}, UNET_EXTRA,
    )
    params = next(c for c in cells if "parameters" in c.metadata.get("tags", []))
    params.source += UNET_PARAMS_EXTRA
    cells.extend(UNET_AFTER)
    return cells


SYNTH_PARAMS = """
generator_epochs = 4  # epochs of the VAE and of the diffusion model (full size: 100-300)
generator_time_budget_min = 2.0  # each generator stops gracefully when this is spent
latent_dim = 64
vae_channels = 32  # width of the VAE (CPU on real data: 16)
beta = 1.0  # weight of the VAE's KL term
kl_warmup_epochs = 3  # beta ramps up linearly over these epochs
sample_steps = 20  # DDIM steps of the diffusion sampler
diffusion_channels = 16  # width of the denoiser U-Net (CPU: 16; GPU: 32-64)
n_samples = 64  # synthetic pairs drawn from each generator for the quality table
study_n_real = [1]  # real training patients in the study ("all" = the whole train split)
study_ratios = [1.0]  # synthetic slices per real slice in the real+synthetic runs
study_seeds = [0]  # at least 3 seeds for real conclusions
study_epochs = 2  # U-Net epochs of each study run
study_samples_per_epoch = 128  # slices per epoch, the same for every run (same number of steps)
study_generator_epochs = 2  # generator epochs inside the study (one generator per subset and seed)"""


def notebook_05() -> list:
    return [
        md("""
# 05 · Synthetic image+mask pairs: VAE, diffusion, and does it help segmentation?

1. A convolutional **VAE** that generates paired slices (image and one-hot mask as channels of
   one sample), trained on the training patients only: reconstructions, random samples, latent
   interpolations, loss curves.
2. A **mask-conditioned diffusion model** (DDPM trained with v-prediction, DDIM sampling) that
   fixes the VAE's blur: the image is denoised conditioned on a mask, and masks come from
   elastically and affinely deformed training masks (segmentation-guided diffusion, Konz et al. 2024).
3. **Quality** of synthetic data, measured without downloading anything: sharpness, diversity
   (MS-SSIM), memorisation (nearest real slice), image–mask agreement (a U-Net trained on real
   data scores the synthetic pairs), Fréchet distance on that U-Net's encoder features.
4. **The study**: the same U-Net trained on real only, real + synthetic, and synthetic only, at
   several numbers of real patients and seeds, scored on the same real test patients; plus the
   VAE latent-space segmenter as a baseline. Each generator in the study is trained on the same
   real patients as the segmenter it feeds.
"""),
        code(COLAB),
        imports("""
from dataclasses import replace

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import display

from lib import diary, diffusion, env, segment, study, synth_quality, vae, viz
from lib.pipeline import prepare_run
from lib.slices import save_pairs
from lib.train import TrainConfig"""),
        md("## Parameters"),
        code(COMMON_PARAMS + SYNTH_PARAMS, "parameters"),
        md("## Data: the training patients only"),
        code("""
run = prepare_run(data, run_dir, split_file, image_size, seed, progress=False)
dev = str(env.get_device(device))
train = run.slices("train")
images, masks = train.images.astype(np.float32), train.masks
gen_dir = run.run_dir / "generators"
print(f"{len(train)} training slices from {len(run.split['train'])} patients, {images.shape}")"""),
        md("## 1. VAE\nβ-VAE with KL warm-up; image and one-hot mask are encoded and decoded together."),
        code("""
vae_cfg = vae.VAEConfig(image_size=image_size, in_channels=run.task.channels, num_classes=run.task.num_classes,
                        latent_dim=latent_dim, base_channels=vae_channels, beta=beta, kl_warmup_epochs=kl_warmup_epochs, epochs=generator_epochs,
                        seed=seed, time_budget_min=generator_time_budget_min)
vae_model, vae_history = vae.train_vae(images, masks, vae_cfg, device=dev, out_dir=gen_dir / "vae")
fig = viz.history_curves(vae_history, ["loss", "recon_image", "recon_mask", "kl"], "VAE training")
viz.save_figure(fig, gen_dir / "vae_curves.png")
plt.show()"""),
        code("""
pick = viz.pick_slices(masks, 8)
rec_images, rec_masks = vae.reconstruct(vae_model, images[pick], masks[pick])
plt.show(viz.pair_grid(np.concatenate([images[pick], rec_images]), np.concatenate([masks[pick], rec_masks]),
                       title="VAE: real (top) and reconstruction (bottom)"))
vae_images, vae_masks = vae.sample_pairs(vae_model, n_samples, seed=seed, device=dev)
save_pairs(gen_dir / "vae_samples.npz", vae_images, vae_masks, {"generator": "vae", "seed": seed})
fig = viz.pair_grid(vae_images, vae_masks, n=16, title="VAE: random samples")
viz.save_figure(fig, gen_dir / "vae_samples.png")
plt.show()"""),
        code("""
inter_images, inter_masks = vae.interpolate(vae_model, (images[pick[0]], masks[pick[0]]),
                                            (images[pick[-1]], masks[pick[-1]]), steps=8)
plt.show(viz.pair_grid(inter_images, inter_masks, n=8, title="VAE: latent interpolation between two real slices"))"""),
        md("## 2. Mask-conditioned diffusion model"),
        code("""
diff_cfg = diffusion.DiffusionConfig(image_size=image_size, in_channels=run.task.channels,
                                     num_classes=run.task.num_classes, base_channels=diffusion_channels,
                                     batch_size=16, lr=2e-3, epochs=generator_epochs, seed=seed,
                                     sample_steps=sample_steps, time_budget_min=generator_time_budget_min)
diff_model, diff_history = diffusion.train_diffusion(images, masks, diff_cfg, device=dev, out_dir=gen_dir / "diffusion")
fig = viz.history_curves(diff_history, ["loss"], "diffusion training")
viz.save_figure(fig, gen_dir / "diffusion_curves.png")
plt.show()
diff_images, diff_masks = diffusion.sample_pairs(diff_model, n_samples, seed=seed, device=dev)
save_pairs(gen_dir / "diffusion_samples.npz", diff_images, diff_masks, {"generator": "diffusion", "seed": seed})
fig = viz.pair_grid(diff_images, diff_masks, n=16, title="diffusion: random samples")
viz.save_figure(fig, gen_dir / "diffusion_samples.png")
plt.show()"""),
        md("## Save and reload both generators\nA reloaded generator draws the same samples for the same seed."),
        code("""
vae_again, _, _ = vae.load_vae(gen_dir / "vae" / "vae.pt", device=dev)
diff_again, _, _ = diffusion.load_diffusion(gen_dir / "diffusion" / "diffusion.pt", device=dev)
same_vae = np.allclose(vae.sample_pairs(vae_again, 4, seed=1, device=dev)[0], vae.sample_pairs(vae_model, 4, seed=1, device=dev)[0], atol=1e-5)
same_diff = np.allclose(diffusion.sample_pairs(diff_again, 2, seed=1, device=dev)[0], diffusion.sample_pairs(diff_model, 2, seed=1, device=dev)[0], atol=1e-4)
print("identical samples after reload:", same_vae, same_diff)""", expect="identical samples after reload: True True"),
        md("## 3. Quality of the synthetic pairs\nThe reference segmenter is the U-Net of notebook 04 (trained here on real data if it is missing)."),
        code("""
if not (run.run_dir / "unet" / "best.pt").is_file():
    segment.train_model(run, "unet", segment.model_config(run, "unet"),
                        TrainConfig(epochs=study_epochs, seed=seed, device=dev), progress=False)
unet, _ = segment.reload_model(run, "unet", dev)
held_out = run.slices("val")
rows = synth_quality.quality_table(images, masks, {"vae": (vae_images, vae_masks), "diffusion": (diff_images, diff_masks)},
                                   segment.predict_masks_fn(unet, dev), unet.encoder, dev,
                                   held_out=(held_out.images.astype(np.float32), held_out.masks))
quality = pd.DataFrame(rows).set_index("source")
display(quality.round(3))"""),
        md("""
## 4. The study: does synthetic data help segmentation?
Conditions per number of real patients and seed: real only (classic augmentation), real +
synthetic (each generator, each ratio), synthetic only, and the VAE latent segmenter. Every
run is one record of `study/results.json`; re-running skips the records already there.
"""),
        code("""
n_real = [len(run.split["train"]) if n == "all" else int(n) for n in study_n_real]
seg_cfg = TrainConfig(epochs=study_epochs, samples_per_epoch=study_samples_per_epoch, device=dev, patience=None)
gen_cfgs = {"vae": replace(vae_cfg, epochs=study_generator_epochs),
            "diffusion": replace(diff_cfg, epochs=study_generator_epochs)}
records = study.run_study(run, segment.model_config(run, "unet"), seg_cfg, gen_cfgs, n_real, study_ratios,
                          study_seeds, device=dev)
display(study.study_table(records).round(3))
fig = study.study_figure(records)
viz.save_figure(fig, run.run_dir / "study" / "study.png")
plt.show()"""),
        code("""
conclusions = study.study_conclusions(records)
display(conclusions.round(2))"""),
        md("## Diary entry"),
        code("""
diary.append_entry(
    "05 synthetic data study",
    notebook="05_vae_synthesis.ipynb",
    dataset=run.dataset_name,
    params={"image_size": image_size, "generator_epochs": generator_epochs, "study_n_real": study_n_real,
            "study_ratios": study_ratios, "study_seeds": study_seeds, "study_epochs": study_epochs},
    results={"quality": quality.round(3).to_dict(orient="index"),
             "study_mean_dice": {f"{n} | {s}": round(v, 4) for (n, s), v in study.study_table(records)["mean"].items()},
             "verdicts": {f"{n} | {s}": v for (n, s), v in conclusions["verdict"].items()},
             "hardware": report["hardware"]},
    figures=[gen_dir / "vae_samples.png", gen_dir / "diffusion_samples.png", run.run_dir / "study" / "study.png"],
)"""),
    ]


NOTEBOOKS = {
    "01_data_analysis": notebook_01,
    "02_pspnet": lambda: seg_notebook(
        "02 · PSPNet",
        "Pyramid Scene Parsing Network (Zhao et al. 2017): a pyramid pooling module aggregates "
        "context at four scales on top of a shallow encoder (depth 3, output stride 8), then "
        "upsamples ×8. Strong global context, coarse boundaries.",
        "pspnet", "pspnet", {}, [],
    ),
    "03_fpn": lambda: seg_notebook(
        "03 · FPN",
        "Feature Pyramid Network (Lin et al. 2017; Kirillov et al. panoptic FPN head): a top-down "
        "pathway with lateral connections merges features of four scales, predicted at 1/4 "
        "resolution and upsampled ×4.",
        "fpn", "fpn", {}, [],
    ),
    "04_unet": unet_notebook,
    "05_vae_synthesis": notebook_05,
}


def build(names: list[str] | None = None) -> list[Path]:
    """Write the notebooks (all, or those named) and return their paths."""
    written = []
    for name, cells in NOTEBOOKS.items():
        if names and name not in names:
            continue
        nb = new_notebook(cells=cells())
        for i, cell in enumerate(nb.cells):
            cell.id = f"cell-{i:02d}"  # stable ids: rebuilding changes only what changed
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nb.metadata["language_info"] = {"name": "python"}
        path = NB_DIR / f"{name}.ipynb"
        nbformat.write(nb, path)
        written.append(path)
    return written


if __name__ == "__main__":
    for p in build(sys.argv[1:] or None):
        print(p.relative_to(ROOT))
