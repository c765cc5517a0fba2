"""A loaded version's handle and how its runtime is built.

:class:`Servable` is what a request holds while it runs (its runtime, its batcher and an
in-flight count that an unload waits on); :func:`create_runtime` picks and sizes the runtime
of a version. The registry (:mod:`~modelloop.serving.registry`) decides when either happens.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from modelloop.layout import ONNX_FILE, SAVED_MODEL_DIR
from modelloop.serving.batching import DynamicBatcher
from modelloop.serving.cpus import cpu_budget
from modelloop.serving.repository import RuntimeKind
from modelloop.serving.runtime import Runtime
from modelloop.serving.settings import ModelConfig, ServingSettings
from modelloop.serving.types import ModelMetadata

RuntimeFactory = Callable[[RuntimeKind, Path, ModelMetadata, ModelConfig], Runtime]
"""Builds an unloaded runtime: ``(kind, version_dir, metadata, config) -> Runtime``."""


def create_runtime(
    kind: RuntimeKind,
    version_dir: Path,
    metadata: ModelMetadata,
    config: ModelConfig,
    settings: ServingSettings,
) -> Runtime:
    """The default runtime factory: ONNX Runtime, TensorFlow SavedModel or a ``model.py``.

    Per-model config overrides the server's providers, thread counts and spinning. With
    neither setting a thread count, ONNX Runtime gets one intra-op thread per CPU this
    process may use (:func:`~modelloop.serving.cpus.cpu_budget`), divided by the workers.

    Args:
        kind: ``onnx``, ``savedmodel`` or ``python``.
        version_dir: ``<repo>/<name>/<version>``.
        metadata: The version's metadata.
        config: The model's config.
        settings: Server-wide defaults.

    Returns:
        A runtime whose ``load`` has not run yet.
    """
    if kind == "onnx":
        from modelloop.serving.runtimes.onnx import OnnxRuntime

        intra = (
            config.intra_op_num_threads
            if config.intra_op_num_threads is not None
            else settings.intra_op_num_threads
        )
        sizing = "set in config"
        if intra is None:
            # Sized to the CPUs this process may use, shared over the workers: a pool sized
            # to the host only adds switching, and in a pod with a CPU limit, throttling.
            budget = cpu_budget()
            intra = max(1, budget.count // settings.workers)
            workers = f" / {settings.workers} workers" if settings.workers > 1 else ""
            sizing = f"{budget.describe()}{workers}"
        return OnnxRuntime(
            version_dir / ONNX_FILE,
            metadata,
            providers=config.onnx_providers if config.onnx_providers is not None else settings.onnx_providers,
            intra_op_num_threads=intra,
            inter_op_num_threads=(
                config.inter_op_num_threads
                if config.inter_op_num_threads is not None
                else settings.inter_op_num_threads
            ),
            allow_spinning=(
                config.allow_spinning if config.allow_spinning is not None else settings.allow_spinning
            ),
            sizing=sizing,
        )
    if kind == "python":
        from modelloop.serving.runtimes.python import PythonRuntime

        return PythonRuntime(version_dir, metadata)
    from modelloop.serving.runtimes.savedmodel import SavedModelRuntime

    return SavedModelRuntime(version_dir / SAVED_MODEL_DIR, metadata)


class Servable:
    """One AVAILABLE model version: its runtime, its batcher and its in-flight count.

    Attributes:
        name: Model name.
        version: Version number.
        runtime: The loaded runtime.
        batcher: The version's batcher; call its ``predict`` inside :meth:`use`.
        metadata: The runtime's metadata.
        refuse_nan: Whether requests with NaN or infinite float inputs are refused
            (``refuse_nan`` in the model's ``config.json``).
    """

    def __init__(self, runtime: Runtime, batcher: DynamicBatcher, *, refuse_nan: bool = False) -> None:
        self.runtime = runtime
        self.batcher = batcher
        self.refuse_nan = refuse_nan
        self.metadata = runtime.metadata
        self.name = runtime.metadata.name
        self.version = runtime.metadata.version
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def use(self) -> Servable:
        """Holds the version for one request (``with servable.use():``), so an unload waits for it.

        The hold is a count, so the servable is its own context manager: no generator or
        object is made per request.
        """
        return self

    def __enter__(self) -> Servable:
        self._inflight += 1
        self._idle.clear()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._inflight -= 1
        if self._inflight == 0:
            self._idle.set()

    @property
    def idle(self) -> bool:
        """Whether no request holds the version now."""
        return self._inflight == 0

    async def wait_idle(self) -> None:
        """Returns once no request holds the version."""
        await self._idle.wait()
