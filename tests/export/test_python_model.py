"""Staging and checking a spec's ``model.py``: the copy, its settings and the parity against Keras.

The network here is a plain function of the features (what ``keras_model(x, training=False)``
is called as), so these run in milliseconds; the real spec goes through
``tests/e2e/test_python_model_e2e.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from modelloop.export.python_model import (
    PythonModelExportError,
    baseline_without_features,
    card_overrides,
    stage_python_model,
    verify_python_model,
)
from modelloop.training.spec import PythonModel

# Probabilities from the lengths of the texts: [len / 10, 1 - len / 10], plus OFFSET.
SOURCE = """
import json
from pathlib import Path

import numpy as np

OFFSET = {offset}

class Model:
    def load(self, version_dir):
        settings = json.loads((Path(version_dir) / "model_settings.json").read_text())
        assert settings["onnx_output"] == "probabilities", settings
        {load}

    def predict(self, inputs):
        n = np.array([len(t) for t in inputs["text"]], dtype=np.float32) / 10
        return {{"probabilities": np.stack([n, 1 - n], axis=1) + OFFSET, "label": inputs["text"]}}
"""
TEXTS = [b"a", b"abc", b"", "\u00e9t\u00e9".encode()]


def network(features: np.ndarray, training: bool = False) -> np.ndarray:
    return np.stack([features[:, 0], 1 - features[:, 0]], axis=1)


def python_model(tmp_path: Path, offset: float = 0.0, load: str = "pass") -> PythonModel:
    path = tmp_path / "spec_model.py"
    path.write_text(SOURCE.format(offset=offset, load=load))
    features = np.array([[len(t) / 10] for t in TEXTS], dtype=np.float32)
    return PythonModel(
        model_file=path,
        inputs=({"name": "text", "dtype": "object", "shape": [-1]},),
        outputs=(
            {"name": "probabilities", "dtype": "float32", "shape": [-1, 2]},
            {"name": "label", "dtype": "object", "shape": [-1]},
        ),
        sample_inputs=lambda: ({"text": np.array(TEXTS, dtype=object)}, features),
        settings={"dimensions": 1},
    )


RUN_INFO = {
    "input": {"name": "features"},
    "output": {"name": "probabilities"},
    "class_labels": ["short", "long"],
}


def staged_dir(tmp_path: Path, model: PythonModel) -> Path:
    staged = tmp_path / "staged"
    staged.mkdir()
    stage_python_model(staged, RUN_INFO, model)
    return staged


def test_a_matching_model_py_passes_and_its_settings_are_written(tmp_path: Path) -> None:
    model = python_model(tmp_path)
    staged = staged_dir(tmp_path, model)
    assert (staged / "model.py").read_text() == model.model_file.read_text()
    settings = json.loads((staged / "model_settings.json").read_text())
    assert settings == {
        "onnx_file": "model.onnx",
        "onnx_input": "features",
        "onnx_output": "probabilities",
        "labels": ["short", "long"],
        "dimensions": 1,
    }
    report = verify_python_model(network, staged, model, "probabilities", atol=1e-5, rtol=1e-6)
    assert report.passed and report.rows == 4 and report.max_abs_diff < 1e-6
    card = card_overrides(model, {"passed": True}, report)
    assert card["inputs"] == [{"name": "text", "dtype": "object", "shape": [-1]}]
    assert card["parity"]["model_py"]["passed"] is True and card["files"]["python"] == "model.py"


def test_a_diverging_model_py_fails_the_parity_check(tmp_path: Path) -> None:
    model = python_model(tmp_path, offset=0.01)
    report = verify_python_model(
        network, staged_dir(tmp_path, model), model, "probabilities", atol=1e-5, rtol=1e-6
    )
    assert not report.passed and report.max_abs_diff == pytest.approx(0.01, rel=1e-3)


def test_a_model_py_that_cannot_load_is_a_clear_error(tmp_path: Path) -> None:
    model = python_model(tmp_path, load="raise OSError('vocabulary.txt is missing')")
    with pytest.raises(PythonModelExportError, match=r"failed to load: OSError: vocabulary\.txt is missing"):
        verify_python_model(network, staged_dir(tmp_path, model), model, "probabilities", atol=1e-5, rtol=0)


def test_the_baseline_keeps_predictions_and_drops_features() -> None:
    run = {
        "input": "features",
        "features": [{"name": "hash_0"}],
        "reference_sample": [[0.0]],
        "scaling": {},
        "predictions": {"kind": "class", "proportions": [0.5, 0.5]},
        "calibration": {"method": "temperature"},
    }
    version = baseline_without_features(run, "text")
    assert version["input"] == "text" and version["features"] == [] and version["reference_sample"] == []
    assert version["predictions"] == run["predictions"] and version["calibration"] == run["calibration"]
    assert "scaling" not in version
