"""ONNX Runtime: the default runtime when a version has ``model.onnx``."""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from modelloop.serving.runtime import Runtime
from modelloop.serving.types import ModelMetadata

logger = logging.getLogger(__name__)

PLATFORM = "onnxruntime_onnx"
# Fastest first; ONNX Runtime runs each node on the first provider that supports it.
DEFAULT_PROVIDER_ORDER: tuple[str, ...] = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)
_GPU_PROVIDERS = frozenset({"TensorrtExecutionProvider", "CUDAExecutionProvider"})


def has_nvidia_driver() -> bool:
    """Whether the NVIDIA driver library loads, i.e. whether a GPU provider could work.

    ``onnxruntime-gpu`` lists CUDA and TensorRT as available even on machines without a
    GPU, then prints errors while falling back; asking first keeps CPU hosts quiet.
    """
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def choose_providers(
    available: Sequence[str], requested: Sequence[str] | None = None, *, gpu: bool = True
) -> list[str]:
    """The execution providers to ask ONNX Runtime for, in preference order.

    A pure function, so it is tested with made-up provider lists.

    Args:
        available: What ``onnxruntime.get_available_providers()`` reports.
        requested: Providers from config, in preference order. Defaults to TensorRT,
            CUDA, CPU.
        gpu: Whether a GPU driver is present. Without one, the GPU providers are left out
            of the default order (an explicit ``requested`` list is kept as it is).
            Defaults to True.

    Returns:
        The requested providers that are available, in the requested order.

    Raises:
        ValueError: None of the requested providers is available.

    Example:

    >>> choose_providers(["CUDAExecutionProvider", "CPUExecutionProvider"])
    ['CUDAExecutionProvider', 'CPUExecutionProvider']
    """
    if requested is None:
        wanted = [p for p in DEFAULT_PROVIDER_ORDER if gpu or p not in _GPU_PROVIDERS]
    else:
        wanted = list(requested)
    present = set(available)
    chosen = [p for p in dict.fromkeys(wanted) if p in present]
    if not chosen:
        raise ValueError(
            f"none of the ONNX Runtime providers {wanted} is available; available: {list(available)}"
        )
    return chosen


