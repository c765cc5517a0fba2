"""The gRPC ceiling: a grpc.aio server that parses the same request message and returns a constant.

``PredictionService/Predict`` parses a ``PredictRequest`` and ``GRPCInferenceService/
ModelInfer`` a ``ModelInferRequest``, each answering a prebuilt response: what grpc.aio
can do when the handler does nothing. Run it as ``python -m bench.reference_grpc``; it
prints ``gRPC listening on 127.0.0.1:PORT``.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import grpc
import numpy as np

from modelloop.serving.protos import grpc_service_pb2 as pb
from modelloop.serving.protos.tfserving import tensorflow_core_framework_tensor_pb2 as tensor_pb2
from modelloop.serving.protos.tfserving import tensorflow_core_framework_tensor_shape_pb2 as tensor_shape_pb2
from modelloop.serving.protos.tfserving import tensorflow_core_framework_types_pb2 as types_pb2
from modelloop.serving.protos.tfserving import tensorflow_serving_apis_predict_pb2 as predict_pb2

_OUTPUT = np.full((1, 10), 0.1, dtype="<f4")


def _predict_response() -> bytes:
    response = predict_pb2.PredictResponse()
    response.model_spec.name = "digits"
    response.outputs["probabilities"].CopyFrom(
        tensor_pb2.TensorProto(
            dtype=types_pb2.DT_FLOAT,
            tensor_shape=tensor_shape_pb2.TensorShapeProto(
                dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in _OUTPUT.shape]
            ),
            tensor_content=_OUTPUT.tobytes(),
        )
    )
    return response.SerializeToString()


def _infer_response() -> bytes:
    response = pb.ModelInferResponse(model_name="digits", model_version="1", id="0" * 32)
    out = response.outputs.add()
    out.name, out.datatype = "probabilities", "FP32"
    out.shape.extend(_OUTPUT.shape)
    response.raw_output_contents.append(_OUTPUT.tobytes())
    return response.SerializeToString()


def create_server() -> grpc.aio.Server:
    """A grpc.aio server with the two no-op unary methods (raw bytes out, parsed messages in)."""
    predict_bytes, infer_bytes = _predict_response(), _infer_response()

    async def predict(request: predict_pb2.PredictRequest, context: grpc.aio.ServicerContext) -> bytes:
        return predict_bytes

    async def infer(request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> bytes:
        return infer_bytes

    def identity(data: bytes) -> bytes:
        return data

    handlers = [
        grpc.method_handlers_generic_handler(
            "tensorflow.serving.PredictionService",
            {
                "Predict": grpc.unary_unary_rpc_method_handler(
                    predict,
                    request_deserializer=predict_pb2.PredictRequest.FromString,
                    response_serializer=identity,
                )
            },
        ),
        grpc.method_handlers_generic_handler(
            "inference.GRPCInferenceService",
            {
                "ModelInfer": grpc.unary_unary_rpc_method_handler(
                    infer, request_deserializer=pb.ModelInferRequest.FromString, response_serializer=identity
                )
            },
        ),
    ]
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers(handlers)
    return server


async def _serve() -> None:
    server = create_server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"gRPC listening on 127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    await server.stop(1)


def main() -> int:
    """Serves until SIGTERM."""
    asyncio.run(_serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
