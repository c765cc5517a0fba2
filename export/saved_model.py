"""SavedModel export through Keras 3's ``ExportArchive``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SIGNATURE_NAME = "serving_default"


def export_saved_model(model: Any, path: Path, *, input_name: str, output_name: str, n_features: int) -> None:
    """Writes ``model`` as a SavedModel with one ``serving_default`` signature.

    The signature takes ``input_name`` (float32 ``[None, n_features]``) and returns a
    dict with the single key ``output_name``, so TF Serving clients see the spec's
    names whatever the Keras layers are called.

    Args:
        model: A built Keras model.
        path: Directory to create.
        input_name: Signature input name.
        output_name: Signature output name.
        n_features: Width of the input.
    """
    import keras
    import tensorflow as tf

    spec = tf.TensorSpec([None, n_features], tf.float32, name=input_name)

    def serve(features: tf.Tensor) -> dict[str, tf.Tensor]:
        return {output_name: tf.cast(model(features, training=False), tf.float32)}

    archive = keras.export.ExportArchive()
    archive.track(model)
    # The endpoint argument name becomes the signature's input key.
    fn = tf.function(serve, input_signature=[spec], autograph=False)
    archive.add_endpoint(SIGNATURE_NAME, fn)
    archive.write_out(str(path), verbose=False)


def load_signature(path: Path) -> Any:
    """Loads a SavedModel and returns its ``serving_default`` concrete function."""
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))
    # Keep the loaded object alive with the function: signatures reference its variables.
    fn = loaded.signatures[SIGNATURE_NAME]
    fn._modelloop_owner = loaded
    return fn
