"""Builds the gRPC server: both TF Serving services, the OIP service, health and reflection.

The composition root calls :func:`create_grpc_server`, then :func:`bind_grpc_server`,
then ``await server.start()``; stopping and draining are its business too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from modelloop.serving.grpc.servicers import (
    GRPCInferenceServiceServicer,
    HealthServicer,
    ModelServiceServicer,
    PredictionServiceServicer,
    serialize_answer,
)
from modelloop.serving.protos import grpc_service_pb2, grpc_service_pb2_grpc
from modelloop.serving.protos.tfserving import tensorflow_serving_apis_model_service_pb2 as model_service_pb2
from modelloop.serving.protos.tfserving import (
    tensorflow_serving_apis_model_service_pb2_grpc as model_service_pb2_grpc,
)
from modelloop.serving.protos.tfserving import (
    tensorflow_serving_apis_prediction_service_pb2 as prediction_service_pb2,
)
from modelloop.serving.protos.tfserving import (
    tensorflow_serving_apis_prediction_service_pb2_grpc as prediction_service_pb2_grpc,
)

if TYPE_CHECKING:
    from modelloop.serving.dataplane import DataPlane
    from modelloop.serving.settings import ServingSettings

PREDICTION_SERVICE = prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"].full_name
MODEL_SERVICE = model_service_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name
INFERENCE_SERVICE = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


def create_grpc_server(
    dataplane: DataPlane, settings: ServingSettings, *, reuse_port: bool = False
) -> grpc.aio.Server:
    """Creates the gRPC server, unstarted and unbound.

    It serves ``tensorflow.serving.PredictionService``, ``tensorflow.serving.ModelService``,
    ``inference.GRPCInferenceService``, ``grpc.health.v1.Health`` and server reflection
    for all of them. Call it from inside the running event loop (grpc.aio binds the
    server to the current loop).

    Args:
        dataplane: The data plane every handler calls.
        settings: Server settings; reads ``grpc_max_message_bytes`` (both directions)
            and ``admin_token`` (for the OIP repository load/unload RPCs).
        reuse_port: Share the port with the other workers of this server
            (``SO_REUSEPORT``). Defaults to False.

    Returns:
        The server; bind it with :func:`bind_grpc_server`, then ``await server.start()``.

    Example:

    ```python
    server = create_grpc_server(dataplane, settings)
    port = bind_grpc_server(server, settings.host, settings.grpc_port)
    await server.start()
    ```
    """
    limit = int(settings.grpc_max_message_bytes)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            # grpc sets SO_REUSEPORT by default, which lets a second server silently share
            # a fixed port with the first; we want "address in use" instead, except among
            # the workers of one server (whose supervisor holds the port).
            ("grpc.so_reuseport", 1 if reuse_port else 0),
        ]
    )
    admin_token = settings.admin_token.get_secret_value() if settings.admin_token is not None else None
    answers = _AnswerBytes(server, {"Predict", "ModelInfer"})
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionServiceServicer(dataplane), answers
    )
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServiceServicer(dataplane), server)
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        GRPCInferenceServiceServicer(dataplane, admin_token), answers
    )
    services = (PREDICTION_SERVICE, MODEL_SERVICE, INFERENCE_SERVICE)
    health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(dataplane, services), server)
    reflection.enable_server_reflection((*services, HEALTH_SERVICE, reflection.SERVICE_NAME), server)
    return server


class _AnswerBytes:
    """Registers a generated service on ``server`` with ``methods`` answering wire bytes.

    The generated ``add_*_to_server`` functions serialize every answer with the
    message's ``SerializeToString``; Predict and ModelInfer answer bytes written by
    :mod:`~modelloop.serving.codecs.wire` (a message off its fast path), so their
    handlers get :func:`~.servicers.serialize_answer` instead. Everything else about the
    handlers (the servicer method, the request parser) is the generated one.

    Args:
        server: The server to register on.
        methods: The method names whose answers may be bytes.
    """

    def __init__(self, server: grpc.aio.Server, methods: set[str]) -> None:
        self._server = server
        self._methods = methods
        self._handlers: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    def add_generic_rpc_handlers(self, handlers: tuple[grpc.GenericRpcHandler, ...]) -> None:
        """The generic handler is the same table again: registered below, by method."""

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        """Registers the service's handlers, with bytes answers for the chosen methods."""
        adapted = {
            name: handler._replace(response_serializer=serialize_answer)  # type: ignore[attr-defined]
            if name in self._methods
            else handler
            for name, handler in handlers.items()
        }
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, adapted),))
        self._server.add_registered_method_handlers(service, adapted)


def bind_grpc_server(
    server: grpc.aio.Server, host: str, port: int, credentials: grpc.ServerCredentials | None = None
) -> int:
    """Binds a listening port and returns the port actually bound.

    Args:
        server: A server from :func:`create_grpc_server`, not yet started.
        host: Interface to listen on (``127.0.0.1``, ``0.0.0.0``, ``::1``).
        port: Port number; 0 picks a free one.
        credentials: TLS credentials (``grpc.ssl_server_credentials``); None binds
            plaintext. Defaults to None.

    Returns:
        The bound port (the picked one when ``port`` is 0).

    Raises:
        OSError: The address cannot be bound (in use, bad host).
    """
    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    try:
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
    except RuntimeError as error:
        raise OSError(f"cannot bind gRPC server to {address}: {error}") from error
    if bound == 0:
        raise OSError(f"cannot bind gRPC server to {address}")
    return bound


def server_credentials(settings: ServingSettings) -> grpc.ServerCredentials | None:
    """TLS credentials from ``tls_cert_file`` and ``tls_key_file``, or None for plaintext.

    Raises:
        OSError: A file cannot be read.
    """
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    key, cert = settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes()
    return grpc.ssl_server_credentials([(key, cert)])
