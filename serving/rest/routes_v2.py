"""Open Inference Protocol V2 REST routes (``/v2``), with Triton's repository extension.

The repository routes (index, load, unload) change what the server serves, so they need
``Authorization: Bearer <admin token>`` and are off when no token is configured.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson
from fastapi import APIRouter, Request, Response

from modelloop.errors import ServiceError
from modelloop.serving import tracing
from modelloop.serving.codecs import v2_json
from modelloop.serving.codecs.json_tensor import OFF_LOOP_DECODE_BYTES, check_value_count
from modelloop.serving.errors import InvalidInput
from modelloop.serving.repository import refuse_load_parameters
from modelloop.serving.rest.errors import JsonResponse, error_response, service_error_response
from modelloop.serving.rest.schemas import (
    ADMIN_ERRORS,
    INFER_BODY,
    INFER_RESPONSES,
    ErrorBody,
    RepositoryIndexEntry,
    RepositoryIndexRequest,
    V2Live,
    V2ModelMetadata,
    V2ModelReady,
    V2ModelStatistics,
    V2Ready,
    V2ServerMetadata,
)
from modelloop.serving.rest.tracing import INFER_SPAN, answered, traced_http
from modelloop.serving.types import (
    InferRequest,
    InferResponse,
    ModelMetadata,
    ModelState,
    Protocol,
    parse_version,
)
from modelloop.web import (
    ADMIN_SECURITY,
    MODEL_VERSION_HEADER,
    REQUEST_ID_HEADER,
    check_content_type,
    error_responses,
    openapi_body,
    read_body,
    require_admin,
)

if TYPE_CHECKING:
    from modelloop.serving.dataplane import DataPlane
    from modelloop.serving.settings import ServingSettings
    from modelloop.serving.shared_memory import SystemSharedMemory
    from modelloop.web import HttpRequest

JSON = "application/json"
_INDEX_BODY = openapi_body(
    [RepositoryIndexRequest],
    description="Optional: an empty body lists every version.",
    examples={"ready": {"summary": "Only versions that can serve", "value": {"ready": True}}},
    required=False,
)


# Header lookups take lower-case names (the fast path's headers are a plain dict).
_HEADER_LENGTH_KEY = v2_json.HEADER_LENGTH.lower()


def _header_length(request: HttpRequest) -> int | None:
    raw = request.headers.get(_HEADER_LENGTH_KEY)
    if raw is None:
        return None
    if not (raw.isascii() and raw.strip().isdigit()):
        raise InvalidInput(f"{v2_json.HEADER_LENGTH} must be a non-negative integer, got {raw!r}")
    return int(raw)


class InferDecoder:
    """A ``POST /v2/models/<name>[/versions/<v>]/infer`` call, for :meth:`DataPlane.handle`.

    Args:
        request: The HTTP request.
        model: The model from the path.
        version: The version from the path, as written, or None.
        max_body_bytes: The body limit.
        shared_memory: The system shared memory regions inputs and outputs may name.
            Defaults to None (none).
    """

    protocol = Protocol.V2_REST
    __slots__ = (
        "_body",
        "_header_length",
        "_max_body_bytes",
        "_model",
        "_request",
        "_shared_memory",
        "_version",
        "call",
    )

    def __init__(
        self,
        request: HttpRequest,
        model: str,
        version: str | None,
        max_body_bytes: int,
        shared_memory: SystemSharedMemory | None = None,
    ) -> None:
        self._request = request
        self._shared_memory = shared_memory
        self._model = model
        self._version = version
        self._max_body_bytes = max_body_bytes
        self._body = b""
        self._header_length: int | None = None
        self.call: v2_json.InferCall | None = None

    def target(self) -> tuple[str, str | None, str | None]:
        """The model and version of the path (the OIP has no labels)."""
        return self._model, self._version, None

    async def read(self) -> None:
        """Checks the content type and the JSON header's length, and reads the body (bounded)."""
        check_content_type(self._request, binary=True, form=True)
        self._header_length = _header_length(self._request)
        self._body = await read_body(self._request, self._max_body_bytes)

    def precheck(self, metadata: ModelMetadata, max_rows: int) -> bool:
        """Refuses a body with more values than ``max_rows`` rows hold; True: decode on a thread."""
        header = self._body if self._header_length is None else self._body[: self._header_length]
        check_value_count(header, metadata.inputs, max_rows, metadata.name)
        return len(self._body) >= OFF_LOOP_DECODE_BYTES

    def decode(self, metadata: ModelMetadata) -> InferRequest:
        """Decodes the JSON body, or the JSON header followed by binary tensors."""
        self.call = v2_json.decode_infer_request(
            self._body,
            model=self._model,
            header_length=self._header_length,
            shared_memory=self._shared_memory,
        )
        return self.call.request

    def encode(self, response: InferResponse) -> tuple[bytes, int | None]:
        """The response body, and the JSON header's length when binary outputs follow it.

        Raises:
            InvalidInput: Called before :meth:`decode`.
        """
        if self.call is None:
            raise InvalidInput("the response of an undecoded request cannot be encoded")
        return v2_json.encode_infer_response(response, self.call, self._shared_memory)


