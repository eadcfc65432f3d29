import base64
import io
import json

import imageio.v3 as iio
import nbformat
import numpy as np
import pytest
from nbformat.v4 import new_code_cell, new_notebook, new_output
from PIL import Image

from lib import publish
from lib.common.paths import PROJECT_ROOT


def noise_png(side: int, seed: int = 0) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="PNG")
    return out.getvalue()


def fake_run(root, png: bytes):
    """A run folder as the notebooks leave it: notebooks, figures, records, checkpoints, cache."""
    run = root / "run"
    (run / "unet" / "predictions").mkdir(parents=True)
    (run / "cache").mkdir()
    (run / "notebooks").mkdir()
    (run / "run.json").write_text(json.dumps({"task": "Task99_Test"}))
    (run / "split.json").write_text(json.dumps({"train": ["a"], "val": ["b"], "test": ["c"]}))
    metrics = {"model_config": {"arch": "unet", "encoder_name": "resnet18"}, "mean": {"dice": 0.8, "hd95": 3.0,
               "inference_seconds_per_volume": 0.1}, "std": {"dice": 0.1}, "best_val_dice": 0.82, "epochs_trained": 3,
               "train_seconds": 60, "parameters": 1e6, "task_dir": f"{PROJECT_ROOT}/data/Task99_Test"}
    (run / "unet" / "metrics.json").write_text(json.dumps(metrics))
    (run / "unet" / "curves.png").write_bytes(png)
    frames = np.random.default_rng(1).integers(0, 255, (20, 256, 256, 3), dtype=np.uint8)  # 1.3 MB: shrunk
    iio.imwrite(run / "unet" / "patient_c.gif", frames, extension=".gif", duration=100, loop=0)
    (run / "unet" / "best.pt").write_bytes(b"weights")
    (run / "unet" / "predictions" / "c.nii.gz").write_bytes(b"nifti")
    (run / "cache" / "a.npz").write_bytes(b"cache")
    nb = new_notebook(cells=[new_code_cell(f"run_dir = '{PROJECT_ROOT}/runs/x'")])
    nb.cells[0].outputs = [new_output("display_data", data={"image/png": base64.b64encode(png).decode()}),
                           new_output("stream", name="stdout", text=f"saved to {PROJECT_ROOT}/runs/x/unet\n")]
    nb.metadata["papermill"] = {"parameters": {"data": f"{PROJECT_ROOT.parent}/shared/data/Task99", "image_size": 32}}
    nbformat.write(nb, run / "notebooks" / "04_unet.ipynb")
    return run


def test_shrink_image_meets_the_limit_and_keeps_gifs_animated():
    png = noise_png(800)
    small = publish.shrink_image(png, 200_000)
    assert len(png) > 200_000 >= len(small) and Image.open(io.BytesIO(small)).format == "PNG"
    out = io.BytesIO()
    frames = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (200, 200, 3), dtype=np.uint8)) for i in range(20)]
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    gif = publish.shrink_image(out.getvalue(), 150_000)
    assert len(gif) <= 150_000 and Image.open(io.BytesIO(gif)).n_frames > 1
    assert publish.shrink_image(b"tiny", 10) == b"tiny"  # small enough already: untouched


def test_publish_copies_what_a_reader_needs_and_nothing_else(tmp_path):
    run = fake_run(tmp_path, noise_png(1100))
    out = publish.publish(run, results_root=tmp_path / "results", command=f"make run RUN={PROJECT_ROOT}/runs/x")
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["README.md", "notebooks/04_unet.ipynb", "split.json", "unet/curves.png", "unet/metrics.json",
                     "unet/patient_c.gif"]
    assert all((out / f).stat().st_size <= publish.MAX_FILE_BYTES for f in files)
    assert (out / "unet" / "curves.png").stat().st_size <= publish.MAX_IMAGE_BYTES
    text = "".join((out / f).read_text() for f in ("README.md", "notebooks/04_unet.ipynb", "unet/metrics.json"))
    assert str(PROJECT_ROOT) not in text and "../shared/data/Task99" in text
    index = (out / "README.md").read_text()
    assert "| unet |" in index and "[04_unet](notebooks/04_unet.ipynb)" in index and "make run RUN=runs/x" in index
    for target in ("notebooks/04_unet.ipynb", "unet/curves.png", "unet/patient_c.gif"):
        assert f"({target})" in index and (out / target).is_file()


