"""Helpers of the monitoring tests: digits drift, fake version directories, a fake catalog,
and the plumbing for tests that run Debian's Prometheus tools."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modelloop.serving.errors import ModelNotFound
from modelloop.serving.settings import ModelConfig
from modelloop.serving.types import ModelState, VersionStatus


@dataclass(frozen=True)
class DigitsData:
    """The scikit-learn digits split in two, with a baseline built from the first half."""

    x_ref: np.ndarray
    y_ref: np.ndarray
    x_new: np.ndarray
    y_new: np.ndarray
    baseline: dict


def drifted_digits(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """Inverted pixels (16 - x) plus noise, clipped to the 0..16 range."""
    rng = np.random.default_rng(seed)
    return np.clip(16.0 - x + rng.normal(0.0, 2.0, x.shape), 0.0, 16.0).astype(np.float32)


def write_version(
    repo: Path, name: str, version: int, baseline: dict | None, task: str = "multiclass"
) -> Path:
    """A version directory with only what monitoring reads: model.json and baseline.json."""
    vdir = repo / name / str(version)
    vdir.mkdir(parents=True)
    labels = [str(i) for i in range(10)] if task == "multiclass" else []
    (vdir / "model.json").write_text(
        json.dumps(
            {
                "name": name,
                "version": version,
                "task": task,
                "labels": labels,
                "inputs": [{"name": "pixels", "dtype": "float32", "shape": [-1, 64]}],
                "outputs": [{"name": "probabilities", "dtype": "float32", "shape": [-1, len(labels) or 1]}],
            }
        )
    )
    if baseline is not None:
        (vdir / "baseline.json").write_text(json.dumps(baseline))
    return vdir


@dataclass
class FakeCatalog:
    """A ModelCatalog (serving/types.py) over fixed states and configs, as ModelRegistry answers."""

    versions: dict[str, dict[int, ModelState]] = field(default_factory=dict)
    configs: dict[str, ModelConfig] = field(default_factory=dict)

    def model_names(self) -> list[str]:
        return sorted(self.versions)

    def has_model(self, name: str) -> bool:
        return name in self.versions

    def statuses(self, name: str) -> list[VersionStatus]:
        if name not in self.versions:
            raise ModelNotFound(f"no model {name!r}")
        return [VersionStatus(v, s) for v, s in sorted(self.versions[name].items())]

    def model_options(self, name: str, key: str) -> dict:
        if name not in self.versions:
            raise ModelNotFound(f"no model {name!r}")
        return dict(getattr(self.configs.get(name, ModelConfig()), key))


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def logged(request: Any, response: Any) -> tuple[Any, ...]:
    """One answered request as the prediction log's reader hands it to the recorder."""
    return (
        response.model,
        response.version,
        response.id,
        time.time(),
        request.inputs,
        response.outputs,
        None,
    )
