"""The gRPC servicers: thin translators between protobuf messages and the data plane.

Predict and ModelInfer wrap their message in a decoder and call
:meth:`~modelloop.serving.dataplane.DataPlane.handle`, the one inference path; the other
methods call the data plane's lookups. Every method wears
:func:`~modelloop.serving.grpc.errors.translate_errors`, the one mapping of errors to
statuses. No request logic lives here: resolving versions, choosing request ids,
validating inputs, batching and metrics are the data plane's.

Request ids: a client's ``x-request-id`` invocation metadata wins, then the OIP ``id``
field, else the data plane makes one. Every Predict and ModelInfer call, answered or
failed, sends the id back as ``x-request-id`` trailing metadata. Trailing, not initial:
grpc.aio sends custom initial metadata as a batch of its own, a round through gRPC's
completion queue and the poller thread per call (about a tenth of a Predict's CPU time
here), while trailing metadata travels with the status in the call's last batch.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelloop.serving import tracing
from modelloop.serving.codecs import tensor_proto, v2_grpc, wire
from modelloop.serving.errors import InvalidInput, Unimplemented
from modelloop.serving.grpc.errors import REQUEST_ID_KEY, translate_errors
from modelloop.serving.protos import grpc_service_pb2 as pb
from modelloop.serving.protos import grpc_service_pb2_grpc as pb_grpc
from modelloop.serving.protos.tfserving import (
    tensorflow_serving_apis_classification_pb2 as classification_pb2,
)
from modelloop.serving.protos.tfserving import (
    tensorflow_serving_apis_get_model_metadata_pb2 as get_model_metadata_pb2,
)
from modelloop.serving.protos.tfserving import (
    tensorflow_serving_apis_get_model_status_pb2 as get_model_status_pb2,
)
from modelloop.serving.protos.tfserving import tensorflow_serving_apis_inference_pb2 as inference_pb2
from modelloop.serving.protos.tfserving import (
    tensorflow_serving_apis_model_management_pb2 as model_management_pb2,
)
from modelloop.serving.protos.tfserving import (
    tensorflow_serving_apis_model_service_pb2_grpc as model_service_pb2_grpc,
)
from modelloop.serving.protos.tfserving import tensorflow_serving_apis_predict_pb2 as predict_pb2
from modelloop.serving.protos.tfserving import (
    tensorflow_serving_apis_prediction_service_pb2_grpc as prediction_service_pb2_grpc,
)
from modelloop.serving.protos.tfserving import tensorflow_serving_apis_regression_pb2 as regression_pb2
from modelloop.serving.repository import refuse_load_parameters
from modelloop.serving.shared_memory import CUDA_UNAVAILABLE, SharedMemoryUnavailable
from modelloop.serving.types import (
    InferRequest,
    InferResponse,
    ModelMetadata,
    ModelState,
    Protocol,
    parse_version,
)
from modelloop.tokens import authorize_admin

if TYPE_CHECKING:
    from modelloop.serving.dataplane import DataPlane
    from modelloop.serving.shared_memory import SharedMemoryRef, SystemSharedMemory


def request_id_of(context: grpc.aio.ServicerContext) -> str | None:
    """The client's ``x-request-id`` invocation metadata, or None."""
    for key, value in context.invocation_metadata() or ():
        if key.lower() == REQUEST_ID_KEY and isinstance(value, str):
            return value
    return None


class PredictDecoder:
    """A ``PredictRequest``, for :meth:`DataPlane.handle`.

    Args:
        message: The request message.
    """

    protocol = Protocol.TFSERVING_GRPC
    __slots__ = ("message",)

    def __init__(self, message: predict_pb2.PredictRequest) -> None:
        self.message = message

    def target(self) -> tuple[str, str | None, str | None]:
        """The model spec's name, version and label."""
        return tensor_proto.model_spec_target(self.message.model_spec)

    async def read(self) -> None:
        """Nothing to receive: grpc delivered the whole message."""

    def decode(self, metadata: ModelMetadata) -> InferRequest:
        """The inputs (``TensorProto``), ``output_filter`` and signature name."""
        return tensor_proto.decode_predict_request(self.message)


