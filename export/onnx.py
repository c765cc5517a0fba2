"""ONNX export of a SavedModel signature with tf2onnx."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

from modelloop.export.saved_model import SIGNATURE_NAME

MIN_OPSET = 17
BATCH_DIM = "batch"


def export_onnx(saved_model_dir: Path, path: Path, *, opset: int = MIN_OPSET) -> None:
    """Converts the ``serving_default`` signature of a SavedModel to ONNX.

    The SavedModel path (rather than ``from_function`` on the live Keras model) freezes
    captured constants such as a ``Normalization`` layer's mean and variance into the
    graph; converting the function directly turns them into extra graph inputs. Input
    and output names stay the signature's, and the first dimension of every input and
    output is the symbolic ``batch``.

    Args:
        saved_model_dir: SavedModel written by :func:`export_saved_model`.
        path: The ``.onnx`` file to write.
        opset: ONNX opset. Defaults to 17.

    Raises:
        ValueError: ``opset`` is below 17.
    """
    if opset < MIN_OPSET:
        raise ValueError(f"opset must be at least {MIN_OPSET}, got {opset}")
    import onnx
    import tf2onnx
    from tf2onnx import tf_loader

    # tf2onnx logs every optimiser pass at INFO and prints TF1 deprecation notes.
    logging.getLogger("tf2onnx").setLevel(logging.WARNING)
    with contextlib.redirect_stdout(io.StringIO()):
        graph_def, inputs, outputs, _tables, renames = tf_loader.from_saved_model(
            str(saved_model_dir),
            None,
            None,
            tag="serve",
            signatures=[SIGNATURE_NAME],
            return_initialized_tables=True,
            return_tensors_to_rename=True,
        )
        model_proto, _ = tf2onnx.convert.from_graph_def(
            graph_def, input_names=inputs, output_names=outputs, opset=opset, tensors_to_rename=renames
        )
    for value in [*model_proto.graph.input, *model_proto.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = BATCH_DIM
    model_proto.producer_name = "modelloop"
    onnx.checker.check_model(model_proto)
    onnx.save(model_proto, str(path))
