"""A FakeDataPlane with the DataPlane API of INTERFACES.md, for REST edge tests.

It holds two models, answers inference deterministically and records what the edge
passed in, so tests can check the translation without a registry or runtimes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from modelloop.serving.errors import InvalidInput, ModelNotFound, ModelNotReady
from modelloop.serving.types import (
    InferRequest,
    InferResponse,
    ModelMetadata,
    ModelState,
    Protocol,
    TensorSpec,
    VersionStatus,
)


def digits_metadata(version: int) -> ModelMetadata:
    """The built-in digits signature: ``pixels`` [-1, 64] -> ``probabilities`` [-1, 10]."""
    return ModelMetadata(
        name="digits",
        version=version,
        platform="onnxruntime_onnx",
        inputs=(TensorSpec("pixels", np.dtype("float32"), (-1, 64)),),
        outputs=(TensorSpec("probabilities", np.dtype("float32"), (-1, 10)),),
        labels=tuple(str(i) for i in range(10)),
        task="multiclass",
    )


MULTI = ModelMetadata(
    name="multi",
    version=1,
    platform="fake",
    inputs=(TensorSpec("a", np.dtype("float32"), (-1, 2)), TensorSpec("s", np.dtype("object"), (-1,))),
    outputs=(TensorSpec("y", np.dtype("float32"), (-1,)), TensorSpec("echo", np.dtype("object"), (-1,))),
)


@dataclass
class FakeDataPlane:
    """Serves ``digits`` (versions 1 and 2, label ``stable`` -> 1) and ``multi`` (version 1).

    ``digits`` answers each row's first ten pixels as its probabilities; ``multi`` answers
    the row sums of ``a`` and echoes ``s``. Set ``fail_with`` to make ``infer`` raise.
    """

    is_live: bool = True
    is_ready: bool = True
    fail_with: BaseException | None = None
    unavailable: set[tuple[str, int]] = field(default_factory=set)
    requests: list[InferRequest] = field(default_factory=list)
    rejected: list[tuple[str, Any, Any]] = field(default_factory=list)
    loaded: list[str] = field(default_factory=list)
    unloaded: list[str] = field(default_factory=list)
    draining: bool = False

    models: dict[str, dict[int, ModelMetadata]] = field(
        default_factory=lambda: {
            "digits": {1: digits_metadata(1), 2: digits_metadata(2)},
            "multi": {1: MULTI},
        }
    )
    labels: dict[str, dict[str, int]] = field(default_factory=lambda: {"digits": {"stable": 1}, "multi": {}})

    def _resolve(self, name: str, version: int | None, label: str | None) -> ModelMetadata:
        versions = self.models.get(name)
        if versions is None:
            raise ModelNotFound(f"model {name!r} not found")
        if label is not None:
            if label not in self.labels[name]:
                raise ModelNotFound(f"model {name!r} has no version label {label!r}")
            version = self.labels[name][label]
        if version is None:
            available = [v for v in versions if (name, v) not in self.unavailable]
            if not available:
                raise ModelNotReady(f"model {name!r} has no available version")
            version = max(available)
        if version not in versions:
            raise ModelNotFound(f"model {name!r} has no version {version}")
        if (name, version) in self.unavailable:
            raise ModelNotReady(f"model {name!r} version {version} is not available")
        return versions[version]

    async def infer(self, request: InferRequest) -> InferResponse:
        self.requests.append(request)
        if self.fail_with is not None:
            raise self.fail_with
        meta = self._resolve(request.model, request.version, request.label)
        expected = {spec.name for spec in meta.inputs}
        if set(request.inputs) != expected:
            raise InvalidInput(f"inputs {sorted(request.inputs)} do not match {sorted(expected)}")
        if meta.name == "digits":
            x = request.inputs["pixels"]
            if x.ndim != 2 or x.shape[1] != 64:
                raise InvalidInput(f"pixels must be [-1, 64], got {list(x.shape)}")
            outputs = {"probabilities": np.ascontiguousarray(x[:, :10], dtype=np.float32)}
        else:
            outputs = {
                "y": request.inputs["a"].sum(axis=1).astype(np.float32),
                "echo": request.inputs["s"],
            }
        if request.outputs:
            unknown = [n for n in request.outputs if n not in outputs]
            if unknown:
                raise InvalidInput(f"unknown output {unknown[0]!r}")
            outputs = {n: outputs[n] for n in request.outputs}
        return InferResponse(request.model, meta.version, outputs, id=request.id or "generated")

    def metadata(self, name: str, version: int | None = None, label: str | None = None) -> ModelMetadata:
        return self._resolve(name, version, label)

    def model_status(
        self, name: str, version: int | None = None, label: str | None = None
    ) -> list[VersionStatus]:
        if name not in self.models:
            raise ModelNotFound(f"model {name!r} not found")
        if label is not None:
            if label not in self.labels[name]:
                raise ModelNotFound(f"model {name!r} has no version label {label!r}")
            version = self.labels[name][label]
        versions = sorted(self.models[name], reverse=True) if version is None else [version]
        out = []
        for v in versions:
            if v not in self.models[name]:
                raise ModelNotFound(f"model {name!r} has no version {v}")
            state = ModelState.LOADING if (name, v) in self.unavailable else ModelState.AVAILABLE
            out.append(VersionStatus(v, state))
        return out

    def model_ready(self, name: str, version: int | None = None, label: str | None = None) -> bool:
        try:
            self._resolve(name, version, label)
        except ModelNotReady:
            return False
        return True

    def live(self) -> bool:
        return self.is_live

    def ready(self) -> bool:
        return self.is_ready

    def server_metadata(self) -> dict[str, Any]:
        return {
            "name": "modelloop",
            "version": "0.1.0",
            "extensions": ["binary_tensor_data", "model_repository"],
        }

    def repository_index(self) -> list[dict[str, str]]:
        return [
            {"name": name, "version": str(v), "state": ModelState.AVAILABLE.value, "reason": ""}
            for name, versions in self.models.items()
            for v in versions
        ]

    async def load_model(self, name: str) -> None:
        if name not in self.models:
            raise ModelNotFound(f"model {name!r} is not in the repository")
        self.loaded.append(name)

    async def unload_model(self, name: str) -> None:
        if name not in self.models:
            raise ModelNotFound(f"model {name!r} is not in the repository")
        self.unloaded.append(name)

    def model_names(self) -> list[str]:
        return sorted(self.models)

    def version_labels(self, name: str) -> dict[str, int]:
        if name not in self.labels:
            raise ModelNotFound(f"model {name!r} not found")
        return dict(self.labels[name])

    def observe_rejected(self, model: str, protocol: Protocol | str, code: Any, seconds: float) -> None:
        assert seconds >= 0
        self.rejected.append((model, protocol, code))

    async def start(self) -> None:
        return None

    async def drain(self, grace_s: float) -> None:
        self.draining = True

    async def stop(self) -> None:
        self.draining = True