class ModelInferDecoder:
    """A ``ModelInferRequest``, for :meth:`DataPlane.handle`.

    Args:
        message: The request message.
    """

    protocol = Protocol.V2_GRPC
    __slots__ = ("message", "shared_memory")

    def __init__(
        self, message: pb.ModelInferRequest, shared_memory: SystemSharedMemory | None = None
    ) -> None:
        self.message = message
        self.shared_memory = shared_memory

    def target(self) -> tuple[str, str | None, str | None]:
        """The model name and version (the OIP has no labels)."""
        return _require_name(self.message.model_name, "model_name"), self.message.model_version or None, None

    async def read(self) -> None:
        """Nothing to receive: grpc delivered the whole message."""

    def decode(self, metadata: ModelMetadata) -> InferRequest:
        """The inputs (typed or raw contents), wanted outputs, parameters and ``id``."""
        return v2_grpc.decode_infer_request(self.message, shared_memory=self.shared_memory)


PREDICT_METHOD = "tensorflow.serving.PredictionService/Predict"
MODEL_INFER_METHOD = "inference.GRPCInferenceService/ModelInfer"


@contextlib.contextmanager
def traced_rpc(method: str, protocol: Protocol, context: grpc.aio.ServicerContext) -> Iterator[None]:
    """The request span of a Predict or ModelInfer call (tracing on).

    Its parent is the call's ``traceparent`` invocation metadata, when the client sent one.

    Args:
        method: ``package.Service/Method``, the span name.
        protocol: The front end.
        context: The call's context (its invocation metadata).
    """
    metadata = context.invocation_metadata()
    service, _, name = method.partition("/")
    attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
    traceparent = tracing.metadata_value(metadata, tracing.TRACEPARENT)
    tracestate = tracing.metadata_value(metadata, tracing.TRACESTATE)
    with tracing.request_span(method, protocol, traceparent, tracestate, attributes):
        yield


def _predict_answer(response: InferResponse, signature: str) -> bytes | predict_pb2.PredictResponse:
    """The Predict answer: wire bytes for numeric outputs, else the message (same content)."""
    data = wire.encode_predict_bytes(response, signature)
    return data if data is not None else tensor_proto.encode_predict_response(response, signature)


def _infer_answer(
    response: InferResponse,
    request_id: str | None,
    shared_memory: SystemSharedMemory,
    shm_outputs: Mapping[str, SharedMemoryRef] | None,
) -> bytes | pb.ModelInferResponse:
    """The ModelInfer answer: wire bytes on the fast path, else the message (same content)."""
    if not shm_outputs:
        data = wire.encode_infer_bytes(response, request_id)
        if data is not None:
            return data
    return v2_grpc.encode_infer_response(
        response, request_id, shared_memory=shared_memory, shared_memory_outputs=shm_outputs
    )


def serialize_answer(answer: object) -> bytes:
    """The response serializer of Predict and ModelInfer: wire bytes pass as they are."""
    if type(answer) is bytes:
        return answer
    return answer.SerializeToString()  # type: ignore[attr-defined]


def _id_metadata(request_id: str) -> tuple[tuple[str, str], ...]:
    return ((REQUEST_ID_KEY, request_id),) if request_id else ()


class PredictionServiceServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """``tensorflow.serving.PredictionService`` over the data plane.

    Args:
        dataplane: The data plane.
    """

    def __init__(self, dataplane: DataPlane) -> None:
        self._dataplane = dataplane

    @translate_errors
    async def Predict(
        self, request: predict_pb2.PredictRequest, context: grpc.aio.ServicerContext
    ) -> bytes | predict_pb2.PredictResponse:
        """Runs one prediction; ``output_filter`` selects outputs.

        With tracing on, the call runs inside its request span (parent: the
        ``traceparent`` metadata).
        """
        if tracing.TRACER is not None:
            with traced_rpc(PREDICT_METHOD, Protocol.TFSERVING_GRPC, context):
                return await self._predict(request, context)
        return await self._predict(request, context)

    async def _predict(
        self, request: predict_pb2.PredictRequest, context: grpc.aio.ServicerContext
    ) -> bytes | predict_pb2.PredictResponse:
        response = await self._dataplane.handle(PredictDecoder(request), client_id=request_id_of(context))
        signature = request.model_spec.signature_name or "serving_default"
        if tracing.TRACER is not None:
            with tracing.encode_span(Protocol.TFSERVING_GRPC, response.model, response.version):
                encoded = _predict_answer(response, signature)
        else:
            encoded = _predict_answer(response, signature)
        context.set_trailing_metadata(_id_metadata(response.id))
        return encoded

    @translate_errors
    async def GetModelMetadata(
        self, request: get_model_metadata_pb2.GetModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        """The resolved version's ``SignatureDefMap``, packed under ``signature_def``."""
        name, version, label, _ = tensor_proto.decode_model_spec(request.model_spec)
        tensor_proto.check_metadata_fields(request.metadata_field)
        return tensor_proto.encode_model_metadata_response(self._dataplane.metadata(name, version, label))

    @translate_errors
    async def Classify(
        self, request: classification_pb2.ClassificationRequest, context: grpc.aio.ServicerContext
    ) -> classification_pb2.ClassificationResponse:
        """Not implemented: answers UNIMPLEMENTED."""
        raise _not_implemented("Classify")

    @translate_errors
    async def Regress(
        self, request: regression_pb2.RegressionRequest, context: grpc.aio.ServicerContext
    ) -> regression_pb2.RegressionResponse:
        """Not implemented: answers UNIMPLEMENTED."""
        raise _not_implemented("Regress")

    @translate_errors
    async def MultiInference(
        self, request: inference_pb2.MultiInferenceRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.MultiInferenceResponse:
        """Not implemented: answers UNIMPLEMENTED."""
        raise _not_implemented("MultiInference")


def _not_implemented(method: str) -> Unimplemented:
    return Unimplemented(
        f"{method} is not implemented by modelloop: models take tensors, not tf.Example; "
        "call Predict (signature 'serving_default') instead"
    )


class ModelServiceServicer(model_service_pb2_grpc.ModelServiceServicer):
    """``tensorflow.serving.ModelService`` over the data plane.

    Args:
        dataplane: The data plane.
    """

    def __init__(self, dataplane: DataPlane) -> None:
        self._dataplane = dataplane

    @translate_errors
    async def GetModelStatus(
        self, request: get_model_status_pb2.GetModelStatusRequest, context: grpc.aio.ServicerContext
    ) -> get_model_status_pb2.GetModelStatusResponse:
        """The state of every version, or of the one the spec names."""
        name, version, label, _ = tensor_proto.decode_model_spec(request.model_spec)
        return tensor_proto.encode_model_status_response(self._dataplane.model_status(name, version, label))

    @translate_errors
    async def HandleReloadConfigRequest(
        self, request: model_management_pb2.ReloadConfigRequest, context: grpc.aio.ServicerContext
    ) -> model_management_pb2.ReloadConfigResponse:
        """Not implemented: the repository directory is the configuration."""
        raise Unimplemented(
            "HandleReloadConfigRequest is not implemented: modelloop serves what the repository "
            "directory holds; publish or remove version directories, or use the OIP repository API"
        )


def _require_name(name: str, field: str = "name") -> str:
    if not name:
        raise InvalidInput(f"{field} is required")
    return name


class GRPCInferenceServiceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` (Open Inference Protocol) over the data plane.

    Args:
        dataplane: The data plane.
        admin_token: Bearer token that RepositoryIndex, RepositoryModelLoad and
            RepositoryModelUnload require in the ``authorization`` metadata; None turns
            them off (PERMISSION_DENIED), as on REST. Defaults to None.
    """

    def __init__(self, dataplane: DataPlane, admin_token: str | None = None) -> None:
        self._dataplane = dataplane
        self._admin_token = admin_token

    @translate_errors
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        """Whether the server is live."""
        return pb.ServerLiveResponse(live=self._dataplane.live())

    @translate_errors
    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        """Whether every model is loaded and the server is not draining."""
        return pb.ServerReadyResponse(ready=self._dataplane.ready())

    @translate_errors
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        """Whether one model (version) is ready."""
        ready = self._dataplane.model_ready(_require_name(request.name), parse_version(request.version))
        return pb.ModelReadyResponse(ready=ready)

    @translate_errors
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        """Server name, version and extensions."""
        return v2_grpc.encode_server_metadata(self._dataplane.server_metadata())

    @translate_errors
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        """Platform, available versions, inputs and outputs of the resolved version."""
        name = _require_name(request.name)
        metadata = self._dataplane.metadata(name, parse_version(request.version))
        available = [s.version for s in self._dataplane.model_status(name) if s.state is ModelState.AVAILABLE]
        return v2_grpc.encode_model_metadata(metadata, available)

    @translate_errors
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> bytes | pb.ModelInferResponse:
        """Runs one inference; outputs come back in ``raw_output_contents``.

        With tracing on, the call runs inside its request span (parent: the
        ``traceparent`` metadata).
        """
        if tracing.TRACER is not None:
            with traced_rpc(MODEL_INFER_METHOD, Protocol.V2_GRPC, context):
                return await self._model_infer(request, context)
        return await self._model_infer(request, context)

    async def _model_infer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> bytes | pb.ModelInferResponse:
        shared_memory = self._dataplane.shared_memory
        response = await self._dataplane.handle(
            ModelInferDecoder(request, shared_memory), client_id=request_id_of(context)
        )
        # The OIP says the response echoes the request's own id, even when the
        # x-request-id header (used for monitoring) differs from it.
        shm_outputs = v2_grpc.requested_shared_memory(request) if request.outputs else None
        if tracing.TRACER is not None:
            with tracing.encode_span(Protocol.V2_GRPC, response.model, response.version):
                encoded = _infer_answer(response, request.id or None, shared_memory, shm_outputs)
        else:
            encoded = _infer_answer(response, request.id or None, shared_memory, shm_outputs)
        context.set_trailing_metadata(_id_metadata(response.id))
        return encoded

    @translate_errors
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        """Triton's model configuration: name, platform, inputs, outputs and how it is served."""
        name = _require_name(request.name)
        return v2_grpc.encode_model_config(self._dataplane.model_config(name, parse_version(request.version)))

    @translate_errors
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        """Every model version in the repository with its state; needs the admin bearer token, as on REST."""
        self._authorize(context)
        return v2_grpc.encode_repository_index(self._dataplane.repository_index(), request.ready)

    @translate_errors
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        """Loads or reloads a model; needs the admin bearer token."""
        self._authorize(context)
        refuse_load_parameters(request.parameters.keys())
        await self._dataplane.load_model(_require_name(request.model_name, "model_name"))
        return pb.RepositoryModelLoadResponse()

    @translate_errors
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        """Unloads a model; needs the admin bearer token."""
        self._authorize(context)
        await self._dataplane.unload_model(_require_name(request.model_name, "model_name"))
        return pb.RepositoryModelUnloadResponse()

    @translate_errors
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        """Triton's statistics extension: every model (empty name), one model, or one version."""
        version = parse_version(request.version)
        if version is not None and not request.name:
            raise InvalidInput("a statistics request with a version must name the model")
        stats = self._dataplane.statistics(request.name or None, version)
        return v2_grpc.encode_model_statistics([s.as_dict() for s in stats])

    @translate_errors
    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryStatusResponse:
        """The registered system shared memory regions (all, or the one named); admin only."""
        self._authorize(context)
        response = pb.SystemSharedMemoryStatusResponse()
        for region in self._dataplane.shared_memory.status(request.name or None):
            response.regions[region["name"]].CopyFrom(
                pb.SystemSharedMemoryStatusResponse.RegionStatus(**region)
            )
        return response

    @translate_errors
    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryRegisterResponse:
        """Registers a region of a POSIX shared memory object; admin only."""
        self._authorize(context)
        self._dataplane.shared_memory.register(
            _require_name(request.name), request.key, offset=request.offset, byte_size=request.byte_size
        )
        return pb.SystemSharedMemoryRegisterResponse()

    @translate_errors
    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        """Unregisters one region (empty name: every region); admin only."""
        self._authorize(context)
        self._dataplane.shared_memory.unregister(request.name or None)
        return pb.SystemSharedMemoryUnregisterResponse()

    @translate_errors
    async def CudaSharedMemoryStatus(
        self, request: pb.CudaSharedMemoryStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.CudaSharedMemoryStatusResponse:
        """UNAVAILABLE: no CUDA shared memory on this server."""
        raise SharedMemoryUnavailable(CUDA_UNAVAILABLE)

    @translate_errors
    async def CudaSharedMemoryRegister(
        self, request: pb.CudaSharedMemoryRegisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.CudaSharedMemoryRegisterResponse:
        """UNAVAILABLE: no CUDA shared memory on this server."""
        raise SharedMemoryUnavailable(CUDA_UNAVAILABLE)

    @translate_errors
    async def CudaSharedMemoryUnregister(
        self, request: pb.CudaSharedMemoryUnregisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.CudaSharedMemoryUnregisterResponse:
        """UNAVAILABLE: no CUDA shared memory on this server."""
        raise SharedMemoryUnavailable(CUDA_UNAVAILABLE)

    def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        supplied: str | None = None
        for key, value in context.invocation_metadata() or ():
            if key.lower() == "authorization" and isinstance(value, str):
                supplied = value
        authorize_admin(supplied, self._admin_token)


class HealthServicer(health_pb2_grpc.HealthServicer):
    """``grpc.health.v1.Health`` that reads the data plane on every call.

    SERVING while ``dataplane.ready()`` (every model loaded, not draining), NOT_SERVING
    otherwise, for the overall server (``""``) and for each registered service name.
    Computing it per call, rather than pushing updates into grpc's stock servicer,
    means no background task and no state that can go stale during a drain.

    Args:
        dataplane: The data plane.
        services: Fully qualified service names that Check and Watch answer for.
        watch_interval_s: How often Watch re-reads the status. Defaults to 0.5.
    """

    def __init__(self, dataplane: DataPlane, services: Iterable[str], watch_interval_s: float = 0.5) -> None:
        self._dataplane = dataplane
        self._services = frozenset(services) | {""}
        self._watch_interval_s = watch_interval_s

    def _status(self) -> health_pb2.HealthCheckResponse.ServingStatus:
        serving = self._dataplane.ready() and not self._dataplane.draining
        return (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        """The status of the server or of one service; NOT_FOUND for an unknown service."""
        if request.service not in self._services:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=self._status())

    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthListResponse:
        """The status of every service."""
        status = self._status()
        return health_pb2.HealthListResponse(
            statuses={name: health_pb2.HealthCheckResponse(status=status) for name in self._services}
        )

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """Streams the status now and whenever it changes.

        The stream ends once the server is draining and NOT_SERVING has been sent, so
        an open Watch never holds a graceful shutdown for its whole grace period; the
        health-checking spec tells clients to reconnect with backoff after it ends.
        """
        if request.service not in self._services:
            # The spec: an unknown service gets SERVICE_UNKNOWN and the call stays open.
            yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            while not self._dataplane.draining:
                await asyncio.sleep(self._watch_interval_s)
            return
        last: int | None = None
        while True:
            status = self._status()
            if status != last:
                last = status
                yield health_pb2.HealthCheckResponse(status=status)
            # Re-check after the yield: draining may have begun while SERVING was in flight,
            # and the client must still see NOT_SERVING before the stream ends.
            if self._dataplane.draining and last == health_pb2.HealthCheckResponse.NOT_SERVING:
                return
            await asyncio.sleep(self._watch_interval_s)
