import json

import numpy as np
import pandas as pd
import pytest
import segmentation_models_pytorch as smp
import torch

from lib.data.run import prepare_run
from lib.seg import tables, workflow
from lib.seg.train import TrainConfig
from tests.helpers import make_task


def test_context_model_trains_reloads_tests_and_shows_a_patient(tmp_path):
    run = prepare_run(str(make_task(tmp_path / "Task99_Test", 5, shape=(40, 40, 10))), tmp_path / "run",
                      image_size=32, seed=0, context=1, progress=False)
    model_cfg = workflow.model_config(run, "unet", encoder_depth=3, decoder={"decoder_channels": [32, 16, 8]})
    assert model_cfg.in_channels == 3
    cfg = TrainConfig(epochs=1, batch_size=8, augment=None, device="cpu", patience=None)
    result = workflow.train_model(run, "unet", model_cfg, cfg, progress=False)
    model, meta = workflow.reload_model(run, "unet")
    assert meta["data"]["context_slices"] == 1
    assert workflow.max_prediction_difference(result.model, model, run.slices("val").images) < 1e-5
    metrics = workflow.test_model(run, "unet", model, meta)
    assert set(metrics["cases"]) == set(run.split["test"]) and np.isfinite(metrics["mean"]["dice"])
    _, gif, case_id = workflow.show_patient(run, "unet", model, tta=True)
    assert gif.is_file() and (run.run_dir / "unet" / f"patient_{case_id}.png").is_file()
    assert json.loads((run.run_dir / "unet" / "metrics.json").read_text())["model_config"]["in_channels"] == 3


def test_cross_validation_table_has_one_row_per_test_patient(tmp_path):
    for fold, cases in enumerate([["a", "b"], ["c"]]):
        out = tmp_path / f"fold_{fold}" / "unet"
        out.mkdir(parents=True)
        scores = {c: {"dice": 0.5 + 0.1 * i, "hd95": 3.0} for i, c in enumerate(cases)}
        (out / "metrics.json").write_text(json.dumps({"cases": scores, "best_val_dice": 0.7, "epochs_trained": 4}))
        tta = {c: {"dice": 0.9} for c in cases}
        plain = {c: {"dice": 0.4} for c in cases[:1]}
        (out / "postprocessing.json").write_text(json.dumps({"tta+lcc": {"cases": tta}, "plain": {"cases": plain}}))
    table = tables.cross_validation_table([tmp_path / "fold_0", tmp_path / "fold_1"], "unet")
    assert list(table.index) == ["a", "b", "c"] and list(table["fold"]) == [0, 0, 1]
    assert table["dice"].tolist() == [0.5, 0.6, 0.5] and table["dice_tta"].tolist() == [0.9] * 3
    assert table["dice_plain"].fillna(-1).tolist() == [0.4, -1, 0.4]  # not measured: NaN


def test_recommendation_prefers_a_cheaper_model_only_when_it_is_cheaper():
    def table(rows):
        cols = ["arch", "encoder", "val_dice", "test_dice", "test_dice_std", "test_hd95", "train_min",
                "infer_s_per_volume", "params_M"]
        return pd.DataFrame({n: dict(zip(cols, r)) for n, r in rows.items()}).T.astype({c: float for c in cols[2:]})

    same_time = table({"unet": ("unet", "r18", 0.845, 0.82, 0.04, 12, 13.41, 1, 14.33),
                       "unet_scse": ("unet", "r18", 0.8448, 0.80, 0.04, 14, 13.37, 1.6, 14.44)})
    assert tables.recommend(same_time).startswith("Recommendation: unet (")
    cheaper = table({"unet": ("unet", "r18", 0.845, 0.82, 0.04, 12, 13.4, 1, 14.3),
                     "pspnet": ("pspnet", "r18", 0.84, 0.75, 0.04, 15, 6.0, 0.5, 3.2)})
    text = tables.recommend(cheaper)
    assert text.startswith("Recommendation: pspnet (") and "45% of its time" in text
    assert tables.recommend(cheaper, tolerance=0.001).startswith("Recommendation: unet (")


def small_run(tmp_path, **kw):
    return prepare_run(str(make_task(tmp_path / "Task99_Test", 5, shape=(40, 40, 10))), tmp_path / "run",
                       image_size=32, progress=False, **kw)


def small_cfg(run):
    return workflow.model_config(run, "unet", encoder_depth=3, decoder={"decoder_channels": [32, 16, 8]})


CFG = TrainConfig(epochs=1, batch_size=8, augment=None, device="cpu", patience=None)