def test_publish_copies_the_run_log_with_relative_paths_and_links_it(tmp_path):
    run = fake_run(tmp_path, noise_png(64))
    out = publish.publish(run, results_root=tmp_path / "results")
    assert not (out / "run_log.md").exists() and "run_log.md" not in (out / "README.md").read_text()
    (run / "run_log.md").write_text("# Run log\n\n## 2026-01-02 03:04 · unet (automatic entry)\n\n"
                                    f"- **Full record**: `{PROJECT_ROOT}/runs/x/unet` (run folder)\n")
    out = publish.publish(run, results_root=tmp_path / "results")
    log = (out / "run_log.md").read_text()
    assert "(automatic entry)" in log and "`runs/x/unet`" in log and str(PROJECT_ROOT) not in log
    index = (out / "README.md").read_text()
    assert "[Run log](run_log.md): what each notebook run recorded." in index
    # another run folder published to the same dataset later: the earlier records stay, none twice
    (run / "run_log.md").write_text((run / "run_log.md").read_text() + "\n## 2026-01-03 10:00 · fpn (automatic entry)\n\n"
                                    "- **Run**: `03_fpn.ipynb`\n")
    log = (publish.publish(run, results_root=tmp_path / "results") / "run_log.md").read_text()
    assert log.count("## 2026-01-02 03:04 · unet") == 1 and log.count("## 2026-01-03 10:00 · fpn") == 1


def test_publish_updates_an_existing_folder_file_by_file(tmp_path):
    run = fake_run(tmp_path, noise_png(100))
    out = publish.publish(run, results_root=tmp_path / "results")
    (out / "study").mkdir()
    (out / "study" / "results.json").write_text("[]")  # published by another command: kept
    (run / "unet" / "metrics.json").write_text((run / "unet" / "metrics.json").read_text().replace("0.82", "0.9"))
    publish.publish(run, results_root=tmp_path / "results")
    assert json.loads((out / "unet" / "metrics.json").read_text())["best_val_dice"] == 0.9
    assert (out / "study" / "results.json").is_file()
    assert not [p for p in out.rglob(".*.tmp*")]


def test_publish_refuses_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        publish.publish(tmp_path, results_root=tmp_path / "results")


def test_generators_are_published_as_synthesis_with_their_quality_table(tmp_path):
    run = fake_run(tmp_path, noise_png(64))
    (run / "generators" / "spade_gan").mkdir(parents=True)
    (run / "generators" / "spade_gan" / "spade_gan.pt").write_bytes(b"weights")
    (run / "generators" / "samples.png").write_bytes(noise_png(64, seed=2))
    row = {"frechet": 2.0, "frechet_ratio": 1.5, "sharpness_ratio": 1.0}
    quality = {"real": row | {"frechet_ratio": 1.0}, "spade_gan": row,
               "training": {"spade_gan": {"settings": {"lr": 2e-4}, "epochs": 12, "train_minutes": 15.0}},
               "sample_grid": "samples.png"}
    (run / "generators" / "quality.json").write_text(json.dumps(quality))
    out = publish.publish(run, results_root=tmp_path / "results")
    assert json.loads((out / "synthesis" / "quality.json").read_text()) == quality
    assert (out / "synthesis" / "samples.png").is_file() and not (out / "generators").exists()
    assert not list(out.rglob("*.pt"))
    index = (out / "README.md").read_text()
    assert "| spade_gan | 2.000 | 1.500 | 1.000 |" in index and "| training |" not in index
    assert "| spade_gan | 12.0 | 15.0 |" in index and "(synthesis/samples.png)" in index


def test_a_study_without_records_leaves_the_published_study_alone(tmp_path):
    run = fake_run(tmp_path, noise_png(64))
    (run / "study").mkdir()
    (run / "study" / "design.json").write_text(json.dumps({"id": "quality-table run"}))
    (run / "study" / "study.png").write_bytes(noise_png(64, seed=3))
    published = tmp_path / "results" / "Task99_Test" / "study"
    published.mkdir(parents=True)
    (published / "design.json").write_text(json.dumps({"id": "the real study"}))
    publish.publish(run, results_root=tmp_path / "results")
    assert json.loads((published / "design.json").read_text()) == {"id": "the real study"}
    assert not (published / "study.png").exists()
    (run / "study" / "results.json").write_text("[]")  # a study that ran is published
    publish.publish(run, results_root=tmp_path / "results")
    assert json.loads((published / "design.json").read_text()) == {"id": "quality-table run"}


