"""TensorFlow SavedModel runtime: runs the ``serving_default`` signature."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from modelloop.serving.runtime import Runtime
from modelloop.serving.types import ModelMetadata

logger = logging.getLogger(__name__)

PLATFORM = "tensorflow_savedmodel"


class SavedModelRuntime(Runtime):
    """Runs a SavedModel's serving signature through TensorFlow.

    TensorFlow is imported inside :meth:`load`, so a server that only serves ONNX never
    pays for it. TensorFlow's thread pools are process-wide, so thread counts are not
    set per model here.

    Args:
        path: The ``saved_model`` directory.
        metadata: The version's metadata; its signature name, inputs and outputs must
            exist in the SavedModel.

    Example:

    ```python
    runtime = SavedModelRuntime(version_dir / "saved_model", metadata)
    runtime.load()
    runtime.predict({"pixels": np.zeros((1, 64), np.float32)})["probabilities"].shape  # (1, 10)
    ```
    """

    def __init__(self, path: Path, metadata: ModelMetadata) -> None:
        super().__init__(metadata)
        self.path = Path(path)
        self._loaded: Any = None
        self._fn: Any = None
        self._tf: Any = None

    def load(self) -> None:
        """Loads the SavedModel and checks its signature against the metadata.

        Raises:
            FileNotFoundError: The directory is missing.
            ValueError: The signature, an input or an output is missing.
        """
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path} does not exist")
        import tensorflow as tf

        loaded = tf.saved_model.load(str(self.path))
        signature = self.metadata.signature_name
        if signature not in loaded.signatures:
            raise ValueError(
                f"SavedModel has no signature {signature!r}; it has {sorted(loaded.signatures.keys())}"
            )
        fn = loaded.signatures[signature]
        _, kwargs = fn.structured_input_signature
        outputs = fn.structured_outputs
        for spec in self.metadata.inputs:
            if spec.name not in kwargs:
                raise ValueError(f"signature {signature!r} has inputs {sorted(kwargs)}, not {spec.name!r}")
        for spec in self.metadata.outputs:
            if spec.name not in outputs:
                raise ValueError(f"signature {signature!r} has outputs {sorted(outputs)}, not {spec.name!r}")
        # Keep the loaded object: the concrete function references its variables.
        self._loaded, self._fn, self._tf = loaded, fn, tf
        logger.info(
            "model %s version %s: TensorFlow SavedModel loaded", self.metadata.name, self.metadata.version
        )

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Calls the signature; see :meth:`Runtime.predict`."""
        fn, tf = self._fn, self._tf
        if fn is None:
            raise RuntimeError(f"model {self.metadata.name} version {self.metadata.version} is not loaded")
        results = fn(**{name: tf.constant(value) for name, value in inputs.items()})
        return {spec.name: results[spec.name].numpy() for spec in self.metadata.outputs}

    def unload(self) -> None:
        """Drops the references; TensorFlow frees the model when they are gone."""
        self._loaded = self._fn = self._tf = None
