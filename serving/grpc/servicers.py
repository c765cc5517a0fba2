"""The gRPC servicers: thin translators between protobuf messages and the data plane.

Each handler decodes (``codecs.tensor_proto`` / ``codecs.v2_grpc``), calls the data
plane, and encodes; errors carry a neutral code that ``grpc.errors`` maps to a status.
No request logic lives here: resolving versions, validating inputs against the model,
batching and metrics are the data plane's.

Request ids: a client's ``x-request-id`` invocation metadata wins, then the OIP ``id``
field, else the data plane makes one. Every Predict and ModelInfer response sends the
id back as ``x-request-id`` initial metadata; a failed call carries the client's id, if
it sent one, in its trailing metadata.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any
from typing import Protocol as TypingProtocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from modelloop.serving.codecs import tensor_proto, v2_grpc
from modelloop.serving.errors import (
    InvalidInput,
    ServingError,
    Unauthenticated,
    Unimplemented,
)
from modelloop.serving.grpc.errors import abort
from modelloop.serving.protos import grpc_service_pb2 as pb
from modelloop.serving.protos import grpc_service_pb2_grpc as pb_grpc
from modelloop.serving.types import (
    InferRequest,
    InferResponse,
    ModelMetadata,
    ModelState,
    Protocol,
    VersionStatus,
)

logger = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"
Metadata = tuple[tuple[str, str], ...]


class DataPlaneAPI(TypingProtocol):
    """The part of ``DataPlane`` (see ``serving/INTERFACES.md``) the gRPC edge calls."""

    draining: bool

    async def infer(self, request: InferRequest) -> InferResponse:
        """Runs one inference request."""
        ...

    def metadata(self, name: str, version: int | None = None, label: str | None = None) -> ModelMetadata:
        """Metadata of the resolved version."""
        ...

    def model_status(
        self, name: str, version: int | None = None, label: str | None = None
    ) -> list[VersionStatus]:
        """States of the model's versions."""
        ...

    def model_ready(self, name: str, version: int | None = None, label: str | None = None) -> bool:
        """Whether the model (version) can serve."""
        ...

    def live(self) -> bool:
        """Whether the server is live."""
        ...

    def ready(self) -> bool:
        """Whether every model is available and the server is not draining."""
        ...

    def server_metadata(self) -> dict[str, Any]:
        """``{"name", "version", "extensions"}``."""
        ...

    def repository_index(self) -> list[dict[str, Any]]:
        """``[{"name", "version", "state", "reason"}]``."""
        ...

    async def load_model(self, name: str) -> None:
        """Loads or reloads a model."""
        ...

    async def unload_model(self, name: str) -> None:
        """Unloads a model."""
        ...

    def observe_rejected(self, model: str, protocol: Protocol, code: object, seconds: float) -> None:
        """Counts a request that failed to decode."""
        ...


def request_id_of(context: grpc.aio.ServicerContext) -> str:
    """The client's ``x-request-id`` invocation metadata, or ``""``."""
    for key, value in context.invocation_metadata() or ():
        if key.lower() == REQUEST_ID_KEY and isinstance(value, str):
            return value
    return ""


def _id_metadata(request_id: str) -> Metadata:
    return ((REQUEST_ID_KEY, request_id),) if request_id else ()


@contextlib.asynccontextmanager
async def translating_errors(
    context: grpc.aio.ServicerContext, method: str, trailing_metadata: Metadata = ()
) -> AsyncIterator[None]:
    """Turns errors raised inside the block into a gRPC status.

    A :class:`ServingError` becomes its mapped status with its message. Anything else is
    a bug: it is logged with its traceback and the client gets INTERNAL, without the
    details, so a bad request can never take the server down or leak internals.

    Args:
        context: The call's context.
        method: The RPC name, for the log and the INTERNAL message.
        trailing_metadata: Sent with an error status (the request id). Defaults to ``()``.
    """
    try:
        yield
    except grpc.aio.AbortError:
        raise
    except ServingError as error:
        await abort(context, error, trailing_metadata)
    except Exception:
        logger.exception("unexpected error in gRPC %s", method)
        await abort(
            context, ServingError(f"internal error in {method}; see the server log"), trailing_metadata
        )


class PredictionServiceServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """``tensorflow.serving.PredictionService`` over the data plane.

    Args:
        dataplane: The data plane.
    """

    def __init__(self, dataplane: DataPlaneAPI) -> None:
        self._dataplane = dataplane

    async def Predict(
        self, request: predict_pb2.PredictRequest, context: grpc.aio.ServicerContext
    ) -> predict_pb2.PredictResponse:
        """Runs one prediction; ``output_filter`` selects outputs."""
        started = time.perf_counter()
        header_id = request_id_of(context)
        trailing = _id_metadata(header_id)
        async with translating_errors(context, "Predict", trailing):
            try:
                infer_request = tensor_proto.decode_predict_request(request, header_id)
            except ServingError as error:
                self._dataplane.observe_rejected(
                    request.model_spec.name,
                    Protocol.TFSERVING_GRPC,
                    error.code,
                    time.perf_counter() - started,
                )
                raise
            response = await self._dataplane.infer(infer_request)
            encoded = tensor_proto.encode_predict_response(
                response, infer_request.signature_name or "serving_default"
            )
        await context.send_initial_metadata(_id_metadata(response.id))
        return encoded

    async def GetModelMetadata(
        self, request: get_model_metadata_pb2.GetModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        """The resolved version's ``SignatureDefMap``, packed under ``signature_def``."""
        async with translating_errors(context, "GetModelMetadata"):
            name, version, label, _ = tensor_proto.decode_model_spec(request.model_spec)
            tensor_proto.check_metadata_fields(request.metadata_field)
            return tensor_proto.encode_model_metadata_response(self._dataplane.metadata(name, version, label))
        raise AssertionError("unreachable")  # pragma: no cover - the block returns or aborts

    async def Classify(
        self, request: classification_pb2.ClassificationRequest, context: grpc.aio.ServicerContext
    ) -> classification_pb2.ClassificationResponse:
        """Not implemented: answers UNIMPLEMENTED."""
        await abort(context, _not_implemented("Classify"))

    async def Regress(
        self, request: regression_pb2.RegressionRequest, context: grpc.aio.ServicerContext
    ) -> regression_pb2.RegressionResponse:
        """Not implemented: answers UNIMPLEMENTED."""
        await abort(context, _not_implemented("Regress"))

    async def MultiInference(
        self, request: inference_pb2.MultiInferenceRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.MultiInferenceResponse:
        """Not implemented: answers UNIMPLEMENTED."""
        await abort(context, _not_implemented("MultiInference"))


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

    def __init__(self, dataplane: DataPlaneAPI) -> None:
        self._dataplane = dataplane

    async def GetModelStatus(
        self, request: get_model_status_pb2.GetModelStatusRequest, context: grpc.aio.ServicerContext
    ) -> get_model_status_pb2.GetModelStatusResponse:
        """The state of every version, or of the one the spec names."""
        async with translating_errors(context, "GetModelStatus"):
            name, version, label, _ = tensor_proto.decode_model_spec(request.model_spec)
            return tensor_proto.encode_model_status_response(
                self._dataplane.model_status(name, version, label)
            )
        raise AssertionError("unreachable")  # pragma: no cover - the block returns or aborts

    async def HandleReloadConfigRequest(
        self, request: model_management_pb2.ReloadConfigRequest, context: grpc.aio.ServicerContext
    ) -> model_management_pb2.ReloadConfigResponse:
        """Not implemented: the repository directory is the configuration."""
        await abort(
            context,
            Unimplemented(
                "HandleReloadConfigRequest is not implemented: modelloop serves what the repository "
                "directory holds; publish or remove version directories, or use the OIP repository API"
            ),
        )


def _parse_version(text: str) -> int | None:
    if not text:
        return None
    if not text.isdigit():
        raise InvalidInput(f"version {text!r} is not an integer version")
    return int(text)


def _require_name(name: str, field: str = "name") -> str:
    if not name:
        raise InvalidInput(f"{field} is required")
    return name


class GRPCInferenceServiceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` (Open Inference Protocol) over the data plane.

    Args:
        dataplane: The data plane.
        admin_token: Bearer token that RepositoryModelLoad/Unload require in the
            ``authorization`` metadata; None turns them off (UNIMPLEMENTED), as the
            REST admin routes are off. Defaults to None.
    """

    def __init__(self, dataplane: DataPlaneAPI, admin_token: str | None = None) -> None:
        self._dataplane = dataplane
        self._admin_token = admin_token

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        """Whether the server is live."""
        return pb.ServerLiveResponse(live=self._dataplane.live())

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        """Whether every model is loaded and the server is not draining."""
        return pb.ServerReadyResponse(ready=self._dataplane.ready())

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        """Whether one model (version) is ready."""
        async with translating_errors(context, "ModelReady"):
            ready = self._dataplane.model_ready(_require_name(request.name), _parse_version(request.version))
            return pb.ModelReadyResponse(ready=ready)
        raise AssertionError("unreachable")  # pragma: no cover - the block returns or aborts

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        """Server name, version and extensions."""
        async with translating_errors(context, "ServerMetadata"):
            return v2_grpc.encode_server_metadata(self._dataplane.server_metadata())
        raise AssertionError("unreachable")  # pragma: no cover - the block returns or aborts

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        """Platform, available versions, inputs and outputs of the resolved version."""
        async with translating_errors(context, "ModelMetadata"):
            name = _require_name(request.name)
            metadata = self._dataplane.metadata(name, _parse_version(request.version))
            available = [
                s.version for s in self._dataplane.model_status(name) if s.state is ModelState.AVAILABLE
            ]
            return v2_grpc.encode_model_metadata(metadata, available)
        raise AssertionError("unreachable")  # pragma: no cover - the block returns or aborts

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        """Runs one inference; outputs come back in ``raw_output_contents``."""
        started = time.perf_counter()
        header_id = request_id_of(context)
        trailing = _id_metadata(header_id or request.id)
        async with translating_errors(context, "ModelInfer", trailing):
            try:
                infer_request = v2_grpc.decode_infer_request(request, header_id)
            except ServingError as error:
                self._dataplane.observe_rejected(
                    request.model_name, Protocol.V2_GRPC, error.code, time.perf_counter() - started
                )
                raise
            response = await self._dataplane.infer(infer_request)
            # The OIP says the response echoes the request's own id, even when the
            # x-request-id header (used for monitoring) differs from it.
            encoded = v2_grpc.encode_infer_response(response, request.id or None)
        await context.send_initial_metadata(_id_metadata(response.id))
        return encoded

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        """Triton's model configuration, reduced to name, platform, inputs and outputs."""
        async with translating_errors(context, "ModelConfig"):
            metadata = self._dataplane.metadata(_require_name(request.name), _parse_version(request.version))
            return v2_grpc.encode_model_config(metadata)
        raise AssertionError("unreachable")  # pragma: no cover - the block returns or aborts

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        """Every model version in the repository with its state."""
        async with translating_errors(context, "RepositoryIndex"):
            return v2_grpc.encode_repository_index(self._dataplane.repository_index(), request.ready)
        raise AssertionError("unreachable")  # pragma: no cover - the block returns or aborts

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        """Loads or reloads a model; needs the admin bearer token."""
        async with translating_errors(context, "RepositoryModelLoad"):
            self._authorize(context, "RepositoryModelLoad")
            await self._dataplane.load_model(_require_name(request.model_name, "model_name"))
            return pb.RepositoryModelLoadResponse()
        raise AssertionError("unreachable")  # pragma: no cover - the block returns or aborts

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        """Unloads a model; needs the admin bearer token."""
        async with translating_errors(context, "RepositoryModelUnload"):
            self._authorize(context, "RepositoryModelUnload")
            await self._dataplane.unload_model(_require_name(request.model_name, "model_name"))
            return pb.RepositoryModelUnloadResponse()
        raise AssertionError("unreachable")  # pragma: no cover - the block returns or aborts

    def _authorize(self, context: grpc.aio.ServicerContext, method: str) -> None:
        if self._admin_token is None:
            raise Unimplemented(f"{method} is off: the server has no admin token (MODELLOOP_ADMIN_TOKEN)")
        supplied = ""
        for key, value in context.invocation_metadata() or ():
            if key.lower() == "authorization" and isinstance(value, str):
                supplied = value
        expected = f"Bearer {self._admin_token}"
        if not hmac.compare_digest(supplied.encode(), expected.encode()):
            raise Unauthenticated(f"{method} needs 'authorization: Bearer <admin token>' metadata")


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

    def __init__(
        self, dataplane: DataPlaneAPI, services: Iterable[str], watch_interval_s: float = 0.5
    ) -> None:
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