def test_context_model_reloads_for_single_slices(tmp_path):
    """Notebook 05 reloads the U-Net of notebook 04 for 2D synthetic slices, also when it was 2.5D."""
    workflow.train_model(small_run(tmp_path, context=1), "unet", small_cfg(small_run(tmp_path, context=1)), CFG,
                         progress=False)
    run2d = small_run(tmp_path)  # context 0, as in notebook 05
    model, meta = workflow.reload_model(run2d, "unet", single_slice=True)
    single = run2d.slices("val").images[:4]
    probs = workflow.predict_masks_fn(model)(single)
    assert probs.shape == (4, 32, 32) and meta["data"]["context_slices"] == 1
    assert model.encoder(torch.from_numpy(single).float())[-1].shape[0] == 4
    with pytest.raises(ValueError, match="context_slices"):
        workflow.reload_model(run2d, "unet")  # without single_slice the mismatch is explained


def test_imagenet_checkpoint_reloads_offline(tmp_path, monkeypatch):
    run = small_run(tmp_path)
    workflow.train_model(run, "unet", small_cfg(run), CFG, progress=False)
    state = torch.load(run.run_dir / "unet" / "best.pt", weights_only=False)
    state["model_config"]["encoder_weights"] = "imagenet"  # as trained on Colab with pretrained weights
    torch.save(state, run.run_dir / "unet" / "best.pt")
    real_create = smp.create_model

    def offline(*args, **kwargs):
        if kwargs.get("encoder_weights"):
            raise ConnectionError("no network")
        return real_create(*args, **kwargs)

    monkeypatch.setattr(smp, "create_model", offline)
    model, meta = workflow.reload_model(run, "unet")
    assert meta["model_config"]["encoder_weights"] == "imagenet"
    assert all(torch.equal(v, state["state_dict"][k]) for k, v in model.state_dict().items())


def test_new_split_in_the_same_run_folder_refuses_old_checkpoints(tmp_path):
    run = small_run(tmp_path, seed=0)
    workflow.train_model(run, "unet", small_cfg(run), CFG, progress=False)
    moved = small_run(tmp_path, seed=3)  # another seed overwrites split.json
    assert moved.split["test"] != run.split["test"]
    with pytest.raises(ValueError, match="another patient split"):
        workflow.reload_model(moved, "unet")
    with pytest.raises(ValueError, match="another patient split"):
        workflow.train_model(moved, "unet", small_cfg(moved), CFG, progress=False)


def test_trials_and_variants_keep_metrics_not_checkpoints_and_show_progress(tmp_path, capsys):
    run = small_run(tmp_path)
    table = workflow.choose_learning_rate(run, small_cfg(run), CFG, [1e-3, 3e-3], epochs=1)
    assert list(table.index) == [1e-3, 3e-3] and table["val_dice"].notna().all()
    variants = workflow.architecture_study(run, "unet", small_cfg(run), CFG,
                                           {"narrow": {"decoder": {"decoder_channels": [16, 8, 4]}}})
    assert list(variants.index) == ["unet_narrow"]  # the main model has no metrics yet
    err = capsys.readouterr().err
    assert "learning-rate trials" in err and "architecture variants" in err
    assert not list(run.run_dir.glob("hp/**/*.pt")) and not list((run.run_dir / "unet_narrow").glob("*.pt"))
    assert (run.run_dir / "unet_narrow" / "metrics.json").is_file()
    assert workflow.choose_learning_rate(run, small_cfg(run), CFG, [], epochs=1).empty


def test_paired_differences_pair_models_by_test_patient_against_the_best_validation_model(tmp_path):
    def write(name, val_dice, dice):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({
            "model_config": {"arch": name, "encoder_name": "r18"}, "best_val_dice": val_dice, "epochs_trained": 3,
            "train_seconds": 60, "parameters": 1e6, "std": {"dice": 0.1},
            "mean": {"dice": float(np.mean(list(dice.values()))), "hd95": 2.0, "inference_seconds_per_volume": 0.1},
            "cases": {c: {"dice": d} for c, d in dice.items()}}))

    cases = [f"p{i}" for i in range(8)]
    write("unet", 0.9, {c: 0.80 + 0.01 * i for i, c in enumerate(cases)})
    write("fpn", 0.8, {c: 0.70 + 0.01 * i for i, c in enumerate(cases)})  # 0.1 lower on every patient
    write("psp", 0.7, {c: 0.80 + (0.05 if i % 2 else -0.05) + 0.01 * i for i, c in enumerate(cases)})
    table = tables.paired_differences(tmp_path)
    assert set(table.index) == {"fpn − unet", "psp − unet"}
    assert table.loc["fpn − unet", "dice_mean"] == pytest.approx(-0.1) and table.loc["fpn − unet", "n"] == 8
    assert table.loc["fpn − unet", "dice_verdict"] == "lower"
    assert table.loc["psp − unet", "dice_verdict"] == "no clear difference"
    assert tables.paired_differences(tmp_path, names=["unet"]).empty
