import json

import nbformat
import pytest

from lib import segment, study
from lib.diffusion import DiffusionConfig
from lib.models import ModelConfig
from lib.paths import PROJECT_ROOT
from lib.pipeline import prepare_run
from lib.train import TrainConfig
from lib.vae import VAEConfig
from tests.helpers import make_task

SIZE = 32


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    return prepare_run(str(make_task(root / "Task90_Blobs", 6, shape=(32, 32, 10))), root / "run",
                       image_size=SIZE, seed=0, progress=False)


def configs():
    common = {"image_size": SIZE, "in_channels": 1, "num_classes": 2, "epochs": 1, "batch_size": 16}
    return {"vae": VAEConfig(**common, base_channels=8, latent_dim=8),
            "diffusion": DiffusionConfig(**common, base_channels=8, sample_steps=4, timesteps=100)}


def test_study_records_resume_and_tables(run, monkeypatch, capsys):
    model = ModelConfig(arch="unet", encoder_depth=3, decoder={"decoder_channels": [32, 16, 8]})
    train = TrainConfig(epochs=1, batch_size=8, augment=None, device="cpu", patience=None)
    records = study.run_study(run, model, train, configs(), n_real=[1], ratios=[1.0], seeds=[0])
    conditions = sorted((r["condition"], r["generator"] or "") for r in records)
    assert conditions == [("latent", "vae"), ("real", ""), ("real+synthetic", "diffusion"), ("real+synthetic", "vae"),
                          ("synthetic", "diffusion"), ("synthetic", "vae")]
    saved = json.loads((run.run_dir / "study" / "results.json").read_text())
    assert saved == records
    for r in saved:
        assert set(r["per_patient_dice"]) == set(run.split["test"]) and 0 <= r["mean_dice"] <= 1
        assert {"generator", "n_real", "ratio", "seed", "mean_dice"} <= set(r)
    real_slices = next(r["n_real_slices"] for r in records if r["condition"] == "real")
    mix = next(r for r in records if r["condition"] == "real+synthetic" and r["generator"] == "vae")
    assert mix["n_synthetic_slices"] == real_slices
    assert "study cells" in capsys.readouterr().err  # a progress bar over the grid
    kept = sorted(p.relative_to(run.run_dir / "study") for p in (run.run_dir / "study").rglob("*") if p.is_file())
    assert [str(p) for p in kept] == ["results.json"]  # records only: no checkpoints, generators or samples

    monkeypatch.setattr(study, "fit", lambda *a, **k: pytest.fail("a finished run was trained again"))
    assert study.run_study(run, model, train, configs(), n_real=[1], ratios=[1.0], seeds=[0]) == records
    table = study.study_table(records)
    assert ("real only" in table.index.get_level_values("setting")) and table["seeds"].max() == 1


def test_impossible_requests(run):
    with pytest.raises(ValueError, match="n_real=9"):
        study.real_subset(run, 9, 0)
    with pytest.raises(KeyError, match="unknown generator"):
        study.train_generator("gan", run.slices("train"), configs()["vae"], run.run_dir / "x", "cpu")


def test_conclusions_pair_seeds_and_test_patients_and_give_a_verdict_only_beyond_the_interval():
    records = []
    for seed, (real, gain) in enumerate([(0.50, 0.10), (0.52, 0.11), (0.48, 0.09)]):
        base = {"generator": None, "n_real": 1, "ratio": 0.0, "seed": seed}
        patients = {f"p{i}": real + 0.02 * i for i in range(4)}
        records.append(base | {"condition": "real", "mean_dice": real, "per_patient_dice": patients})
        records.append(base | {"condition": "real+synthetic", "generator": "diffusion", "ratio": 1.0,
                               "per_patient_dice": {p: d + gain for p, d in patients.items()}, "mean_dice": 0})
        noisy = {p: d + (0.2 if i % 2 else -0.2) for i, (p, d) in enumerate(patients.items())}
        records.append(base | {"condition": "synthetic", "generator": "diffusion", "ratio": None,
                               "per_patient_dice": noisy, "mean_dice": 0})
    table = study.study_conclusions(records)
    helps = table.loc[(1, "real + diffusion x1")]
    assert helps["delta_dice_points"] == pytest.approx(10.0) and helps["pairs"] == 12 and helps["seeds"] == 3
    assert 9 <= helps["ci_low"] <= helps["ci_high"] <= 11 and helps["verdict"] == "helps"
    unclear = table.loc[(1, "diffusion only")]
    assert unclear["ci_low"] < 0 < unclear["ci_high"] and unclear["verdict"] == "no clear difference"
    assert set(study.study_conclusions(records, min_pairs=13)["verdict"]) == {"too few pairs"}
    assert set(study.study_conclusions(records, min_seeds=4)["verdict"]) == {"too few seeds"}


def test_the_demo_study_trains_real_only_to_a_dice_that_means_something(tmp_path):
    """Notebook 05's default study settings on the demo data: real only from 1 patient reaches 0.5."""
    nb = nbformat.read(PROJECT_ROOT / "notebooks" / "05_vae_synthesis.ipynb", as_version=4)
    params: dict = {}
    exec(next(c.source for c in nb.cells if "parameters" in c.metadata.get("tags", [])), params)
    run = prepare_run("demo", tmp_path / "run", image_size=params["image_size"] or 64, seed=params["seed"],
                      progress=False)
    cfg = TrainConfig(epochs=params["study_epochs"], samples_per_epoch=params["study_samples_per_epoch"],
                      device="cpu", patience=None)
    records = study.run_study(run, segment.model_config(run, "unet"), cfg, {}, [1], [1.0], [0], progress=False)
    assert records[0]["condition"] == "real" and records[0]["mean_dice"] >= 0.5
