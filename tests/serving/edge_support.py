"""The server the REST and gRPC edge tests talk to: the real registry and data plane, fake runtimes.

Every edge test builds the same stack the composition root builds (repository ->
:class:`ModelRegistry` -> :class:`DataPlane`) over a temporary repository written here,
and swaps only the runtimes, through the registry's ``runtime_factory``. Resolution,
validation, request ids, batching and metrics are therefore the real ones.

The fake models:

* ``digits``: ``pixels`` float32 [-1, 64] -> ``probabilities`` float32 [-1, 10] (each
  row's first ten pixels) and, with ``label_output``, ``label`` BYTES [-1] (the index of
  the largest of those ten, as text).
* ``multi``: ``a`` float32 [-1, 2] and ``s`` BYTES [-1] -> ``y`` float32 [-1] (row sums of
  ``a``) and ``echo`` BYTES [-1] (``s`` unchanged).

Example:

```python
write_digits(tmp_path, versions=(1, 2))
async with serve(tmp_path, RuntimeFactory({("digits", 2): FailingRuntime})) as stack:
    app = create_app(stack.dataplane, stack.settings, stack.prometheus)
```
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from prometheus_client import CollectorRegistry

from modelloop.layout import CONFIG_FILE, write_model_card
from modelloop.serving.dataplane import DataPlane
from modelloop.serving.grpc.server import bind_grpc_server, create_grpc_server
from modelloop.serving.metrics import ServingMetrics
from modelloop.serving.protos import grpc_service_pb2 as pb
from modelloop.serving.registry import ModelRegistry
from modelloop.serving.repository import ModelRepository
from modelloop.serving.runtime import Runtime
from modelloop.serving.settings import ModelConfig, ServingSettings
from modelloop.serving.types import ModelMetadata
from tests.tools import clients_python

PIXELS = 64
CLASSES = 10
MIB = 1024 * 1024

# -- the repository ----------------------------------------------------------------------


def tensor(name: str, dtype: str, shape: Sequence[int]) -> dict[str, Any]:
    """One input or output entry of ``model.json``."""
    return {"name": name, "dtype": dtype, "shape": list(shape)}


def write_version(
    repo: Path,
    name: str,
    version: int,
    inputs: Sequence[dict[str, Any]],
    outputs: Sequence[dict[str, Any]],
    *,
    labels: Sequence[str] = (),
    task: str = "",
) -> Path:
    """Writes ``<repo>/<name>/<version>/model.json`` and returns the version directory."""
    path = repo / name / str(version)
    path.mkdir(parents=True, exist_ok=True)
    write_model_card(
        path,
        {
            "name": name,
            "version": version,
            "task": task,
            "signature_name": "serving_default",
            "inputs": list(inputs),
            "outputs": list(outputs),
            "labels": list(labels),
        },
    )
    return path


def write_config(repo: Path, name: str, config: Mapping[str, Any]) -> Path:
    """Writes ``<repo>/<name>/config.json``; it must be a valid :class:`ModelConfig`."""
    ModelConfig.model_validate(config)
    path = repo / name / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config))
    return path


def write_digits(
    repo: Path,
    versions: Sequence[int] = (1, 2),
    *,
    label_output: bool = False,
    version_labels: Mapping[str, int] | None = None,
) -> None:
    """Writes the ``digits`` model: every version loaded, ``stable`` naming version 1.

    The config says ``runtime: onnx`` so that the platform reads ``onnxruntime_onnx`` as the
    published model's does; the fake factory never opens a file.
    """
    outputs = [tensor("probabilities", "float32", (-1, CLASSES))]
    if label_output:
        outputs.append(tensor("label", "object", (-1,)))
    for version in versions:
        write_version(
            repo,
            "digits",
            version,
            [tensor("pixels", "float32", (-1, PIXELS))],
            outputs,
            labels=[str(i) for i in range(CLASSES)],
            task="multiclass",
        )
    labels = {"stable": 1} if version_labels is None else dict(version_labels)
    write_config(repo, "digits", {"version_policy": {"all": {}}, "version_labels": labels, "runtime": "onnx"})


def write_multi(repo: Path) -> None:
    """Writes the ``multi`` model, version 1: two inputs (one BYTES), two outputs (one BYTES)."""
    write_version(
        repo,
        "multi",
        1,
        [tensor("a", "float32", (-1, 2)), tensor("s", "object", (-1,))],
        [tensor("y", "float32", (-1,)), tensor("echo", "object", (-1,))],
    )


# -- the runtimes --------------------------------------------------------------------------


def digits_probabilities(pixels: np.ndarray) -> np.ndarray:
    """What the fake ``digits`` answers: each row's first ten pixels, as float32."""
    return np.ascontiguousarray(np.asarray(pixels)[:, :CLASSES], dtype=np.float32)