def _json(payload: bytes, status: int = 200) -> Response:
    return Response(payload, status_code=status, media_type=JSON)


async def answer_infer(
    dataplane: DataPlane, request: HttpRequest, decoder: InferDecoder, *, in_span: bool = False
) -> Response:
    """Runs an ``/infer`` call through the data plane and builds its HTTP response.

    The one handler of the routes and of the ASGI fast path (:mod:`.fastpath`).

    Args:
        dataplane: The data plane.
        request: The HTTP request (its ``x-request-id`` header).
        decoder: The call.
        in_span: Whether the request span is open already (the traced call's second
            entry; tracing off costs one check, not a call of its own). Defaults to False.

    Returns:
        The response: JSON, or a JSON header followed by binary outputs, or
        ``{"error": ...}`` with the mapped status; all carry ``x-request-id``. With tracing
        on, the call runs inside its request span (parent: the ``traceparent`` header).
    """
    if tracing.TRACER is not None and not in_span:
        with traced_http(INFER_SPAN, decoder.protocol, request) as span:
            answer = await answer_infer(dataplane, request, decoder, in_span=True)
            answered(span, answer.status_code)
            return answer
    try:
        response = await dataplane.handle(decoder, client_id=request.headers.get(REQUEST_ID_HEADER))
    except ServiceError as error:
        return service_error_response(error, {REQUEST_ID_HEADER: error.request_id})
    headers = {REQUEST_ID_HEADER: response.id, MODEL_VERSION_HEADER: str(response.version)}
    try:
        if tracing.TRACER is not None:
            with tracing.encode_span(decoder.protocol, response.model, response.version):
                payload, json_length = decoder.encode(response)
        else:
            payload, json_length = decoder.encode(response)
    except ServiceError as error:
        return service_error_response(error, headers)
    if json_length is None:
        return JsonResponse(payload, headers)
    headers[v2_json.HEADER_LENGTH] = str(json_length)
    return Response(payload, media_type=v2_json.BINARY_CONTENT_TYPE, headers=headers)


