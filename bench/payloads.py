"""Request bodies the suite sends: JSON for REST, framed protobuf for gRPC.

Every load point sends one row per request, the same row for every protocol, so the
REST and gRPC numbers and their ceilings compare like with like.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import orjson

DIGITS_FEATURES = 64
HEAVY_FEATURES = 784


def sample_row(features: int, seed: int = 0) -> np.ndarray:
    """One float32 row of ``features`` values in 0..16 (the digits pixel range)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 17, size=(1, features)).astype(np.float32)


def tfserving_json(input_name: str, row: np.ndarray) -> bytes:
    """A TF Serving ``:predict`` body in the row format (``instances``)."""
    del input_name  # one-input models take bare rows in the row format
    return orjson.dumps({"instances": row.tolist()})


def v2_json(input_name: str, row: np.ndarray) -> bytes:
    """An OIP V2 REST infer body with one FP32 tensor."""
    return orjson.dumps(
        {
            "inputs": [
                {
                    "name": input_name,
                    "shape": list(row.shape),
                    "datatype": "FP32",
                    "data": row.ravel().tolist(),
                }
            ]
        }
    )


def grpc_frame(message: bytes) -> bytes:
    """Prefixes a serialized message with gRPC's 5-byte length prefix (uncompressed)."""
    return struct.pack(">BI", 0, len(message)) + message


def tfserving_predict(model: str, input_name: str, row: np.ndarray) -> bytes:
    """A serialized ``tensorflow.serving.PredictRequest`` with the row as ``tensor_content``.

    ``tensor_content`` is what ``tf.make_tensor_proto`` produces, i.e. what TF Serving
    clients send.
    """
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = "serving_default"
    tensor = tensor_pb2.TensorProto(
        dtype=types_pb2.DT_FLOAT,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in row.shape]
        ),
        tensor_content=np.ascontiguousarray(row, dtype="<f4").tobytes(),
    )
    request.inputs[input_name].CopyFrom(tensor)
    return request.SerializeToString()


def v2_infer(model: str, input_name: str, row: np.ndarray) -> bytes:
    """A serialized OIP ``ModelInferRequest`` with the row in ``raw_input_contents``.

    ``raw_input_contents`` is what tritonclient's gRPC client sends.
    """
    from modelloop.serving.protos import grpc_service_pb2 as pb

    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add()
    tensor.name = input_name
    tensor.datatype = "FP32"
    tensor.shape.extend(row.shape)
    request.raw_input_contents.append(np.ascontiguousarray(row, dtype="<f4").tobytes())
    return request.SerializeToString()


def write_bodies(directory: Path, model: str, input_name: str, row: np.ndarray) -> dict[str, Path]:
    """Writes the four bodies of one model and returns their paths by protocol.

    Returns:
        ``{"tfserving_rest": ..., "v2_rest": ..., "tfserving_grpc": ..., "v2_grpc": ...}``;
        the gRPC files are framed, ready for ``h2load -d``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    bodies = {
        "tfserving_rest": tfserving_json(input_name, row),
        "v2_rest": v2_json(input_name, row),
        "tfserving_grpc": grpc_frame(tfserving_predict(model, input_name, row)),
        "v2_grpc": grpc_frame(v2_infer(model, input_name, row)),
    }
    paths = {}
    for protocol, body in bodies.items():
        path = directory / f"{model}-{protocol}.bin"
        path.write_bytes(body)
        paths[protocol] = path
    return paths
