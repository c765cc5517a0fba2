"""The contract every runtime keeps.

A runtime wraps one model version in one framework. It is synchronous, takes and returns
``dict[str, np.ndarray]`` and knows no protocol; the batcher calls ``predict`` on its own
threads, so ``predict`` must be safe to call from several threads at once (ONNX Runtime
sessions and TensorFlow concrete functions are).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from modelloop.serving.types import ModelMetadata


class Runtime(ABC):
    """One loadable model version.

    Subclasses set ``metadata`` in their constructor and do the expensive work in
    ``load``, which the registry runs on a worker thread.

    Attributes:
        metadata: Name, version, platform and tensor specs of the model version.
        providers: The execution providers in use (ONNX Runtime); empty otherwise.
        parameters: How the loaded runtime is set up (providers, thread pools), as text;
            exposed in the model's config (Triton's ``parameters``). Empty until loaded.
        may_run_inline: Whether the batcher may run ``predict`` on the event loop when
            its calls are tiny. False for code the server does not own (a version's
            ``model.py``), which could block. Defaults to True.
    """

    metadata: ModelMetadata
    providers: list[str]
    parameters: dict[str, str]
    may_run_inline: bool = True

    def __init__(self, metadata: ModelMetadata) -> None:
        self.metadata = metadata
        self.providers = []
        self.parameters = {}

    @abstractmethod
    def load(self) -> None:
        """Loads the model; raises on a missing, corrupt or mismatching model."""

    @abstractmethod
    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Runs the model on validated inputs.

        Args:
            inputs: One array per model input, all with the same first (batch) dimension.

        Returns:
            One array per model output, in the metadata's output order.
        """

    def unload(self) -> None:  # noqa: B027 - an optional hook, not abstract
        """Frees the model's resources. Defaults to doing nothing."""