def create_v2_router(dataplane: DataPlane, settings: ServingSettings) -> APIRouter:
    """The ``/v2`` routes, bound to one data plane.

    Args:
        dataplane: Where every request goes.
        settings: Server settings (``max_body_bytes``, ``admin_token``).

    Returns:
        A router to include in the app.
    """
    router = APIRouter(tags=["Open Inference Protocol V2"])

    admin_token = settings.admin_token.get_secret_value() if settings.admin_token is not None else None

    @router.get("/v2", summary="Server metadata", responses={200: {"model": V2ServerMetadata}})
    async def server_metadata() -> Response:
        return _json(v2_json.encode_server_metadata(dataplane.server_metadata()))

    @router.get(
        "/v2/health/live",
        summary="Liveness",
        responses={200: {"model": V2Live}, **error_responses(ErrorBody, 503)},
    )
    async def live() -> Response:
        if dataplane.live():
            return _json(b'{"live":true}')
        return error_response("server is not live", 503)

    @router.get(
        "/v2/health/ready",
        summary="Readiness: every model has an available version",
        responses={200: {"model": V2Ready}, **error_responses(ErrorBody, 503)},
    )
    async def ready() -> Response:
        # 503 when not ready follows KServe (kserve#818) and what Kubernetes probes expect;
        # Triton answers 400 here, which reads as a client error.
        if dataplane.ready():
            return _json(b'{"ready":true}')
        if dataplane.repository_error():
            return error_response(f"server is not ready: {dataplane.repository_error()}", 503)
        return error_response("server is not ready: a model has no available version, or it is draining", 503)

    def metadata(model: str, version: int | None) -> Response:
        meta = dataplane.metadata(model, version)
        versions = sorted(s.version for s in dataplane.model_status(model) if s.state is ModelState.AVAILABLE)
        return _json(v2_json.encode_model_metadata(meta, versions))

    def model_ready(model: str, version: int | None) -> Response:
        # Follows the same 200 / 503 split as /v2/health/ready; an unknown model is 404.
        if dataplane.model_ready(model, version):
            return _json(orjson.dumps({"name": model, "ready": True}))
        which = f'model "{model}"' + (f" version {version}" if version is not None else "")
        return error_response(f"{which} is not ready", 503)

    def statistics(model: str | None, version: int | None) -> Response:
        stats = dataplane.statistics(model, version)
        return _json(v2_json.encode_model_statistics([s.as_dict() for s in stats]))

    # Declared before /v2/models/{model}, which would take "stats" for a model name.
    @router.get(
        "/v2/models/stats",
        summary="Inference statistics of every model (Triton's statistics extension)",
        responses={200: {"model": V2ModelStatistics}},
    )
    async def statistics_all() -> Response:
        return statistics(None, None)

    @router.get(
        "/v2/models/{model}/stats",
        summary="Inference statistics of a model's versions",
        responses={200: {"model": V2ModelStatistics}, **error_responses(ErrorBody, 404)},
    )
    async def statistics_model(model: str) -> Response:
        return statistics(model, None)

    @router.get(
        "/v2/models/{model}/versions/{version}/stats",
        summary="Inference statistics of one version",
        responses={200: {"model": V2ModelStatistics}, **error_responses(ErrorBody, 400, 404)},
    )
    async def statistics_version(model: str, version: str) -> Response:
        return statistics(model, parse_version(version))

    @router.get(
        "/v2/models/{model}",
        summary="Model metadata (latest version)",
        responses={200: {"model": V2ModelMetadata}, **error_responses(ErrorBody, 400, 404, 503)},
    )
    async def metadata_latest(model: str) -> Response:
        return metadata(model, None)

    @router.get(
        "/v2/models/{model}/versions/{version}",
        summary="Model metadata (one version)",
        responses={200: {"model": V2ModelMetadata}, **error_responses(ErrorBody, 400, 404, 503)},
    )
    async def metadata_version(model: str, version: str) -> Response:
        return metadata(model, parse_version(version))

    @router.get(
        "/v2/models/{model}/config",
        summary="Model configuration (latest version): Triton's, with how the server runs it",
        responses=error_responses(ErrorBody, 400, 404, 503),
    )
    async def config_latest(model: str) -> Response:
        return _json(v2_json.encode_model_config(dataplane.model_config(model)))

    @router.get(
        "/v2/models/{model}/versions/{version}/config",
        summary="Model configuration (one version)",
        responses=error_responses(ErrorBody, 400, 404, 503),
    )
    async def config_version(model: str, version: str) -> Response:
        return _json(v2_json.encode_model_config(dataplane.model_config(model, parse_version(version))))

    @router.get(
        "/v2/models/{model}/ready",
        summary="Model readiness",
        responses={200: {"model": V2ModelReady}, **error_responses(ErrorBody, 400, 404, 503)},
    )
    async def ready_latest(model: str) -> Response:
        return model_ready(model, None)

    @router.get(
        "/v2/models/{model}/versions/{version}/ready",
        summary="Model version readiness",
        responses={200: {"model": V2ModelReady}, **error_responses(ErrorBody, 400, 404, 503)},
    )
    async def ready_version(model: str, version: str) -> Response:
        return model_ready(model, parse_version(version))

    async def infer(request: Request, decoder: InferDecoder) -> Response:
        return await answer_infer(dataplane, request, decoder)

    @router.post(
        "/v2/models/{model}/infer",
        summary="Inference (latest version)",
        openapi_extra=INFER_BODY,
        responses=INFER_RESPONSES,
    )
    async def infer_latest(request: Request, model: str) -> Response:
        return await infer(
            request, InferDecoder(request, model, None, settings.max_body_bytes, dataplane.shared_memory)
        )

    @router.post(
        "/v2/models/{model}/versions/{version}/infer",
        summary="Inference (one version)",
        openapi_extra=INFER_BODY,
        responses=INFER_RESPONSES,
    )
    async def infer_version(request: Request, model: str, version: str) -> Response:
        return await infer(
            request, InferDecoder(request, model, version, settings.max_body_bytes, dataplane.shared_memory)
        )

    @router.post(
        "/v2/repository/index",
        summary="Repository index (admin)",
        openapi_extra={**_INDEX_BODY, **ADMIN_SECURITY},
        responses={
            200: {"model": list[RepositoryIndexEntry]},
            **error_responses(ErrorBody, 400, 413, 415),
            **ADMIN_ERRORS,
        },
    )
    async def repository_index(request: Request) -> Response:
        require_admin(request, admin_token)
        check_content_type(request)
        ready_only = v2_json.decode_repository_index_request(
            await read_body(request, settings.max_body_bytes)
        )
        return _json(v2_json.encode_repository_index(dataplane.repository_index(), ready_only))

    @router.post(
        "/v2/repository/models/{model}/load",
        summary="Load a model (admin)",
        response_class=Response,
        openapi_extra=ADMIN_SECURITY,
        responses={200: {"description": "Loaded"}, **error_responses(ErrorBody, 404, 415), **ADMIN_ERRORS},
    )
    async def load(request: Request, model: str) -> Response:
        require_admin(request, admin_token)
        check_content_type(request)
        body = await read_body(request, settings.max_body_bytes)
        refuse_load_parameters(v2_json.decode_repository_load_request(body))
        await dataplane.load_model(model)
        return Response(status_code=200)

    @router.post(
        "/v2/repository/models/{model}/unload",
        summary="Unload a model (admin)",
        response_class=Response,
        openapi_extra=ADMIN_SECURITY,
        responses={200: {"description": "Unloaded"}, **error_responses(ErrorBody, 404, 415), **ADMIN_ERRORS},
    )
    async def unload(request: Request, model: str) -> Response:
        require_admin(request, admin_token)
        check_content_type(request)
        await dataplane.unload_model(model)
        return Response(status_code=200)

    return router
