"""Tiny runtimes for the serving tests: no framework, deterministic, observable."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from modelloop.serving.runtime import Runtime
from modelloop.serving.types import ModelMetadata, TensorSpec


def fake_metadata(name: str = "fake", version: int = 1, features: int = 3) -> ModelMetadata:
    """Input ``x`` float32 [-1, features]; outputs ``sum`` [-1, 1] and ``echo`` [-1, features]."""
    return ModelMetadata(
        name=name,
        version=version,
        platform="fake",
        inputs=(TensorSpec("x", np.dtype("float32"), (-1, features)),),
        outputs=(
            TensorSpec("sum", np.dtype("float32"), (-1, 1)),
            TensorSpec("echo", np.dtype("float32"), (-1, features)),
        ),
        labels=(),
        task="regression",
    )


class FakeRuntime(Runtime):
    """Returns the row sums (plus ``offset``) and the input itself; records each call's rows."""

    def __init__(self, metadata: ModelMetadata | None = None, offset: float = 0.0) -> None:
        super().__init__(metadata or fake_metadata())
        self.offset = offset
        self.calls: list[int] = []
        self.loaded = False
        self.unloaded = False

    def load(self) -> None:
        self.loaded = True

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        self.calls.append(int(x.shape[0]))
        return {
            "sum": x.sum(axis=1, keepdims=True).astype(np.float32) + np.float32(self.offset),
            "echo": x.copy(),
        }

    def unload(self) -> None:
        self.unloaded = True


class SlowRuntime(FakeRuntime):
    """A FakeRuntime whose ``predict`` blocks until ``release`` is set (or ``delay`` passes)."""

    def __init__(self, metadata: ModelMetadata | None = None, delay: float = 10.0) -> None:
        super().__init__(metadata)
        self.delay = delay
        self.release = threading.Event()
        self.started = threading.Event()

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.started.set()
        self.release.wait(self.delay)
        return super().predict(inputs)


class ErrorRuntime(FakeRuntime):
    """Loads fine; every ``predict`` raises."""

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls.append(int(inputs["x"].shape[0]))
        raise RuntimeError("boom: the model exploded")


class FailingLoadRuntime(FakeRuntime):
    """``load`` raises, like a corrupt model file."""

    def load(self) -> None:
        raise ValueError("corrupt model file")


class SlowLoadRuntime(FakeRuntime):
    """``load`` takes ``delay`` seconds, to show that loading never blocks the event loop."""

    def __init__(self, metadata: ModelMetadata | None = None, delay: float = 0.2) -> None:
        super().__init__(metadata)
        self.delay = delay

    def load(self) -> None:
        time.sleep(self.delay)
        super().load()


def write_fake_version(repo: Path, name: str, version: int, features: int = 3) -> Path:
    """Writes ``<repo>/<name>/<version>/model.json`` for the fake model and returns the dir."""
    import json

    path = repo / name / str(version)
    path.mkdir(parents=True, exist_ok=True)
    meta = {
        "name": name,
        "version": version,
        "task": "regression",
        "signature_name": "serving_default",
        "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, features]}],
        "outputs": [
            {"name": "sum", "dtype": "float32", "shape": [-1, 1]},
            {"name": "echo", "dtype": "float32", "shape": [-1, features]},
        ],
        "labels": [],
    }
    (path / "model.json").write_text(json.dumps(meta))
    return path
