"""Loading built-in and user specs, and rejecting bad ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from modelloop.training.spec import BUILTIN_SPECS, Dataset, SpecError, check_dataset, load_spec

SPECS = Path(__file__).resolve().parents[1] / "testdata" / "specs"


@pytest.mark.parametrize(
    ("name", "task", "input_name", "output_name", "n_features"),
    [
        ("digits", "multiclass", "pixels", "probabilities", 64),
        ("digits-cnn", "multiclass", "pixels", "probabilities", 64),
        ("breast-cancer", "binary", "features", "probabilities", 30),
        ("diabetes", "regression", "features", "prediction", 10),
        ("text-topics", "multiclass", "features", "probabilities", 1024),
    ],
)
def test_builtin_specs_describe_their_task(name, task, input_name, output_name, n_features):
    spec = load_spec(name)
    assert spec.name == name
    assert spec.task == task
    assert (spec.input_name, spec.output_name) == (input_name, output_name)
    data = check_dataset(spec.load_data(), spec)
    assert data.x.dtype == np.float32
    assert data.x.shape[1] == n_features == len(data.feature_names)
    if task == "regression":
        assert data.class_labels == []
    else:
        assert len(data.class_labels) == int(data.y.max()) + 1


def test_every_builtin_is_listed():
    assert set(BUILTIN_SPECS) == {"digits", "digits-cnn", "breast-cancer", "diabetes", "text-topics"}


def test_the_text_spec_is_served_by_its_model_py_with_a_stable_featurizer():
    import zlib

    from modelloop.training.specs.text_topics_model import featurize

    spec = load_spec("text-topics")
    assert spec.python_model is not None
    assert spec.python_model.model_file.name == "text_topics_model.py"
    assert [i["dtype"] for i in spec.python_model.inputs] == ["object"]
    assert [o["name"] for o in spec.python_model.outputs] == ["probabilities", "label"]
    # CRC-32, not the per-process salted hash(): one word lands in the same column everywhere.
    row = featurize([b"Breakpoint"], 1024)[0]
    assert row.nonzero()[0].tolist() == [zlib.crc32(b"breakpoint") % 1024]
    assert row.max() == 1.0  # log1p(1) L2-normalised
    inputs, features = spec.python_model.sample_inputs()
    assert inputs["text"].dtype == object and len(inputs["text"]) == len(features)
    np.testing.assert_array_equal(featurize(inputs["text"].tolist(), 1024), features)
    assert not featurize([""], 1024).any()


def test_a_bad_python_model_is_rejected(tmp_path):
    spec = tmp_path / "bad_python_spec.py"
    spec.write_text(
        "TASK = 'binary'\n"
        "def load_data(): ...\n"
        "def build_model(normalizer, hparams): ...\n"
        "PYTHON_MODEL = {'model_file': 'model.py'}\n"
    )
    with pytest.raises(SpecError, match="PYTHON_MODEL must be a PythonModel, got dict"):
        load_spec(str(spec))


def test_user_spec_file_takes_names_from_module():
    spec = load_spec(str(SPECS / "sequential_spec.py"))
    assert spec.name == "sequential-spec"
    assert spec.input_name == "measurements"
    assert spec.output_name == "scores"
    assert spec.hp("epochs") == 20
    assert spec.hp("batch_size") == 32  # default filled in


def test_user_spec_defaults():
    spec = load_spec(str(SPECS / "functional_spec.py"))
    assert spec.name == "blobs-functional"
    assert (spec.input_name, spec.output_name) == ("features", "probabilities")


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("nope", "unknown spec 'nope'"),
        ("missing.py", "does not exist"),
        (str(SPECS / "missing_parts_spec.py"), "lacks required part(s): build_model"),
        (str(SPECS / "bad_task_spec.py"), "TASK='clustering'"),
        (str(SPECS / "import_error_spec.py"), "failed to import: ModuleNotFoundError"),
    ],
)
def test_bad_specs_are_rejected_with_a_reason(ref, message):
    with pytest.raises(SpecError) as info:
        load_spec(ref)
    assert message in str(info.value)


def test_loader_returning_the_wrong_type_is_rejected():
    spec = load_spec(str(SPECS / "bad_data_spec.py"))
    with pytest.raises(SpecError, match="must return a Dataset"):
        check_dataset(spec.load_data(), spec)


@pytest.mark.parametrize(
    ("x", "y", "names", "message"),
    [
        (np.zeros((20, 2)), np.zeros(19), ["a", "b"], "20 feature rows but 19 targets"),
        (np.zeros((20, 2)), np.zeros(20), ["a"], "2 features but 1 feature names"),
        (np.full((20, 2), np.nan), np.zeros(20), ["a", "b"], "NaN"),
        (np.zeros(20), np.zeros(20), ["a"], "2-D array"),
    ],
)
def test_bad_datasets_are_rejected(x, y, names, message):
    spec = load_spec(str(SPECS / "sequential_spec.py"))
    with pytest.raises(SpecError, match=message):
        check_dataset(Dataset(x, y, names), spec)
