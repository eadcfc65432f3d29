import functools
import json
import os
import shutil
from dataclasses import replace

import nbformat
import numpy as np
import pytest

from lib.common.engine import EngineConfig
from lib.common.paths import PROJECT_ROOT
from lib.data.run import prepare_run
from lib.publish import publish_study
from lib.seg import workflow
from lib.seg.models import ModelConfig
from lib.seg.train import TrainConfig
from lib.study import run as study_run
from lib.study import spec as study_spec
from lib.study.analysis import (
    generator_cells,
    generator_quality_table,
    power_table,
    provenance_table,
    setting_label,
    study_conclusions,
)
from lib.study.cost import grid_workload, makespan, study_workload
from lib.study.design import ABLATIONS, GENERATORS, STRATEGIES, design_run, make_design
from lib.synth import diffusion, gan, pairs
from lib.synth.generative import TrainingCollapsed
from lib.synth.vae import VAEConfig
from tests.helpers import exit_once, make_task

SIZE = 32
RECORD_KEYS = {"dataset", "generator", "shapes", "filtered", "strategy", "n_real", "ratio", "seed", "train_patients",
               "test_dice", "mean_dice", "steps", "train_seconds", "code", "hardware"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    return prepare_run(str(make_task(root / "Task90_Blobs", 6, shape=(32, 32, 10))), root / "run",
                       image_size=SIZE, seed=0, progress=False)


def small_configs():
    common = {"image_size": SIZE, "in_channels": 1, "num_classes": 2, "epochs": 1, "batch_size": 8}
    return (gan.SPADEGANConfig(**common, channels=(8, 16), z_dim=8, spade_channels=8, disc_channels=8, disc_layers=2),
            VAEConfig(**common, base_channels=8, latent_dim=8))


MODEL = ModelConfig(arch="unet", encoder_depth=3, decoder={"decoder_channels": [32, 16, 8]})
TRAIN = TrainConfig(samples_per_epoch=16, batch_size=8, augment=None, device="cpu", patience=None)
SERIAL = EngineConfig("serial", num_cpus=1, max_retries=0)  # one thread, as each Ray worker below


def test_the_design_holds_patients_out_and_refuses_what_it_cannot_supply(run):
    design = make_design(run, n_test=2, n_val=1, n_real=[1, 3], seeds=[3, 2])
    assert len(design.test) == 2 and len(design.val) == 1 and len(design.pool) == 3
    assert not set(design.test) & (set(design.val) | set(design.pool)) and not set(design.val) & set(design.pool)
    assert len({tuple(design.subset(1, s)) for s in range(3)}) == 3  # each seed another patient
    assert design.subset(3, 1) == sorted(design.pool) and design.cells() == [(1, 0), (1, 1), (1, 2), (3, 0), (3, 1)]
    strategies = [(c.strategy, c.ratio, c.shapes, c.filtered) for c in design.conditions(1)]
    assert strategies[0] == ("real", 0.0, None, None) and len(strategies) == 10
    assert ("add", 2.0, "new", True) in strategies and ("add", 1.0, "deformed", True) in strategies
    assert ("add", 1.0, "new", False) in strategies and len(design.conditions(3)) == 5
    assert ("mix", 1.0, "new", True) in strategies  # synthetic slices replacing real ones: the ablation
    armed = make_design(run, n_test=2, n_val=1, n_real=[1, 3], seeds=[3, 2], arm="diffusion", arm_n_real=3)
    assert [c.arm for c in armed.conditions(3)] == [None] * 5 + ["diffusion"] and armed.conditions(3)[-1].strategy == "add"
    assert all(c.arm is None for c in armed.conditions(1)) and armed.id != design.id
    topped = make_design(run, n_test=2, n_val=1, n_real=[1, 2], seeds=[3, 2], ceiling=True)
    assert topped.n_real == (1, 2, 3) and topped.cells()[-1] == (3, 0) and topped.subset(3, 0) == sorted(topped.pool)
    assert [c.strategy for c in topped.conditions(3)] == ["real"] and len(topped.conditions(2)) == 5
    assert topped.id != make_design(run, n_test=2, n_val=1, n_real=[1, 2], seeds=[3, 2]).id
    every = make_design(run, n_test=2, n_val=1, n_real=[1, 3], seeds=[3, 2], strategies=STRATEGIES)
    assert len(every.conditions(1)) == 10  # "add" is the ablations' mix; "mix" is in the grid already
    assert design.id == make_design(run, n_test=2, n_val=1, n_real=[1, 3], seeds=[3, 2]).id
    chosen = make_design(run, n_test=2, n_val=1, n_real=[1, 3], seeds=[3, 2], ablations=["mix", "deformed"])
    assert [(c.strategy, c.shapes) for c in chosen.conditions(1)[5:]] == [("add", "deformed"), ("mix", "new")]
    assert chosen.id != design.id and len(chosen.conditions(3)) == 5
    assert make_design(run, n_test=2, n_val=1, n_real=[1, 3], seeds=[3, 2], ablations=list(ABLATIONS)).id == design.id
    assert design.id != make_design(run, n_test=2, n_val=1, n_real=[1, 3], seeds=[3, 2], seed=1).id
    for kwargs, message in [({"n_real": [4]}, "cannot be drawn"), ({"ratio": 0.0}, "must be positive"),
                            ({"ablation_ratios": [-1.0]}, "must be positive"), ({"seeds": [1, 1]}, "seed count"),
                            ({"generator": "vae"}, "unknown generator"), ({"strategies": ["mix"]}, "include 'real'"),
                            ({"n_test": 5}, "no training pool"), ({"arm": "spade_gan"}, "design's generator"),
                            ({"arm": "diffusion", "arm_n_real": 2}, "not among"),
                            ({"n_real": [1, 3], "seeds": [1, 1], "ceiling": True}, "leave 3 out"),
                            ({"arm": "diffusion", "strategies": ["real", "pretrain"]}, "second arm runs with"),
                            ({"ablations": ["mix", "noise"]}, "unknown ablations")]:
        with pytest.raises(ValueError, match=message):
            make_design(run, **({"n_test": 2, "n_val": 1, "n_real": [1], "seeds": [1]} | kwargs))


def test_the_design_names_the_generators_the_run_trains():
    assert set(study_run.IMAGE_GENERATORS) == set(GENERATORS)


def test_the_spec_carries_the_diffusion_sampler_and_reads_older_specs_without_it(run, tmp_path):
    design = make_design(run, n_test=2, n_val=1, n_real=[1], seeds=[1], generator="diffusion")
    gen_cfg = diffusion.DiffusionConfig(image_size=SIZE, base_channels=8, channel_mults=(1, 2), sample_steps=20,
                                        sampler="dpmpp_2m")
    srun = replace(run, run_dir=tmp_path / "run")
    write = functools.partial(study_spec.write_spec, srun, design, MODEL, TRAIN, vae_cfg=small_configs()[1],
                              shape_cfg=None, generator_samples=None, max_epochs=2)
    path = write(gen_cfg)
    loaded = study_spec.load_spec(path)["generator"]
    assert loaded == gen_cfg and (loaded.sampler, loaded.sample_steps) == ("dpmpp_2m", 20)
    with pytest.raises(ValueError, match="differs in generator"):
        write(replace(gen_cfg, sampler="ddim"))
    saved = json.loads(path.read_text())  # a spec written before the sampler existed sampled with DDIM
    del saved["generator"]["sampler"]
    path.write_text(json.dumps(saved))
    assert study_spec.load_spec(path)["generator"].sampler == "ddim"
    assert write(replace(gen_cfg, sampler="ddim")) == path
    with pytest.raises(ValueError, match="differs in generator"):
        write(gen_cfg)


def test_a_published_study_is_continued_in_the_run_folder_its_spec_names(run, tmp_path):
    design = make_design(run, n_test=2, n_val=1, n_real=[1, 2], seeds=[2, 1], ceiling=True)
    first = design_run(replace(run, run_dir=tmp_path / "first"), design)
    path = study_spec.write_spec(first, design, MODEL, TRAIN, small_configs()[0], small_configs()[1], shape_cfg=None,
                                 generator_samples=None, max_epochs=2)
    assert json.loads(path.read_text())["code"]  # the commit the study was written with
    assert study_spec.main([str(path), "--steps-only", "--engine", "serial"]) == 0  # the steps, no cell
    assert set(json.loads((path.parent / "steps.json").read_text())["steps"]) == {"1", "2", "3"}  # 3: the ceiling
    assert not (path.parent / "results.json").exists()
    steps = {"design": design.id, "steps": {"1": {"epochs": 2, "steps": 4, "plateau": True, "curve": [[2, 0.5]]}}}
    records = [{"design": design.id, "n_real": 1, "seed": s, "strategy": "real", "ratio": 0.0, "shapes": None,
                "filtered": None, "arm": None} for s in (0, 1)]
    published = tmp_path / "results" / "study"  # what publish_study leaves: the run folder named in the spec
    published.mkdir(parents=True)
    spec = json.loads(path.read_text()) | {"code": "0000000"}
    spec["prepare"]["run_dir"] = str(tmp_path / "second")
    (published / "spec.json").write_text(json.dumps(spec))
    shutil.copy(path.parent / "design.json", published / "design.json")
    (published / "steps.json").write_text(json.dumps(steps))
    (published / "results.json").write_text(json.dumps(records))
    target = tmp_path / "second" / "study"
    target.mkdir(parents=True)
    (target / "results.json").write_text(json.dumps(records[1:] + [records[0] | {"seed": 2}]))  # one already here
    loaded = study_spec.load_spec(published / "spec.json")
    for _ in range(2):  # a second take-over adds nothing
        study_spec._take_over(published / "spec.json", loaded)
        assert json.loads((target / "steps.json").read_text()) == steps and (target / "design.json").is_file()
        assert sorted(r["seed"] for r in json.loads((target / "results.json").read_text())) == [0, 1, 2]
    relative = spec | {"prepare": spec["prepare"] | {"run_dir": os.path.relpath(spec["prepare"]["run_dir"])}}
    (target / "spec.json").write_text(json.dumps(relative))  # the same study, written with a relative path
    study_spec._take_over(published / "spec.json", loaded)
    other = spec | {"max_epochs": 3}
    (target / "spec.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="another study.*max_epochs"):
        study_spec._take_over(published / "spec.json", loaded)


def test_plateau_epoch_is_where_the_smoothed_validation_dice_stops_rising():
    assert study_run.plateau_epoch([0.1, 0.5, 0.8, 0.9, 0.9, 0.9, 0.9]) == 6  # the first 3-epoch mean within 0.01 of the best
    assert study_run.plateau_epoch([0.1, 0.2, 0.3, 0.4, 0.5]) == 5  # still rising: all epochs
    assert study_run.plateau_epoch([0.7]) == 1
    with pytest.raises(ValueError):
        study_run.plateau_epoch([])


def test_steps_calibrated_for_one_design_serve_a_resized_grid_but_not_other_patients(run, monkeypatch, tmp_path):
    small = make_design(run, n_test=2, n_val=1, n_real=[1], seeds=[1])
    srun = replace(design_run(replace(run, run_dir=tmp_path), small), run_dir=tmp_path)
    curve = {"epochs": 2, "steps": 4, "plateau": True, "curve": [[2, 0.5], [4, 0.6]]}
    key = study_run.calibration_key(small, MODEL, TRAIN, 3)
    (tmp_path / "study" / "steps.json").write_text(json.dumps({"design": small.id, "calibration": key,
                                                                "steps": {"1": curve}}))
    monkeypatch.setattr(study_run, "fit", lambda *a, **k: pytest.fail("the saved steps should have been reused"))
    larger = make_design(run, n_test=2, n_val=1, n_real=[1], seeds=[4], arm="diffusion")  # more seeds, an arm
    assert larger.id != small.id
    assert study_run.calibrate_steps(srun, larger, MODEL, TRAIN, max_epochs=3, progress=False) == {1: curve}
    # another pool (split seed 1), or the same grid tried for more epochs: calibrated afresh, so refused here
    other_pool = make_design(run, n_test=2, n_val=1, n_real=[1], seeds=[4], seed=1)
    for design, max_epochs in ((other_pool, 3), (larger, 4)):
        with pytest.raises(ValueError, match="other validation patients, pool or training settings"):
            study_run.calibrate_steps(srun, design, MODEL, TRAIN, max_epochs=max_epochs, progress=False)


@pytest.mark.slow
def test_study_trains_every_condition_for_the_same_steps_resumes_and_refuses_foreign_records(run, monkeypatch, capsys,
                                                                                             tmp_path):
    design = make_design(run, n_test=2, n_val=1, n_real=[1], seeds=[1], filter_threshold=0.0)
    srun = design_run(run, design)
    steps = study_run.calibrate_steps(srun, design, MODEL, TRAIN, max_epochs=3, progress=False)
    assert steps[1]["steps"] == 2 * steps[1]["epochs"] and len(steps[1]["curve"]) == 3
    gen_cfg, vae_cfg = small_configs()

    # a generator checkpoint in the cell's folder trained on other patients stops the cell
    cell = run.run_dir / "study" / "work" / "n1_s0"
    other = srun.slices("train")
    other = other.subset(np.flatnonzero(other.case_ids != design.subset(1, 0)[0]))
    gan.train_gan(other.images.astype(np.float32), other.masks, gen_cfg, out_dir=cell / "spade_gan", progress=False)
    with pytest.raises(RuntimeError, match="1 of 1 study cell.*cell n=1 seed=0: ValueError.*other images/masks"):
        study_run.run_study(srun, design, MODEL, TRAIN, steps, gen_cfg, vae_cfg, progress=False, engine=SERIAL)
    shutil.rmtree(cell / "spade_gan")
    assert not (run.run_dir / "study" / "results.json").exists()  # the driver writes a cell's records at its end
    assert (cell / "seg" / "real_r0_None_u" / "fit.json").is_file()  # what the cell finished is kept for the retry
    assert [r["strategy"] for r in json.loads((cell / "records.json").read_text())] == ["real"]
    capsys.readouterr()

    # the generators of a cell see this many slices: 2 epochs
    samples = len(study_run._patients(srun.slices("train"), design.subset(1, 0))) + 1

    def discriminator_wins(self, row, history):  # a GAN that collapses in its 2nd epoch: the 1st is used
        if row["epoch"] == 2:
            raise TrainingCollapsed("spade_gan: the discriminator wins")

    with monkeypatch.context() as m:
        m.setattr(gan.SPADEGAN, "check_epoch", discriminator_wins)
        records = study_run.run_study(srun, design, MODEL, TRAIN, steps, gen_cfg, vae_cfg, generator_samples=samples,
                                      engine=SERIAL)
    out = capsys.readouterr()
    assert "study cells" in out.err  # a progress bar over the grid, a line per condition
    assert "already finished" in out.out and "cell n=1 seed=0: real + spade_gan x2 on top, test Dice" in out.out
    labels = sorted(setting_label(r) for r in records)
    assert labels == sorted(["real only", "real + spade_gan x1 on top", "spade_gan pre-training, real fine-tuning",
                             "spade_gan only", "VAE latent segmenter", "real + spade_gan x0.5 on top",
                             "real + spade_gan x2 on top", "real + spade_gan x1 on top (deformed shapes)",
                             "real + spade_gan x1 on top (unfiltered)", "real + spade_gan x1"])
    assert {r["steps"] for r in records} == {steps[1]["steps"]}  # the same optimiser steps for every condition
    for r in records:
        assert RECORD_KEYS <= set(r) and r["design"] == design.id and r["train_patients"] == design.subset(1, 0)
        assert set(r["test_dice"]) == set(design.test) and 0 <= r["mean_dice"] <= 1
        assert r["generator_epochs"] == (None if r["strategy"] == "real" else 2)
        assert r["strategy"] == "latent" or 1 <= r["best_epoch"] <= steps[1]["epochs"]  # validation's choice
        if r["strategy"] in ("add", "mix", "pretrain", "synthetic_only"):
            assert r["generator_stopped"] == "spade_gan: the discriminator wins"
            assert r["synthetic_unique_share"] == 1.0  # the filter at 0 keeps every pair: nothing repeated
            quality = r["generator_quality"]  # the cell's generator against the validation patient
            assert {"n", "frechet_ratio", "mask_agreement_ratio", "real_frechet"} <= set(quality)
    quality = next(r for r in records if setting_label(r) == "real + spade_gan x1 on top")["generator_quality"]
    assert quality["n"] >= 2 and np.isfinite(quality["frechet_ratio"]) and 0 <= quality["mask_agreement"] <= 1
    add2 = next(r for r in records if r["strategy"] == "add" and r["ratio"] == 2.0)
    assert add2["n_synthetic_slices"] == 2 * add2["n_real_slices"]
    kept = sorted(str(p.relative_to(run.run_dir / "study")) for p in (run.run_dir / "study").rglob("[!.]*")
                  if p.is_file())
    assert kept == ["design.json", "results.json", "steps.json"]  # records only: no checkpoints or samples

    published = publish_study(run.run_dir, "demo", results_root=tmp_path / "results")
    assert sorted(p.name for p in published.iterdir()) == ["README.md", "design.json", "quality.png", "results.json",
                                                          "steps.json", "steps.png", "study.png", "summary.json"]
    index = (published / "README.md").read_text()
    assert "10 of 10 conditions done: complete" in index and "## The generators behind the comparisons" in index
    assert "Every cell's records come from one machine and precision." in index
    generators = json.loads((published / "summary.json").read_text())["generators"]
    assert {g["setting"] for g in generators} >= {"real + spade_gan x1 on top", "real + spade_gan x1"}

    monkeypatch.setattr(study_run, "fit", lambda *a, **k: pytest.fail("a finished condition was trained again"))
    assert study_run.run_study(srun, design, MODEL, TRAIN, steps, gen_cfg, vae_cfg, progress=False,
                               engine=SERIAL) == records
    assert study_run.calibrate_steps(srun, design, MODEL, TRAIN, max_epochs=3,
                                     progress=False) == steps

    other_design = make_design(run, n_test=2, n_val=1, n_real=[1], seeds=[1], seed=1)
    with pytest.raises(ValueError, match="holds study design"):
        design_run(run, other_design)
    with pytest.raises(ValueError, match="records of study design"):
        study_run.load_records(run.run_dir / "study" / "results.json", replace(design, ratio=3.0))


def test_publishing_a_running_study_keeps_the_finished_conditions_of_unfinished_cells(run, tmp_path):
    design = make_design(run, n_test=2, n_val=1, n_real=[1], seeds=[2], strategies=["real", "add"])
    srun = design_run(replace(run, run_dir=tmp_path / "run"), design)
    study = srun.run_dir / "study"
    (study / "steps.json").write_text(json.dumps({"design": design.id, "steps": {
        "1": {"epochs": 2, "steps": 4, "plateau": True, "curve": [[2, 0.5]]}}}))

    def record(seed, strategy, dice):
        synthetic = strategy != "real"
        return {"design": design.id, "dataset": design.dataset, "n_real": 1, "seed": seed, "strategy": strategy,
                "ratio": 1.0 if synthetic else 0.0, "shapes": "new" if synthetic else None,
                "filtered": True if synthetic else None, "arm": None, "generator": "spade_gan" if synthetic else None,
                "test_dice": dict.fromkeys(design.test, dice), "mean_dice": dice, "steps": 4}

    (study / "results.json").write_text(json.dumps([record(0, "real", 0.5), record(0, "add", 0.6)]))
    work = study_run.cell_folder(srun, 1, 1)
    work.mkdir(parents=True)  # cell (1, 1) was interrupted after real only; the driver never merged it
    (work / "records.json").write_text(json.dumps([record(1, "real", 0.4)]))
    published = publish_study(srun.run_dir, "demo", results_root=tmp_path / "results")
    assert [(r["seed"], r["strategy"]) for r in json.loads((published / "results.json").read_text())] == [
        (0, "real"), (0, "add"), (1, "real")]
    planned = sum(len(design.conditions(n)) for n, _ in design.cells())
    assert f"3 of {planned} conditions done" in (published / "README.md").read_text()
    assert len(json.loads((study / "results.json").read_text())) == 2  # the run's own records: the driver's alone

    (work / "records.json").write_text(json.dumps([record(1, "real", 0.4) | {"design": "another"}]))
    with pytest.raises(ValueError, match="another"):
        publish_study(srun.run_dir, "demo", results_root=tmp_path / "results")


def test_workload_counts_calibration_conditions_and_each_cells_generators_once():
    steps = {1: {"curve": [[4, 0.1], [8, 0.2], [12, 0.3]], "steps": 8}, 2: {"curve": [[4, 0.1], [8, 0.3]], "steps": 8}}
    rec = {"n_real": 1, "seed": 0, "steps": 8, "n_real_slices": 10, "generator_epochs": None, "generator": None,
           "ratio": 0.0, "shapes": None, "filtered": None}
    synth = {"generator": "diffusion", "generator_epochs": 3, "ratio": 1.0, "shapes": "new", "filtered": True,
             "n_synthetic_slices": 10, "synthetic_kept_share": 0.5}
    records = [rec | {"strategy": "real"}, rec | synth | {"strategy": "add"},
               rec | synth | {"strategy": "pretrain"}, rec | {"strategy": "latent", "generator": "vae", "generator_epochs": 3},
               rec | synth | {"strategy": "add", "seed": 1},
               rec | synth | {"strategy": "mix", "n_real": 2, "n_real_slices": 20, "generator_epochs": 2,
                              "generator": "spade_gan", "n_synthetic_slices": 20, "synthetic_kept_share": 1.0}]
    assert study_workload(records, steps) == {
        "segmenter_epochs": 3 + 2 + 2 + 2 * 2 + 2 + 2 * 2 + 2, "latent_steps": 8, "conditions": 6,
        "generator_slices:diffusion": 30 + 30, "generator_slices:spade_gan": 40, "vae_slices": 30,
        "generated_pairs:diffusion": 20 + 20, "generated_pairs:spade_gan": 20}


def test_grid_workload_counts_every_planned_condition(run):
    design = make_design(run, n_test=2, n_val=1, n_real=[1, 2], seeds=[2, 1], arm="spade_gan", generator="diffusion")
    steps = {1: {"curve": [[4, 0.1], [8, 0.2], [12, 0.3]], "epochs": 2, "steps": 8},
             2: {"curve": [[4, 0.1], [8, 0.3]], "epochs": 1, "steps": 4}}
    work = grid_workload(design, steps, generator_samples=100, slices_per_patient=10, kept_share=0.5)
    # n=1: real, add, pretrain, synthetic only, add with the arm, 2 ratios, deformed, unfiltered, mix (replace)
    one = 2 * (1 + 2 + 1 + 1 + 2 + 1.5 + 3 + 2 + 2 + 1)
    assert work == {"segmenter_epochs": 5 + 2 * one + 1 * (1 + 2 + 1 + 1), "latent_steps": 2 * 8 + 4,
                    "conditions": 2 * 11 + 5, "vae_slices": 300, "generator_slices:diffusion": 300,
                    "generator_slices:spade_gan": 200,
                    # pools of n=1 (2 seeds): new+filtered up to x2, deformed, unfiltered; n=2: new+filtered x1
                    "generated_pairs:diffusion": 2 * (2 * 10 / 0.5 + 10 / 0.5 + 10) + 2 * 10 / 0.5,
                    "generated_pairs:spade_gan": 2 * 10 / 0.5}


def test_conclusions_pair_seeds_and_test_patients_and_give_a_verdict_only_beyond_the_interval():
    records = []
    for seed, (real, gain) in enumerate([(0.50, 0.10), (0.52, 0.11), (0.48, 0.09)]):
        base = {"generator": None, "n_real": 1, "ratio": 0.0, "seed": seed, "shapes": None, "filtered": None}
        patients = {f"p{i}": real + 0.02 * i for i in range(4)}
        records.append(base | {"strategy": "real", "mean_dice": real, "test_dice": patients})
        records.append(base | {"strategy": "mix", "generator": "spade_gan", "ratio": 1.0, "shapes": "new",
                               "filtered": True, "test_dice": {p: d + gain for p, d in patients.items()},
                               "mean_dice": 0})
        noisy = {p: d + (0.2 if i % 2 else -0.2) for i, (p, d) in enumerate(patients.items())}
        records.append(base | {"strategy": "synthetic_only", "generator": "spade_gan", "ratio": 1.0, "shapes": "new",
                               "filtered": True, "test_dice": noisy, "mean_dice": 0})
    table = study_conclusions(records)
    helps = table.loc[(1, "real + spade_gan x1")]
    assert helps["delta_dice_points"] == pytest.approx(10.0) and helps["pairs"] == 12 and helps["seeds"] == 3
    # primary: t over the seeds' mean gains 9, 10, 11 points (10 +- 4.30 * 1 / sqrt(3)); both intervals above 0
    assert helps["ci_low"] == pytest.approx(10 - 4.3027 / 3**0.5, abs=1e-3) and helps["boot_low"] > 0
    assert helps["verdict"] == "helps"
    unclear = table.loc[(1, "spade_gan only")]  # every seed's mean is 0, but the patients spread by +-20 points
    assert unclear["ci_low"] == pytest.approx(0) and unclear["boot_low"] < -5 and unclear["boot_high"] > 5
    assert unclear["verdict"] == "no clear difference"
    assert set(study_conclusions(records, min_seeds=4)["verdict"]) == {"too few seeds"}


@pytest.mark.slow
def test_the_demo_study_trains_real_only_to_a_dice_that_means_something(tmp_path):
    """Notebook 05's default study settings on the demo data: real only from 1 patient reaches 0.5."""
    nb = nbformat.read(PROJECT_ROOT / "notebooks" / "05_vae_synthesis.ipynb", as_version=4)
    p: dict = {}
    exec(next(c.source for c in nb.cells if "parameters" in c.metadata.get("tags", [])), p)
    run = prepare_run("demo", tmp_path / "run", image_size=p["image_size"] or 64, seed=p["seed"], progress=False)
    design = make_design(run, n_test=p["study_test_patients"], n_val=p["study_val_patients"],
                         n_real=p["study_n_real"], seeds=p["study_seeds"], strategies=["real"], seed=p["seed"])
    srun = design_run(run, design)
    model_cfg = workflow.model_config(srun, "unet")
    cfg = TrainConfig(samples_per_epoch=p["study_samples_per_epoch"], device="cpu", patience=None)
    steps = study_run.calibrate_steps(srun, design, model_cfg, cfg, max_epochs=p["study_max_epochs"], progress=False)
    gen_cfg, vae_cfg = small_configs()
    records = study_run.run_study(srun, design, model_cfg, cfg, steps, gen_cfg, vae_cfg,
                                  progress=False)
    assert [r["strategy"] for r in records] == ["real"] * sum(p["study_seeds"][:1])
    assert records[0]["mean_dice"] >= 0.5


def _rec(design, seed):
    return {"strategy": "real", "shapes": None, "filtered": None, "ratio": 0.0, "n_real": 1, "seed": seed,
            "design": design.id}


def test_records_are_merged_under_a_lock_never_duplicated_and_of_one_design(run, tmp_path):
    design = make_design(run, n_test=2, n_val=1, n_real=[1], seeds=[3])
    path = tmp_path / "results.json"
    study_run.add_records(path, [_rec(design, 0)], design)
    # another writer (a second process) appended meanwhile: its record is kept
    path.write_text(json.dumps(json.loads(path.read_text()) + [_rec(design, 1)]))
    records = study_run.add_records(path, [_rec(design, 2), _rec(design, 0)], design)
    assert sorted(r["seed"] for r in records) == [0, 1, 2]
    other = make_design(run, n_test=2, n_val=1, n_real=[1], seeds=[3], seed=1)
    with pytest.raises(ValueError, match="records of study design"):
        study_run.add_records(path, [_rec(other, 5)], other)
    assert len(json.loads(path.read_text())) == 3


@pytest.mark.slow
def test_the_grid_on_ray_gives_the_serial_records_survives_a_killed_worker_and_resumes(run, tmp_path):
    pytest.importorskip("ray")
    design = make_design(run, n_test=2, n_val=1, n_real=[2], seeds=[2], strategies=["real", "mix"],
                         filter_threshold=0.0, ablations=False)
    gen_cfg, vae_cfg = small_configs()
    args = {"model_cfg": MODEL, "train_cfg": TRAIN, "generator_cfg": gen_cfg, "vae_cfg": vae_cfg,
            "progress": False}
    runs = {}
    for name in ("serial", "ray"):
        srun = design_run(replace(run, run_dir=tmp_path / name), design)
        steps = study_run.calibrate_steps(srun, design, MODEL, TRAIN, max_epochs=2, progress=False)
        jobs = study_run.cell_jobs(srun, design, [], steps=steps, **args)
        assert [j.name for j in jobs] == ["cell n=2 seed=0", "cell n=2 seed=1"]
        if name == "ray":  # the first cell's worker dies on its first try
            jobs[0] = replace(jobs[0], fn=exit_once, kwargs={"marker": str(tmp_path / "died"),
                                                             "fn": functools.partial(jobs[0].fn, **jobs[0].kwargs)})
        engine = SERIAL if name == "serial" else EngineConfig("ray", num_cpus=1, max_retries=1)
        runs[name] = (srun, steps, study_run.run_cells(srun, design, jobs, engine, progress=False))
    (srun, steps, by_ray), by_serial = runs["ray"], runs["serial"][2]
    assert (tmp_path / "died").exists() and len(by_ray) == 4
    key = lambda r: (r["seed"], r["strategy"])  # noqa: E731
    assert sorted(map(key, by_ray)) == sorted(map(key, by_serial)) == [(0, "mix"), (0, "real"), (1, "mix"),
                                                                      (1, "real")]
    for a, b in zip(sorted(by_ray, key=key), sorted(by_serial, key=key)):
        assert a["train_patients"] == b["train_patients"] and a["test_dice"].keys() == b["test_dice"].keys()
        assert a["mean_dice"] == pytest.approx(b["mean_dice"], abs=1e-5)
    assert not (srun.run_dir / "study" / "work").exists() or not any((srun.run_dir / "study" / "work").iterdir())

    # the driver died before it saved the second cell: a re-run submits that cell alone, nothing twice
    path = srun.run_dir / "study" / "results.json"
    path.write_text(json.dumps([r for r in by_ray if r["seed"] == 0]))
    records = study_run.load_records(path, design)
    jobs = study_run.cell_jobs(srun, design, records, steps=steps, **args)
    assert [j.name for j in jobs] == ["cell n=2 seed=1"]
    again = study_run.run_cells(srun, design, jobs, EngineConfig("ray", num_cpus=1), progress=False)
    assert sorted(map(key, again)) == sorted(map(key, by_ray))


def test_makespan_fills_workers_longest_job_first():
    assert makespan([3, 2, 4, 3], 2) == 6  # 4+2 | 3+3
    assert makespan([5, 1, 1], 4) == 5 and makespan([1.0] * 8, 1) == 8
    assert makespan([2.0] * 4, 3) == 4


def test_power_table_gives_the_seeds_a_3_point_effect_needs_from_earlier_records():
    records = []
    for seed, gain in enumerate([0.02, 0.04, 0.03, 0.05, 0.01]):  # seed means spread by 1.58 points
        base = {"generator": None, "n_real": 2, "ratio": 0.0, "seed": seed, "shapes": None, "filtered": None}
        patients = {f"p{i}": 0.6 + 0.01 * i for i in range(6)}
        records.append(base | {"strategy": "real", "test_dice": patients})
        records.append(base | {"strategy": "mix", "generator": "spade_gan", "ratio": 1.0, "shapes": "new",
                               "filtered": True, "test_dice": {p: d + gain for p, d in patients.items()}})
    row = power_table(records).loc[2]
    assert row["seeds"] == 5 and row["mean_difference_points"] == pytest.approx(3.0)
    assert row["sd_points"] == pytest.approx(1.5811, abs=1e-3) and row["seeds_needed"] == 5
    projected = power_table(records, test_patients=30).loc[2]  # the gains are the same for every patient: no residual
    assert projected["sd_residual_points"] == pytest.approx(0.0, abs=1e-9)
    assert projected["sd_points_at_30_test"] == pytest.approx(1.5811, abs=1e-3) and projected["seeds_needed"] == 5


def test_study_power_tool_prints_the_projected_table(tmp_path, capsys):
    from tools import study_power

    records = []
    for seed, gain in enumerate([0.02, 0.04, 0.03]):
        base = {"generator": None, "n_real": 2, "ratio": 0.0, "seed": seed, "shapes": None, "filtered": None}
        patients = {f"p{i}": 0.6 + 0.01 * i for i in range(4)}
        records += [base | {"strategy": "real", "test_dice": patients},
                    base | {"strategy": "add", "generator": "diffusion", "ratio": 1.0, "shapes": "new", "filtered": True,
                            "test_dice": {p: d + gain + 0.01 * (i % 2) for i, (p, d) in enumerate(patients.items())}}]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(records))
    study_power.main([str(path), "--setting", "real + diffusion x1 on top", "--test-patients", "20"])
    out = capsys.readouterr().out
    assert "sd_points_at_20_test" in out and "seeds_needed" in out
    with pytest.raises(SystemExit, match="no patient count"):
        study_power.main([str(path), "--setting", "real + spade_gan x1"])


def test_generator_quality_table_reads_each_comparison_against_its_cells_generators():
    records, quality = [], [(2.0, 0.5), (1.0, 0.9)]  # (Fréchet ratio, unique share) of seeds 0 and 1
    for seed, (frechet, unique) in enumerate(quality):
        base = {"generator": None, "n_real": 2, "ratio": 0.0, "seed": seed, "shapes": None, "filtered": None}
        patients = {f"p{i}": 0.6 + 0.01 * i for i in range(4)}
        records.append(base | {"strategy": "real", "test_dice": patients})
        records.append(base | {"strategy": "add", "generator": "diffusion", "ratio": 1.0, "shapes": "new",
                               "filtered": True, "test_dice": {p: d + 0.02 * seed for p, d in patients.items()},
                               "generator_quality": {"frechet_ratio": frechet, "sharpness_ratio": 0.8,
                                                     "mask_agreement_ratio": 1.1},
                               "synthetic_kept_share": 0.4, "synthetic_unique_share": unique})
    records.append(records[1] | {"n_real": 5})  # no real only of the same cell: not paired, left out
    barren = dict.fromkeys(["frechet_ratio", "sharpness_ratio", "mask_agreement_ratio"])  # too few pairs to measure
    records += [records[0] | {"n_real": 1}, records[1] | {"n_real": 1, "generator_quality": barren}]
    cells = generator_cells(records)
    assert list(cells["seed"]) == [0, 1, 0] and list(cells["delta_dice_points"]) == pytest.approx([0.0, 2.0, 0.0])
    row = generator_quality_table(records).loc[(2, "real + diffusion x1 on top")]
    assert row["seeds"] == 2 and row["delta_dice_points"] == pytest.approx(1.0)
    assert row["frechet_ratio"] == pytest.approx(1.5) and row["frechet_ratio_max"] == 2.0
    assert row["unique_share"] == pytest.approx(0.7) and row["unique_share_min"] == 0.5
    assert np.isnan(generator_quality_table(records).loc[(1, "real + diffusion x1 on top"), "frechet_ratio"])
    assert generator_quality_table([r for r in records if r["strategy"] == "real"]).empty


def test_provenance_table_finds_the_cells_resumed_on_another_machine():
    bf16, fp32 = "2 CPU cores (x86_64), 1 torch thread(s), bf16", "2 CPU cores (x86_64), 1 torch thread(s), fp32"
    made = [(2, 0, "real", bf16), (2, 0, "add", bf16), (2, 1, "real", bf16), (2, 1, "add", fp32), (4, 0, "real", fp32)]
    records = [{"n_real": n, "seed": seed, "strategy": strategy, "code": "abc1234", "hardware": hardware}
               for n, seed, strategy, hardware in made]
    table = provenance_table(records)
    assert table.loc[(2, "abc1234", bf16)].tolist() == [3, 2, 1]  # conditions, cells, mixed cells
    assert table.loc[(2, "abc1234", fp32)].tolist() == [1, 1, 1]
    assert table.loc[(4, "abc1234", fp32)].tolist() == [1, 1, 0]
    assert table["mixed_cells"].sum() == 2 and provenance_table([]).empty
    assert provenance_table([{"n_real": 2, "seed": 0}]).index[0] == (2, "?", "?")  # records older than code/hardware


def test_contrasts_inside_a_design_pair_each_condition_with_another_baseline(tmp_path, capsys):
    from tools import study_contrast

    records = []
    for seed, loss in enumerate([0.03, 0.05, 0.04]):  # replacing real slices loses 3-5 points, adding nothing
        base = {"generator": None, "n_real": 2, "ratio": 0.0, "seed": seed, "shapes": None, "filtered": None}
        synthetic = base | {"generator": "diffusion", "ratio": 1.0, "shapes": "new", "filtered": True}
        patients = {f"p{i}": 0.6 + 0.01 * i for i in range(4)}
        records += [base | {"strategy": "real", "test_dice": patients},
                    synthetic | {"strategy": "add", "test_dice": patients},
                    synthetic | {"strategy": "mix", "test_dice": {p: d - loss for p, d in patients.items()}}]
    table = study_conclusions(records, baseline="real + diffusion x1")
    assert set(table.index) == {(2, "real only"), (2, "real + diffusion x1 on top")}
    on_top = table.loc[(2, "real + diffusion x1 on top")]
    assert on_top["delta_dice_points"] == pytest.approx(4.0) and on_top["seeds"] == 3 and on_top["verdict"] == "helps"
    path = tmp_path / "results.json"
    path.write_text(json.dumps(records))
    study_contrast.main([str(path), "--baseline", "real + diffusion x1", "--n-real", "2"])
    assert "real + diffusion x1 on top" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no record of 'real \\+ spade_gan x1'; conditions: real \\+ diffusion x1, "):
        study_contrast.main([str(path), "--baseline", "real + spade_gan x1"])


def test_a_small_pool_is_topped_up_for_its_generators_measurement_only():
    rounds = []

    def draw(n, round_):  # every other pair has foreground; the filter keeps half of what is drawn
        rounds.append(round_)
        masks = np.zeros((n // 2, 4, 4), np.uint8)
        masks[::2, 1, 1] = 1
        return pairs.Filtered(np.full((n // 2, 1, 4, 4), round_, np.float32), masks, np.ones(n), np.arange(n) % 2 == 0)

    images, masks, drawn, passed = study_run.draw_until(draw, 10, filtered=True)
    assert len(images) == len(masks) == 10 and (drawn, passed) == (20, 10) and rounds == [0]
    measured_images, measured_masks = study_run.top_up_foreground(draw, (images, masks), 32, filtered=True)
    assert (measured_images[:10] == images).all()  # the pool first, as it is
    assert measured_masks.reshape(len(measured_masks), -1).any(axis=1).sum() >= 32
    assert rounds[1] == study_run.MAX_DRAWS  # rounds of their own: never the pool's pairs again
    assert study_run.top_up_foreground(draw, (images, masks), 5, filtered=True)[0] is images
    assert len(study_run.draw_until(lambda n, r: None, 10, filtered=True)[0]) == 0  # the filter kept nothing
