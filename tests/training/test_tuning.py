"""Tuning with KerasTuner and the capacity check, on reduced budgets named in each test."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest

from modelloop.errors import ModelloopError
from modelloop.training.spec import (
    BUILTIN_SPECS,
    Choice,
    FloatRange,
    IntRange,
    SpecError,
    check_dataset,
    load_spec,
)
from modelloop.training.train import build_compiled_model, train
from modelloop.training.tuning import check_capacity

SPECS = Path(__file__).resolve().parents[1] / "testdata" / "specs"

# The reduced budget of the search test: 2 trials of at most 3 epochs each.
TRIALS, EPOCHS = 2, 3


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tuned") / "run"
    train(load_spec("digits"), out, epochs=EPOCHS, tune=TRIALS, seed=42, interactive=False)
    return out


@pytest.mark.slow
def test_search_reports_every_trial_and_the_best(tuned_run: Path):
    metrics = json.loads((tuned_run / "metrics.json").read_text())
    tuning = metrics["tuning"]
    assert tuning["objective"] == "val_accuracy" and tuning["direction"] == "max"
    assert tuning["trials_run"] == TRIALS == len(tuning["trials"])
    scores = [t["score"] for t in tuning["trials"]]
    assert tuning["best"]["score"] == pytest.approx(max(scores))
    space = load_spec("digits").search_space
    for trial in tuning["trials"]:
        assert set(trial["hparams"]) == set(space)
        assert trial["hparams"]["units"] in space["units"].values
        assert space["layers"].low <= trial["hparams"]["layers"] <= space["layers"].high
        assert space["learning_rate"].low <= trial["hparams"]["learning_rate"] <= space["learning_rate"].high
    assert (tuned_run / "tuning" / "digits" / "oracle.json").is_file()


@pytest.mark.slow
def test_final_model_is_trained_with_the_best_trial(tuned_run: Path):
    metrics = json.loads((tuned_run / "metrics.json").read_text())
    best = metrics["tuning"]["best"]["hparams"]
    assert {k: metrics["hparams"][k] for k in best} == best
    model = keras.saving.load_model(tuned_run / "model.keras")
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    assert len(dense) == best["layers"] + 1  # hidden layers, then the softmax
    assert all(layer.units == best["units"] for layer in dense[:-1])
    dropout = [layer for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
    assert all(layer.rate == pytest.approx(best["dropout"]) for layer in dropout)
    assert float(model.optimizer.learning_rate) == pytest.approx(best["learning_rate"], rel=1e-5)
    assert metrics["capacity"]["passed"] is True


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BUILTIN_SPECS))
def test_every_builtin_model_can_overfit_a_small_subset(name: str):
    spec = load_spec(name)
    data = check_dataset(spec.load_data(), spec)
    capacity = check_capacity(spec, build_compiled_model, data.x, data.y, seed=0)
    assert capacity["rows"] == 64
    assert capacity["passed"], capacity
    assert capacity["train"] >= capacity["target"]


@pytest.mark.trains
def test_capacity_check_reports_a_model_that_cannot_fit():
    spec = load_spec(str(SPECS / "sequential_spec.py"))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4)).astype(np.float32)
    y = rng.integers(0, 3, size=200)  # labels unrelated to the features

    def linear(spec, x_train, y_train, hparams: dict) -> keras.Model:  # too small to memorise noise
        model = keras.Sequential([keras.Input(shape=(4,)), keras.layers.Dense(3, activation="softmax")])
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        return model

    capacity = check_capacity(spec, linear, x, y, seed=0, epochs=10)
    assert capacity["passed"] is False and capacity["train"] < capacity["target"]
    assert capacity["epochs"] == 10


def test_every_builtin_spec_declares_a_search_space():
    for name in BUILTIN_SPECS:
        space = load_spec(name).search_space
        assert set(space) == {"units", "layers", "dropout", "l2", "learning_rate"}, name


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ("SEARCH_SPACE = {'epochs': IntRange(1, 5)}", "tunable are units"),
        ("SEARCH_SPACE = {'l2': FloatRange(0.0, 1.0, log=True)}", "not a valid dimension"),
        ("SEARCH_SPACE = {'units': IntRange(8, 8)}", "not a valid dimension"),
        ("SEARCH_SPACE = {'units': [8, 16]}", "not a valid dimension"),
        ("SEARCH_SPACE = [1]", "must be a mapping"),
        ("PIXEL_RANGE = (16, 0)", "low < high"),
        ("PIXEL_RANGE = 'wide'", "must be a pair"),
    ],
)
def test_bad_search_spaces_and_pixel_ranges_are_rejected(tmp_path: Path, space: str, message: str):
    source = (SPECS / "sequential_spec.py").read_text()
    header = "from modelloop.training.spec import Choice, FloatRange, IntRange\n"
    path = tmp_path / "spec.py"
    path.write_text(source.replace('TASK = "multiclass"', f'{header}TASK = "multiclass"\n{space}'))
    # The spec imports its data from the module beside it, whatever ran before this test.
    shutil.copy(SPECS / "_blobs.py", tmp_path / "_blobs.py")
    with pytest.raises(SpecError, match=message):
        load_spec(str(path))


def test_tune_is_refused_without_a_search_space_or_with_zero_trials(tmp_path: Path):
    spec = load_spec(str(SPECS / "sequential_spec.py"))
    with pytest.raises(ModelloopError, match="declares no SEARCH_SPACE"):
        train(spec, tmp_path / "a", tune=2)
    with pytest.raises(ModelloopError, match="--tune must be at least 1"):
        train(load_spec("digits"), tmp_path / "b", tune=-1)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_dimensions_keep_their_values():
    assert Choice(1, 2, 3).values == (1, 2, 3)
    assert FloatRange(1e-4, 1e-2, log=True).log is True
    assert IntRange(1, 3) == IntRange(1, 3)