class EdgeRuntime(Runtime):
    """Answers every output the metadata names (see the module docstring) and records each call.

    Attributes:
        calls: The inputs of every ``predict``, in order (validated and cast by the data plane).
        loaded: Whether ``load`` ran; ``unloaded`` likewise.
    """

    def __init__(self, metadata: ModelMetadata) -> None:
        super().__init__(metadata)
        self.calls: list[dict[str, np.ndarray]] = []
        self.loaded = False
        self.unloaded = False

    def load(self) -> None:
        self.loaded = True

    def unload(self) -> None:
        self.unloaded = True

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls.append({name: value.copy() for name, value in inputs.items()})
        return {spec.name: self.answer(spec.name, inputs) for spec in self.metadata.outputs}

    @staticmethod
    def answer(output: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """One output of the fake models."""
        if output == "probabilities":
            return digits_probabilities(inputs["pixels"])
        if output == "label":
            best = digits_probabilities(inputs["pixels"]).argmax(axis=1)
            return np.array([str(i) for i in best], dtype=object)
        if output == "y":
            return inputs["a"].sum(axis=1).astype(np.float32)
        if output == "echo":
            return inputs["s"].copy()
        raise KeyError(f"the fake runtime has no output {output!r}")


class FailingRuntime(EdgeRuntime):
    """Loads fine; every ``predict`` raises ``error`` (a RuntimeError unless set)."""

    error: BaseException = RuntimeError("boom: the model exploded")

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls.append(dict(inputs))
        raise self.error


def failing(error: Exception) -> Callable[[ModelMetadata], Runtime]:
    """A runtime maker whose runtimes raise ``error`` on every ``predict``."""

    def make(metadata: ModelMetadata) -> Runtime:
        runtime = FailingRuntime(metadata)
        runtime.error = error
        return runtime

    return make


class GatedRuntime(EdgeRuntime):
    """An EdgeRuntime whose ``predict`` sets ``started`` and then waits for ``release``."""

    def __init__(self, metadata: ModelMetadata, timeout_s: float = 10.0) -> None:
        super().__init__(metadata)
        self.timeout_s = timeout_s
        self.started = threading.Event()
        self.release = threading.Event()

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.started.set()
        self.release.wait(self.timeout_s)
        return super().predict(inputs)


class Unencodable:
    """A value no edge can put on the wire: ``bytes()`` and JSON both fail with ``secret detail``."""

    def __bytes__(self) -> bytes:
        raise ZeroDivisionError("secret detail")

    def __str__(self) -> str:
        raise ZeroDivisionError("secret detail")


class UnencodableRuntime(EdgeRuntime):
    """Answers its BYTES outputs with :class:`Unencodable` objects: a server bug past the data plane."""

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = super().predict(inputs)
        for spec in self.metadata.outputs:
            if spec.dtype == np.dtype(object):
                outputs[spec.name] = np.array([Unencodable() for _ in outputs[spec.name]], dtype=object)
        return outputs


RuntimeMaker = Callable[[ModelMetadata], Runtime]


class RuntimeFactory:
    """The registry's ``runtime_factory``: EdgeRuntimes unless ``overrides`` names the version.

    Args:
        overrides: ``(model, version) -> maker`` (a Runtime class or a function of the
            metadata), e.g. ``{("digits", 3): FailingLoadRuntime}``.
    """

    def __init__(self, overrides: Mapping[tuple[str, int], RuntimeMaker] | None = None) -> None:
        self.overrides = dict(overrides or {})
        self.built: list[Runtime] = []

    def __call__(self, kind: str, path: Path, metadata: ModelMetadata, config: ModelConfig) -> Runtime:
        make = self.overrides.get((metadata.name, metadata.version), EdgeRuntime)
        runtime = make(metadata)
        self.built.append(runtime)
        return runtime

    def runtime(self, model: str, version: int) -> Any:
        """The runtime built last for a version (typed Any: tests read the fakes' records)."""
        for runtime in reversed(self.built):
            if (runtime.metadata.name, runtime.metadata.version) == (model, version):
                return runtime
        raise KeyError(f"no runtime was built for {model} version {version}")


# -- the stack -------------------------------------------------------------------------------

RequestKey = tuple[str, str, str, str]


@dataclass
class EdgeStack:
    """A data plane over a repository, with what the tests read back.

    Attributes:
        dataplane: The real data plane.
        prometheus: The registry its metrics live on (what ``/metrics`` exposes).
        settings: The server settings it was built with.
        factory: The runtime factory; ``factory.runtime(model, version)`` is a version's fake.
    """

    dataplane: DataPlane
    prometheus: CollectorRegistry
    settings: ServingSettings
    factory: RuntimeFactory

    def requests(self) -> dict[RequestKey, float]:
        """``modelloop_requests_total`` as ``{(model, version, protocol, code): count}``."""
        counts: dict[RequestKey, float] = {}
        for family in self.prometheus.collect():
            for sample in family.samples:
                if sample.name == "modelloop_requests_total":
                    labels = sample.labels
                    key = (labels["model"], labels["version"], labels["protocol"], labels["code"])
                    counts[key] = sample.value
        return counts

    def count(self, model: str, version: str, protocol: str, code: str) -> float:
        """One ``modelloop_requests_total`` sample, 0 when it was never counted."""
        return self.requests().get((model, version, protocol, code), 0.0)


@contextlib.asynccontextmanager
async def serve(
    repo: Path,
    factory: RuntimeFactory | None = None,
    *,
    start: bool = True,
    real_runtimes: bool = False,
    **settings: Any,
) -> AsyncIterator[EdgeStack]:
    """Builds repository, registry and data plane over ``repo``, starts it, and stops it after.

    Args:
        repo: The model repository.
        factory: The runtime factory. Defaults to a plain :class:`RuntimeFactory`.
        start: Whether to start the data plane (False: a server still starting up).
        real_runtimes: Use the production runtimes (ONNX Runtime) instead of fakes.
        **settings: :class:`ServingSettings` fields. ``poll_interval_s`` defaults to an
            hour (tests poll by hand) and, with fakes, ``warmup`` to False so that a fake's
            ``calls`` hold the requests only.

    Yields:
        The stack.
    """
    settings.setdefault("poll_interval_s", 3600)
    if not real_runtimes:
        settings.setdefault("warmup", False)
    server_settings = ServingSettings(repo=repo, **settings)
    prometheus = CollectorRegistry()
    metrics = ServingMetrics(prometheus)
    factory = factory if factory is not None else RuntimeFactory()
    registry = ModelRegistry(
        ModelRepository(repo),
        server_settings,
        metrics=metrics,
        runtime_factory=None if real_runtimes else factory,
    )
    dataplane = DataPlane(registry, metrics)
    if start:
        await dataplane.start()
    try:
        yield EdgeStack(dataplane, prometheus, server_settings, factory)
    finally:
        await dataplane.stop()


@contextlib.asynccontextmanager
async def grpc_channel(stack: EdgeStack) -> AsyncIterator[tuple[int, grpc.aio.Channel]]:
    """Serves the stack's data plane over a real gRPC server on a free loopback port.

    The client channel takes messages of up to 64 MiB both ways, so that the server's
    own limit is the one a test meets.

    Yields:
        The port and an open channel to it.
    """
    server = create_grpc_server(stack.dataplane, stack.settings)
    port = bind_grpc_server(server, "127.0.0.1", 0)
    await server.start()
    options = [("grpc.max_send_message_length", 64 * MIB), ("grpc.max_receive_message_length", 64 * MIB)]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            yield port, channel
    finally:
        await server.stop(None)


def model_infer_request(pixels: np.ndarray, raw: bool = True, **fields: object) -> pb.ModelInferRequest:
    """A ``ModelInferRequest`` for ``digits`` with ``pixels`` as FP32, raw or typed contents."""
    request = pb.ModelInferRequest(model_name="digits", **fields)  # type: ignore[arg-type]
    tensor = request.inputs.add(name="pixels", datatype="FP32", shape=pixels.shape)
    if raw:
        request.raw_input_contents.append(pixels.astype("<f4").tobytes())
    else:
        tensor.contents.fp32_contents.extend(pixels.reshape(-1).tolist())
    return request


async def run_client_script(*args: str, timeout: float = 120) -> str:
    """Runs a script under the tritonclient environment and returns its output.

    The script prints ``ALL OK`` when every check passed; anything else fails the test
    with the script's output.
    """
    process = await asyncio.create_subprocess_exec(
        clients_python(), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=timeout)
    text = output.decode(errors="replace")
    assert process.returncode == 0, text
    assert "ALL OK" in text, text
    return text