def test_cross_validation_is_published_with_its_table_and_fold_records(tmp_path):
    root = tmp_path / "cv"
    for fold, cases in enumerate([["a", "b"], ["c"]]):
        out = root / f"fold_{fold}" / "unet"
        out.mkdir(parents=True)
        scores = {c: {"dice": 0.8 + 0.05 * i, "hd95": 4.0} for i, c in enumerate(cases)}
        (out / "metrics.json").write_text(json.dumps({"cases": scores, "best_val_dice": 0.9, "epochs_trained": 9}))
        (out / "postprocessing.json").write_text(json.dumps({"tta+lcc": {"cases": {c: {"dice": 0.85} for c in cases}}}))
        (out / "history.json").write_text("[]")
        (out / "last.pt").write_bytes(b"weights")
    (root / "fold_0" / "unet" / "fit.json").write_text(json.dumps({"hardware": "2 CPU cores (x86_64), fp32"}))
    (root / "fold_1" / "04_unet.ipynb").write_text(json.dumps(nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell(outputs=[nbformat.v4.new_output(
            "stream", text="torch: 2 | hardware: 2 CPU cores (x86_64), bf16 | threads: 2\n")])])))
    (root / "fold_0" / "04_unet.ipynb").write_text(json.dumps(nbformat.v4.new_notebook()))
    (root / "cross_validation.csv").write_text("patient,dice\na,0.8\n")
    out = publish.publish_cross_validation(root, "unet", "TaskX", tmp_path / "results", command="make cv",
                                           folder="cv_bf16")
    assert out == tmp_path / "results" / "TaskX" / "cv_bf16"
    assert (out / "fold_1" / "unet" / "metrics.json").is_file() and (out / "cross_validation.csv").is_file()
    assert (out / "fold_1" / "unet" / "postprocessing.json").is_file()
    assert not list(out.rglob("*.pt"))
    assert [p.relative_to(out).as_posix() for p in out.rglob("*.ipynb")] == ["fold_0/04_unet.ipynb"]  # one example
    assert [p.relative_to(out).as_posix() for p in out.rglob("*.ipynb")] == ["fold_0/04_unet.ipynb"]  # one example
    index = (out / "README.md").read_text()
    assert "Mean over 3 patients: Dice 0.817" in index and "lowest patient 0.850" in index and "make cv" in index
    # the hardware of each fold: from fit.json, else from the notebook's environment line
    assert "training: 2 CPU cores (x86_64), bf16; 2 CPU cores (x86_64), fp32." in index
    with pytest.raises(FileNotFoundError, match="no cross_validation.csv"):
        publish.publish_cross_validation(tmp_path, "unet", "TaskX", tmp_path / "results")


def test_runs_published_in_a_sub_folder_are_linked_from_the_index_and_keep_their_figures(tmp_path):
    run = fake_run(tmp_path, noise_png(64))
    out = publish.publish(run, results_root=tmp_path / "results", dataset="Task99_Test/demo_preset")
    index = (publish.publish(run, results_root=tmp_path / "results") / "README.md").read_text()
    assert "- [demo_preset/](demo_preset/README.md)" in index and (out / "unet" / "curves.png").is_file()
    assert "demo_preset/unet/curves.png" not in index and "(unet/curves.png)" in index
    for cv in ("cross_validation", "cross_validation_bf16"):  # cross-validations get their own section
        (tmp_path / "results" / "Task99_Test" / cv).mkdir()
        (tmp_path / "results" / "Task99_Test" / cv / "README.md").write_text("# cv")
    index = (publish.publish(run, results_root=tmp_path / "results") / "README.md").read_text()
    cv_section = index.split("## Cross-validation")[1].split("##")[0]
    assert "- [cross_validation_bf16/](cross_validation_bf16/README.md)" in cv_section
    assert "cross_validation" not in index.split("## Other runs published here")[1]


def test_a_sub_folder_published_later_is_linked_from_the_dataset_index(tmp_path):
    run = fake_run(tmp_path, noise_png(64))
    results = tmp_path / "results"
    index = publish.publish(run, results_root=results) / "README.md"
    assert "## Cross-validation" not in index.read_text()
    for cv in ("cross_validation_b", "cross_validation_a"):  # published after the main run, one by one
        (results / "Task99_Test" / cv).mkdir()
        (results / "Task99_Test" / cv / "README.md").write_text("# cv")
        publish.refresh_parent_index(results / "Task99_Test" / cv, results)
    text = index.read_text()
    assert text.count("- [cross_validation_a/](cross_validation_a/README.md)") == 1
    assert text.index("cross_validation_a/") < text.index("cross_validation_b/") < text.index("## Figures")
    assert text.index("## Segmentation: test patients") < text.index("## Cross-validation")
    # the same index as a full republish of the main run writes
    assert text == (publish.publish(run, results_root=results) / "README.md").read_text()
    # a dataset with only a sub-folder gets an index that links it
    (results / "Task98" / "study").mkdir(parents=True)
    (results / "Task98" / "study" / "README.md").write_text("# study")
    publish.refresh_parent_index(results / "Task98" / "study", results)
    assert "- [study/](study/README.md)" in (results / "Task98" / "README.md").read_text()
