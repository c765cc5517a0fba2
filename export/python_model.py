"""Staging a version served by its own ``model.py`` around the exported network.

For a spec with :class:`~modelloop.training.spec.PythonModel`, the staged version holds
the spec's ``model.py``, ``model_settings.json`` (what the exporter tells it: the ONNX
file, its input and output names, the class labels and the spec's own settings),
``model.onnx`` and ``baseline.json``. The parity check runs the staged ``model.py`` on the
spec's sample inputs, at batch size 1 and all at once, against the Keras model on their
features.

Monitoring: the served input is not the network's float features, so the version's
baseline keeps the prediction distribution and the calibrator (prediction drift, the
label-free estimate and accuracy from labels all work) and declares no input features:
feature drift is not computed for such inputs.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelloop.errors import ModelloopError
from modelloop.layout import (
    ONNX_FILE,
    PYTHON_MODEL_FILE,
    PYTHON_SETTINGS_FILE,
    PYTHON_VERSION_FILES,
)
from modelloop.training.spec import PythonModel

_LOADS = itertools.count(1)


class PythonModelExportError(ModelloopError):
    """The spec's ``model.py`` cannot be staged, loaded or does not match the network."""


@dataclass(frozen=True)
class PythonParity:
    """The staged ``model.py`` against the Keras model on the same samples.

    Attributes:
        passed: Every difference is within ``atol + rtol * |keras|``.
        max_abs_diff: The largest difference of the network's output, over both batch sizes.
        rows: Sample rows compared.
    """

    passed: bool
    max_abs_diff: float
    rows: int

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-serialisable data."""
        return {"passed": self.passed, "max_abs_diff": self.max_abs_diff, "rows": self.rows}


def stage_python_model(staged: Path, run_info: dict[str, Any], python_model: PythonModel) -> None:
    """Copies ``model.py`` into the staged version and writes its ``model_settings.json``.

    Args:
        staged: The staged version directory (``model.onnx`` already there).
        run_info: The run's ``run.json``.
        python_model: The spec's Python model.
    """
    (staged / PYTHON_MODEL_FILE).write_bytes(Path(python_model.model_file).read_bytes())
    settings = {
        "onnx_file": ONNX_FILE,
        "onnx_input": run_info["input"]["name"],
        "onnx_output": run_info["output"]["name"],
        "labels": list(run_info.get("class_labels", [])),
        **python_model.settings,
    }
    (staged / PYTHON_SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")


def _load(staged: Path) -> Any:
    """Imports the staged ``model.py`` as the server would, and loads its ``Model``."""
    path = staged / PYTHON_MODEL_FILE
    name = f"modelloop_export_model_{next(_LOADS)}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PythonModelExportError(f"{path} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        model = module.Model()
        model.load(staged)
    except Exception as exc:
        raise PythonModelExportError(
            f"the spec's model.py failed to load: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        sys.modules.pop(name, None)
    return model


def verify_python_model(
    keras_model: Any,
    staged: Path,
    python_model: PythonModel,
    output_name: str,
    *,
    atol: float,
    rtol: float,
) -> PythonParity:
    """Runs the staged ``model.py`` on the spec's samples against the Keras model.

    Args:
        keras_model: The trained network.
        staged: The staged version with ``model.py``, its settings and ``model.onnx``.
        python_model: The spec's Python model (its samples).
        output_name: The network's output, which ``model.py`` must return unchanged.
        atol: Absolute tolerance.
        rtol: Relative tolerance.

    Returns:
        The report.

    Raises:
        PythonModelExportError: ``model.py`` fails to load or to predict, or misses an
            output the spec declares.
    """
    model = _load(staged)
    inputs, features = python_model.sample_inputs()
    expected = np.asarray(keras_model(np.asarray(features, np.float32), training=False), dtype=np.float32)
    rows = len(expected)
    declared = [str(o["name"]) for o in python_model.outputs]
    worst = 0.0
    passed = True
    for size in (1, rows):
        for start in range(0, rows if size > 1 else min(rows, 16), size):
            batch = {k: v[start : start + size] for k, v in inputs.items()}
            try:
                outputs = model.predict(batch)
            except Exception as exc:
                raise PythonModelExportError(
                    f"the spec's model.py failed on the samples: {type(exc).__name__}: {exc}"
                ) from exc
            missing = [n for n in declared if n not in outputs]
            if missing:
                raise PythonModelExportError(f"the spec's model.py did not return {', '.join(missing)}")
            got = np.asarray(outputs[output_name], dtype=np.float32)
            want = expected[start : start + size]
            if got.shape != want.shape:
                raise PythonModelExportError(
                    f"the spec's model.py returned {output_name!r} of shape {got.shape}, Keras {want.shape}"
                )
            diff = np.abs(got - want)
            worst = max(worst, float(diff.max(initial=0.0)))
            passed = passed and bool(np.all(diff <= atol + rtol * np.abs(want)))
    unload = getattr(model, "unload", None)
    if callable(unload):
        unload()
    return PythonParity(passed=passed, max_abs_diff=worst, rows=rows)


def baseline_without_features(baseline: dict[str, Any], input_name: str) -> dict[str, Any]:
    """The version's drift reference when clients send something other than the features.

    Keeps the prediction distribution and the calibrator, and declares no input features
    (see the module docstring).
    """
    kept = {k: v for k, v in baseline.items() if k not in ("features", "reference_sample", "scaling")}
    return {
        **kept,
        "input": input_name,
        "features": [],
        "reference_sample": [],
        "note": "the served input is not numeric: no feature drift, only prediction drift",
    }


def card_overrides(python_model: PythonModel, parity: dict[str, Any], python: PythonParity) -> dict[str, Any]:
    """The keys of ``model.json`` that differ for a version served by ``model.py``."""
    return {
        "inputs": [dict(entry) for entry in python_model.inputs],
        "outputs": [dict(entry) for entry in python_model.outputs],
        "feature_names": [],
        "runtime": "python",
        "files": dict(PYTHON_VERSION_FILES),
        "parity": {**parity, "model_py": python.to_dict()},
    }