def session_options(
    intra_op_num_threads: int | None, inter_op_num_threads: int | None = None, allow_spinning: bool = False
) -> Any:
    """ONNX Runtime session options with the given thread pools and spinning policy.

    An explicit intra-op thread count also keeps ONNX Runtime from pinning its threads:
    with its default (0) it starts one thread per physical core of the host and pins each
    to a core of its choosing, escaping the process's CPU affinity.

    Args:
        intra_op_num_threads: Intra-op threads; None or 0 leaves ONNX Runtime's default.
        inter_op_num_threads: Inter-op threads; None or 0 leaves ONNX Runtime's default.
            Defaults to None.
        allow_spinning: Whether idle pool threads spin. Defaults to False.

    Returns:
        An ``onnxruntime.SessionOptions``.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    # Provider fallbacks are reported by the runtime, once, in our own words.
    options.log_severity_level = 3
    if intra_op_num_threads:
        options.intra_op_num_threads = intra_op_num_threads
    if inter_op_num_threads:
        options.inter_op_num_threads = inter_op_num_threads
    spin = "1" if allow_spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spin)
    options.add_session_config_entry("session.inter_op.allow_spinning", spin)
    return options


class OnnxRuntime(Runtime):
    """Runs ``model.onnx`` with an ONNX Runtime ``InferenceSession``.

    Args:
        path: The ``model.onnx`` file.
        metadata: The version's metadata; its input and output names must exist in the graph.
        providers: Providers in preference order. Defaults to TensorRT, CUDA, CPU, filtered
            by what this ONNX Runtime build offers.
        intra_op_num_threads: Threads inside one operator; 0 = ONNX Runtime's own default
            (one per physical core of the host, pinned to cores of its choosing). Defaults
            to None: left to ONNX Runtime too, but the registry always passes a number sized
            to the process (:func:`~modelloop.serving.servable.create_runtime`).
        inter_op_num_threads: Threads across operators (parallel execution mode only).
            Defaults to ONNX Runtime's choice.
        allow_spinning: Let idle pool threads spin instead of sleeping: a little lower
            latency on dedicated cores, CPU burned (and cgroup quota throttled) otherwise.
            Defaults to False.
        sizing: How the thread count was chosen, for the load log line and the model's
            config. Defaults to "".

    Example:

    ```python
    runtime = OnnxRuntime(version_dir / "model.onnx", metadata, providers=["CPUExecutionProvider"])
    runtime.load()
    runtime.predict({"pixels": np.zeros((1, 64), np.float32)})["probabilities"].shape  # (1, 10)
    ```
    """

    def __init__(
        self,
        path: Path,
        metadata: ModelMetadata,
        *,
        providers: Sequence[str] | None = None,
        intra_op_num_threads: int | None = None,
        inter_op_num_threads: int | None = None,
        allow_spinning: bool = False,
        sizing: str = "",
    ) -> None:
        super().__init__(metadata)
        self.path = Path(path)
        self.requested_providers = None if providers is None else list(providers)
        self.intra_op_num_threads = intra_op_num_threads
        self.inter_op_num_threads = inter_op_num_threads
        self.allow_spinning = allow_spinning
        self.sizing = sizing
        self._session: Any = None
        self._output_names: list[str] = [t.name for t in metadata.outputs]

    def load(self) -> None:
        """Creates the session and checks the graph against the metadata.

        Raises:
            FileNotFoundError: ``model.onnx`` is missing.
            ValueError: No requested provider is available, or the graph's inputs or
                outputs do not match the metadata.
            onnxruntime.capi.onnxruntime_pybind11_state.Fail: A corrupt model file.
        """
        import onnxruntime as ort

        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} does not exist")
        providers = choose_providers(
            ort.get_available_providers(),
            self.requested_providers,
            gpu=self.requested_providers is not None or has_nvidia_driver(),
        )
        options = session_options(self.intra_op_num_threads, self.inter_op_num_threads, self.allow_spinning)
        session = ort.InferenceSession(str(self.path), sess_options=options, providers=providers)
        used = list(session.get_providers())
        name, version = self.metadata.name, self.metadata.version
        self.parameters = self._describe(used)
        logger.info(
            "model %s version %s: ONNX Runtime providers %s, %s",
            name,
            version,
            used,
            ", ".join(f"{k} {v}" for k, v in self.parameters.items() if k != "providers"),
        )
        missing = [p for p in providers if p in _GPU_PROVIDERS and p not in used]
        if missing:
            # ONNX Runtime drops a provider whose libraries (CUDA, cuDNN, TensorRT) fail to load
            # and carries on without saying so through Python; make it visible.
            logger.warning(
                "model %s version %s: requested providers %s fell back to %s "
                "(missing GPU libraries or device)",
                name,
                version,
                missing,
                used,
            )
        graph_inputs = {i.name for i in session.get_inputs()}
        graph_outputs = {o.name for o in session.get_outputs()}
        for spec in self.metadata.inputs:
            if spec.name not in graph_inputs:
                raise ValueError(
                    f"model.json names input {spec.name!r}, the ONNX graph has {sorted(graph_inputs)}"
                )
        for spec in self.metadata.outputs:
            if spec.name not in graph_outputs:
                raise ValueError(
                    f"model.json names output {spec.name!r}, the ONNX graph has {sorted(graph_outputs)}"
                )
        self._session = session
        self.providers = used

    def _describe(self, providers: list[str]) -> dict[str, str]:
        intra = self.intra_op_num_threads
        parameters = {
            "providers": ",".join(providers),
            "intra_op_num_threads": "0 (ONNX Runtime default)" if not intra else str(intra),
            "inter_op_num_threads": str(self.inter_op_num_threads or 0),
            "allow_spinning": "true" if self.allow_spinning else "false",
        }
        if self.sizing:
            parameters["thread_sizing"] = self.sizing
        return parameters

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Runs the session; see :meth:`Runtime.predict`."""
        session = self._session
        if session is None:
            raise RuntimeError(f"model {self.metadata.name} version {self.metadata.version} is not loaded")
        results = session.run(self._output_names, inputs)
        return dict(zip(self._output_names, results, strict=True))

    def unload(self) -> None:
        """Drops the session; ONNX Runtime frees it when the last reference goes."""
        self._session = None
