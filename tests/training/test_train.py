"""Training jobs: accuracy floors, run directory contents, k-fold and the three Keras APIs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from modelloop.errors import ModelloopError
from modelloop.training.spec import Dataset, load_spec
from modelloop.training.train import train

SPECS = Path(__file__).resolve().parents[1] / "testdata" / "specs"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("spec", "floor"),
    [("digits", 0.95), ("digits-cnn", 0.97), ("breast-cancer", 0.94)],
)
def test_classifiers_reach_their_floor_and_beat_the_baselines(train_run, spec, floor):
    metrics = json.loads((train_run(spec) / "metrics.json").read_text())
    accuracy = metrics["test"]["accuracy"]
    assert accuracy >= floor
    assert accuracy > metrics["baselines"]["majority_class"]["accuracy"]
    assert metrics["main_metric"] == "accuracy"


@pytest.mark.slow
def test_regressor_beats_the_mean_predictor(train_run):
    metrics = json.loads((train_run("diabetes") / "metrics.json").read_text())
    assert metrics["test"]["mae"] < metrics["baselines"]["mean_predictor"]["mae"]
    assert set(metrics["baselines"]) == {"mean_predictor", "ridge"}
    assert metrics["higher_is_better"] is False


def test_run_directory_holds_every_artefact(digits_run):
    for name in (
        "model.keras",
        "metrics.json",
        "history.csv",
        "history.png",
        "baseline.json",
        "run.json",
        "split.npz",
        "checkpoint.keras",
    ):
        assert (digits_run / name).is_file(), name
    assert any((digits_run / "tensorboard").rglob("events.out.tfevents.*"))
    assert (digits_run / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_record_best_epoch_and_history_agrees(digits_run):
    metrics = json.loads((digits_run / "metrics.json").read_text())
    with open(digits_run / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == metrics["epochs_run"]
    val_loss = [float(r["val_loss"]) for r in rows]
    assert metrics["best_epoch"] == int(np.argmin(val_loss)) + 1
    rows = metrics["rows"]
    assert rows["train"] + rows["validation"] + rows["test"] == 1797  # every digit, once
    assert rows["test"] == 360
    assert set(metrics["baselines"]) == {"majority_class", "logistic_regression"}
    assert metrics["kfold"] is None


def test_restored_model_is_the_best_epoch(digits_run):
    import keras

    from modelloop.training.evaluation import score

    metrics = json.loads((digits_run / "metrics.json").read_text())
    split = np.load(digits_run / "split.npz")
    model = keras.saving.load_model(digits_run / "model.keras")
    test = score("multiclass", split["y_test"], model.predict(split["x_test"], verbose=0))
    assert test["accuracy"] == pytest.approx(metrics["test"]["accuracy"])


def test_baseline_json_describes_the_inputs_and_predictions(digits_run):
    baseline = json.loads((digits_run / "baseline.json").read_text())
    assert baseline["input"] == "pixels"
    assert len(baseline["features"]) == 64
    constant = [f for f in baseline["features"] if f["constant"]]
    assert constant and all(f["proportions"] == [1.0] for f in constant)  # pixel_0_0 is always 0
    assert all(abs(sum(f["proportions"]) - 1) < 1e-9 for f in baseline["features"])
    assert 0 < len(baseline["reference_sample"]) <= 1000
    assert len(baseline["reference_sample"][0]) == 64
    preds = baseline["predictions"]
    assert preds["kind"] == "class" and len(preds["proportions"]) == 10
    assert abs(sum(preds["proportions"]) - 1) < 1e-9


def test_run_json_names_the_served_tensors(digits_run):
    run = json.loads((digits_run / "run.json").read_text())
    assert run["input"] == {"name": "pixels", "dtype": "float32", "shape": [-1, 64]}
    assert run["output"] == {"name": "probabilities", "dtype": "float32", "shape": [-1, 10]}
    assert run["class_labels"] == [str(i) for i in range(10)]
    assert run["spec"] == {"name": "digits", "source": "digits", "task": "multiclass"}


@pytest.mark.slow
def test_kfold_reports_mean_and_std(train_run):
    metrics = json.loads((train_run("breast-cancer", epochs=15, folds=3) / "metrics.json").read_text())
    kfold = metrics["kfold"]
    assert kfold["folds"] == 3 and len(kfold["scores"]) == 3
    assert kfold["mean"] == pytest.approx(np.mean(kfold["scores"]))
    assert kfold["std"] == pytest.approx(np.std(kfold["scores"]))
    assert 0.8 < kfold["mean"] <= 1.0


@pytest.mark.parametrize("api", ["sequential", "functional", "subclassed"])
def test_each_keras_api_trains_from_a_user_spec(train_run, api):
    run = train_run(str(SPECS / f"{api}_spec.py"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] > metrics["baselines"]["majority_class"]["accuracy"] + 0.2
    assert (run / "model.keras").is_file()


def test_extra_rows_are_appended_to_training(tmp_path):
    spec = load_spec(str(SPECS / "sequential_spec.py"))
    extra = Dataset(np.full((7, 4), 100.0, dtype=np.float32), np.zeros(7, dtype=np.int64), list("abcd"))
    result = train(spec, tmp_path / "run", epochs=1, extra=extra, interactive=False)
    assert result.metrics["feedback_rows"] == 7
    assert result.metrics["rows"]["train"] == 195 + 7


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"epochs": 0}, "--epochs must be at least 1"), ({"folds": 1}, "--folds must be 0")],
)
def test_bad_arguments_are_rejected_before_training(tmp_path, kwargs, message):
    with pytest.raises(ModelloopError, match=message):
        train(load_spec("digits"), tmp_path / "run", **kwargs)
    assert not (tmp_path / "run").exists()


def test_non_empty_run_directory_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("mine")
    with pytest.raises(ModelloopError, match="is not empty"):
        train(load_spec(str(SPECS / "sequential_spec.py")), tmp_path / "run", epochs=1)
    assert (tmp_path / "run" / "keep.txt").read_text() == "mine"
