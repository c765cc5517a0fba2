"""A FakeDataPlane for the gRPC edge tests: the documented DataPlane API, no models behind it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from modelloop.serving.errors import (
    ErrorCode,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    QueueFull,
    ServingError,
)
from modelloop.serving.types import (
    InferRequest,
    InferResponse,
    ModelMetadata,
    ModelState,
    Protocol,
    TensorSpec,
    VersionStatus,
)


def digits_metadata(version: int = 1) -> ModelMetadata:
    """The built-in digits contract: ``pixels`` float32 [-1, 64] -> ``probabilities`` [-1, 10]."""
    return ModelMetadata(
        name="digits",
        version=version,
        platform="onnxruntime_onnx",
        inputs=(TensorSpec("pixels", np.dtype("float32"), (-1, 64)),),
        outputs=(
            TensorSpec("probabilities", np.dtype("float32"), (-1, 10)),
            TensorSpec("label", np.dtype("object"), (-1,)),
        ),
        labels=tuple(str(i) for i in range(10)),
        task="multiclass",
    )


def fake_probabilities(pixels: np.ndarray) -> np.ndarray:
    """A deterministic stand-in for the model: softmax of the first ten pixels."""
    logits = pixels[:, :10].astype(np.float64)
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


@dataclass
class FakeDataPlane:
    """Answers like the real DataPlane for model ``digits`` (versions 1 and 2, label ``stable`` = 1).

    Attributes:
        requests: Every InferRequest that reached ``infer``.
        rejected: Every ``observe_rejected`` call as ``(model, protocol, code)``.
        fail_with: When set, ``infer`` raises it (to test the status mapping).
        is_ready: What ``ready()`` answers.
        draining: What ``draining`` reads.
        loaded: Model names passed to ``load_model``; ``unloaded`` likewise.
    """

    requests: list[InferRequest] = field(default_factory=list)
    rejected: list[tuple[str, Protocol, object]] = field(default_factory=list)
    fail_with: BaseException | None = None
    is_ready: bool = True
    draining: bool = False
    loaded: list[str] = field(default_factory=list)
    unloaded: list[str] = field(default_factory=list)
    versions: dict[int, ModelState] = field(
        default_factory=lambda: {1: ModelState.AVAILABLE, 2: ModelState.AVAILABLE, 3: ModelState.FAILED}
    )
    labels: dict[str, int] = field(default_factory=lambda: {"stable": 1})
    _counter: int = 0

    def _resolve(self, name: str, version: int | None, label: str | None) -> int:
        if name != "digits":
            raise ModelNotFound(f"model {name!r} not found")
        if label is not None:
            if label not in self.labels:
                raise ModelNotFound(f"model 'digits' has no version label {label!r}")
            version = self.labels[label]
        if version is None:
            available = [v for v, s in self.versions.items() if s is ModelState.AVAILABLE]
            if not available:
                raise ModelNotReady("model 'digits' has no available version")
            return max(available)
        if version not in self.versions:
            raise ModelNotFound(f"model 'digits' has no version {version}")
        if self.versions[version] is not ModelState.AVAILABLE:
            raise ModelNotReady(f"model 'digits' version {version} is {self.versions[version].value}")
        return version

    async def infer(self, request: InferRequest) -> InferResponse:
        self.requests.append(request)
        if self.fail_with is not None:
            raise self.fail_with
        version = self._resolve(request.model, request.version, request.label)
        if request.signature_name not in (None, "serving_default"):
            raise ModelNotFound(f"model 'digits' has no signature {request.signature_name!r}")
        unknown = set(request.inputs) - {"pixels"}
        if unknown:
            raise InvalidInput(f"unknown input {sorted(unknown)[0]!r}; the model takes 'pixels'")
        pixels = request.inputs.get("pixels")
        if pixels is None:
            raise InvalidInput("missing input 'pixels'")
        if pixels.ndim != 2 or pixels.shape[1] != 64:
            raise InvalidInput(f"input 'pixels' has shape {list(pixels.shape)}; expected [-1, 64]")
        probabilities = fake_probabilities(pixels.astype(np.float32))
        outputs: dict[str, np.ndarray] = {
            "probabilities": probabilities,
            "label": np.array([str(i) for i in probabilities.argmax(axis=1)], dtype=object),
        }
        if request.outputs is not None:
            for name in request.outputs:
                if name not in outputs:
                    raise InvalidInput(f"unknown output {name!r}; the model has probabilities, label")
            outputs = {k: v for k, v in outputs.items() if k in request.outputs}
        self._counter += 1
        return InferResponse(
            model="digits",
            version=version,
            outputs=outputs,
            id=request.id or f"generated-{self._counter}",
            parameters={"served_by": "fake"},
        )

    def metadata(self, name: str, version: int | None = None, label: str | None = None) -> ModelMetadata:
        return digits_metadata(self._resolve(name, version, label))

    def model_status(
        self, name: str, version: int | None = None, label: str | None = None
    ) -> list[VersionStatus]:
        if name != "digits":
            raise ModelNotFound(f"model {name!r} not found")
        if label is not None:
            if label not in self.labels:
                raise ModelNotFound(f"model 'digits' has no version label {label!r}")
            version = self.labels[label]
        if version is not None and version not in self.versions:
            raise ModelNotFound(f"model 'digits' has no version {version}")
        return [
            VersionStatus(v, s, "corrupt model.onnx" if s is ModelState.FAILED else "")
            for v, s in sorted(self.versions.items())
            if version is None or v == version
        ]

    def model_ready(self, name: str, version: int | None = None, label: str | None = None) -> bool:
        try:
            self._resolve(name, version, label)
        except ModelNotReady:
            return False
        return True

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return self.is_ready and not self.draining

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "modelloop", "version": "0.1.0", "extensions": ["model_repository"]}

    def repository_index(self) -> list[dict[str, Any]]:
        state = {ModelState.AVAILABLE: "READY", ModelState.FAILED: "UNAVAILABLE"}
        return [
            {"name": "digits", "version": v, "state": state.get(s, s.value), "reason": ""}
            for v, s in sorted(self.versions.items())
        ]

    async def load_model(self, name: str) -> None:
        if name != "digits":
            raise ModelNotFound(f"model {name!r} not found in the repository")
        self.loaded.append(name)

    async def unload_model(self, name: str) -> None:
        if name != "digits":
            raise ModelNotFound(f"model {name!r} not found")
        self.unloaded.append(name)

    def observe_rejected(self, model: str, protocol: Protocol, code: object, seconds: float) -> None:
        assert seconds >= 0
        self.rejected.append((model, protocol, code))


def queue_full() -> ServingError:
    """The error the batcher raises when its queue is full."""
    return QueueFull("queue of model 'digits' version 2 is full (64 batches); retry later")


def internal(code: ErrorCode = ErrorCode.INTERNAL) -> ServingError:
    """A runtime failure with the given code."""
    return ServingError("runtime failed", code)
