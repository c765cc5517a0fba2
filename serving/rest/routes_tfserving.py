"""TF Serving REST routes (``/v1``): model status, metadata and ``:predict``.

TF Serving puts the method after a colon (``/v1/models/digits/versions/2:predict``).
Starlette's path parameters stop only at ``/``, so the last segment is captured whole
and split here on its last colon, mirroring TF Serving's own regex
``/v1/models/([^/:]+)(?:/versions/(\\d+)|/labels/([^/:]+))?:(classify|regress|predict)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter, Request, Response

from modelloop.errors import ErrorCode, ServiceError
from modelloop.serving import tracing
from modelloop.serving.codecs import tfserving_json
from modelloop.serving.codecs.json_tensor import OFF_LOOP_DECODE_BYTES, check_value_count
from modelloop.serving.errors import InvalidInput, Unimplemented
from modelloop.serving.rest.errors import JsonResponse, service_error_response
from modelloop.serving.rest.schemas import (
    METADATA_RESPONSES,
    PREDICT_BODY,
    PREDICT_RESPONSES,
    STATUS_RESPONSES,
    ErrorBody,
)
from modelloop.serving.rest.tracing import PREDICT_SPAN, answered, traced_http
from modelloop.serving.types import InferRequest, InferResponse, ModelMetadata, Protocol, parse_version
from modelloop.web import (
    MODEL_VERSION_HEADER,
    REQUEST_ID_HEADER,
    check_content_type,
    error_responses,
    read_body,
)

if TYPE_CHECKING:
    from modelloop.serving.dataplane import DataPlane
    from modelloop.serving.settings import ServingSettings
    from modelloop.web import HttpRequest

JSON = "application/json"
_METHODS = ("predict", "classify", "regress")


def split_method(segment: str, method: str, path: str) -> tuple[str, str]:
    """Splits ``name:predict`` into the name and the lower-cased method.

    Raises:
        ServiceError: NOT_FOUND when the segment has no known ``:method`` (TF Serving
            answers such paths "Malformed request" with 404).
    """
    target, colon, verb = segment.rpartition(":")
    verb = verb.lower()
    if not colon or not target or verb not in _METHODS:
        raise ServiceError(
            f"Malformed request: {method} {path}; expected .../models/<name>[/versions/<v>|/labels/<l>]"
            ":predict (or :classify, :regress)",
            ErrorCode.NOT_FOUND,
        )
    return target, verb


class PredictDecoder:
    """A ``POST ...:predict`` call, decoded in the data plane's two steps.

    The path gives the target; the body is decoded only once the version has resolved,
    because the row format needs the version's input names and dtypes.

    Args:
        request: The HTTP request.
        segment: The last path segment, ``<name|version|label>:<method>``.
        model: The model from the path, or None when ``segment`` holds it.
        pinned: ``"version"`` or ``"label"`` when ``segment`` holds one, else None.
        max_body_bytes: The body limit.
    """

    protocol = Protocol.TFSERVING_REST
    __slots__ = ("_body", "_max_body_bytes", "_model", "_pinned", "_request", "_segment", "row_format")

    def __init__(
        self, request: HttpRequest, segment: str, model: str | None, pinned: str | None, max_body_bytes: int
    ) -> None:
        self._request = request
        self._segment = segment
        self._model = model
        self._pinned = pinned
        self._max_body_bytes = max_body_bytes
        self._body = b""
        self.row_format = True

    def target(self) -> tuple[str, str | None, str | None]:
        """The model, version and label of the path; only ``:predict`` is served."""
        # The scope's path, not request.url: building a URL object costs more than the rest
        # of this method, and the path is only for the error message.
        name, verb = split_method(self._segment, "POST", self._request.scope["path"])
        if verb != "predict":
            raise Unimplemented(
                f":{verb} is not implemented by this server (tf.Example inputs); use :predict, which "
                "takes the same model's inputs as tensors"
            )
        if self._model is None:
            return name, None, None
        if self._pinned == "version":
            return self._model, name, None
        return self._model, None, name

    async def read(self) -> None:
        """Checks the content type and reads the body (bounded)."""
        check_content_type(self._request, form=True)
        self._body = await read_body(self._request, self._max_body_bytes)

    def precheck(self, metadata: ModelMetadata, max_rows: int) -> bool:
        """Refuses a body with more values than ``max_rows`` rows hold; True: decode on a thread."""
        check_value_count(self._body, metadata.inputs, max_rows, metadata.name)
        return len(self._body) >= OFF_LOOP_DECODE_BYTES

    def decode(self, metadata: ModelMetadata) -> InferRequest:
        """Decodes the body (row or columnar format) against the version's inputs."""
        call = tfserving_json.decode_predict_request(self._body, metadata, model=metadata.name)
        self.row_format = call.row_format
        return call.request

    def encode(self, response: InferResponse) -> bytes:
        """The response body, in the format the request used."""
        return tfserving_json.encode_predict_response(response, self.row_format)


async def answer_predict(
    dataplane: DataPlane, request: HttpRequest, decoder: PredictDecoder, *, in_span: bool = False
) -> Response:
    """Runs a ``:predict`` call through the data plane and builds its HTTP response.

    The one handler of the route and of the ASGI fast path (:mod:`.fastpath`). With
    tracing on, the call runs inside its request span (parent: the ``traceparent``
    header).

    Args:
        dataplane: The data plane.
        request: The HTTP request (its ``x-request-id`` header).
        decoder: The call.
        in_span: Whether the request span is open already (the traced call's second
            entry; tracing off costs one check, not a call of its own). Defaults to False.

    Returns:
        The response: the predictions, or ``{"error": ...}`` with the mapped status; both
        carry ``x-request-id``.
    """
    if tracing.TRACER is not None and not in_span:
        with traced_http(PREDICT_SPAN, decoder.protocol, request) as span:
            answer = await answer_predict(dataplane, request, decoder, in_span=True)
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
                payload = decoder.encode(response)
        else:
            payload = decoder.encode(response)
    except ServiceError as error:
        return service_error_response(error, headers)
    return JsonResponse(payload, headers)


def create_tfserving_router(dataplane: DataPlane, settings: ServingSettings) -> APIRouter:
    """The ``/v1`` routes, bound to one data plane.

    Args:
        dataplane: Where every request goes.
        settings: Server settings (``max_body_bytes``).

    Returns:
        A router to include in the app.
    """
    router = APIRouter(tags=["TF Serving REST API"])

    async def predict(request: Request, decoder: PredictDecoder) -> Response:
        return await answer_predict(dataplane, request, decoder)

    @router.post(
        "/v1/models/{model_method}",
        summary="Predict (or classify/regress) with the latest version",
        description="`model_method` is `<model>:predict`, e.g. `digits:predict`.",
        openapi_extra=PREDICT_BODY,
        responses=PREDICT_RESPONSES,
    )
    async def predict_latest(request: Request, model_method: str) -> Response:
        return await predict(
            request, PredictDecoder(request, model_method, None, None, settings.max_body_bytes)
        )

    @router.post(
        "/v1/models/{model}/versions/{version_method}",
        summary="Predict with a pinned version",
        description="`version_method` is `<version>:predict`, e.g. `1:predict`.",
        openapi_extra=PREDICT_BODY,
        responses=PREDICT_RESPONSES,
    )
    async def predict_version(request: Request, model: str, version_method: str) -> Response:
        decoder = PredictDecoder(request, version_method, model, "version", settings.max_body_bytes)
        return await predict(request, decoder)

    @router.post(
        "/v1/models/{model}/labels/{label_method}",
        summary="Predict with a labelled version",
        description="`label_method` is `<label>:predict`, e.g. `stable:predict`.",
        openapi_extra=PREDICT_BODY,
        responses=PREDICT_RESPONSES,
    )
    async def predict_label(request: Request, model: str, label_method: str) -> Response:
        decoder = PredictDecoder(request, label_method, model, "label", settings.max_body_bytes)
        return await predict(request, decoder)

    def status(model: str, version: int | None, label: str | None) -> Response:
        statuses = dataplane.model_status(model, version, label)
        return Response(tfserving_json.encode_model_status(statuses), media_type=JSON)

    def metadata(model: str, version: int | None, label: str | None) -> Response:
        meta = dataplane.metadata(model, version, label)
        return Response(tfserving_json.encode_model_metadata(meta), media_type=JSON)

    @router.get(
        "/v1/models", summary="TF Serving has no model list", responses=error_responses(ErrorBody, 400)
    )
    async def missing_model() -> Response:
        raise InvalidInput("Missing model name in request.")

    @router.get(
        "/v1/models/{model}", summary="Status of every version of a model", responses=STATUS_RESPONSES
    )
    async def status_all(model: str) -> Response:
        return status(model, None, None)

    @router.get(
        "/v1/models/{model}/versions/{version}", summary="Status of one version", responses=STATUS_RESPONSES
    )
    async def status_version(model: str, version: str) -> Response:
        return status(model, parse_version(version), None)

    @router.get(
        "/v1/models/{model}/labels/{label}",
        summary="Status of a labelled version",
        responses=STATUS_RESPONSES,
    )
    async def status_label(model: str, label: str) -> Response:
        return status(model, None, label)

    @router.get(
        "/v1/models/{model}/metadata", summary="Signature of the latest version", responses=METADATA_RESPONSES
    )
    async def metadata_latest(model: str) -> Response:
        return metadata(model, None, None)

    @router.get(
        "/v1/models/{model}/versions/{version}/metadata",
        summary="Signature of one version",
        responses=METADATA_RESPONSES,
    )
    async def metadata_version(model: str, version: str) -> Response:
        return metadata(model, parse_version(version), None)

    @router.get(
        "/v1/models/{model}/labels/{label}/metadata",
        summary="Signature of a labelled version",
        responses=METADATA_RESPONSES,
    )
    async def metadata_label(model: str, label: str) -> Response:
        return metadata(model, None, label)

    return router
