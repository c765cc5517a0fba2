"""TF Serving REST routes (``/v1``): model status, metadata and ``:predict``.

TF Serving puts the method after a colon (``/v1/models/digits/versions/2:predict``).
Starlette's path parameters stop only at ``/``, so the last segment is captured whole
and split here on its last colon, mirroring TF Serving's own regex
``/v1/models/([^/:]+)(?:/versions/(\\d+)|/labels/([^/:]+))?:(classify|regress|predict)``.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request, Response

from modelloop.errors import ErrorCode
from modelloop.serving.codecs import tfserving_json
from modelloop.serving.errors import InvalidInput, ServingError, Unimplemented
from modelloop.serving.rest.errors import error_response, serving_error_response
from modelloop.serving.rest.transport import REQUEST_ID_HEADER, check_content_type, read_body, request_id
from modelloop.serving.types import Protocol

if TYPE_CHECKING:
    from modelloop.serving.dataplane import DataPlane
    from modelloop.serving.settings import ServingSettings

logger = logging.getLogger(__name__)

JSON = "application/json"
_METHODS = ("predict", "classify", "regress")


def parse_version(text: str) -> int:
    """Parses a version path segment; TF Serving accepts only digits (``\\d+``).

    Raises:
        InvalidInput: The segment is not a non-negative integer.
    """
    if not (text.isascii() and text.isdigit()):
        raise InvalidInput(f'model version must be a non-negative integer, got "{text}"')
    return int(text)


def split_method(segment: str, method: str, path: str) -> tuple[str, str]:
    """Splits ``name:predict`` into the name and the lower-cased method.

    Raises:
        ServingError: NOT_FOUND when the segment has no known ``:method`` (TF Serving
            answers such paths "Malformed request" with 404).
    """
    target, colon, verb = segment.rpartition(":")
    verb = verb.lower()
    if not colon or not target or verb not in _METHODS:
        raise ServingError(
            f"Malformed request: {method} {path}; expected .../models/<name>[/versions/<v>|/labels/<l>]"
            ":predict (or :classify, :regress)",
            ErrorCode.NOT_FOUND,
        )
    return target, verb


def create_tfserving_router(dataplane: DataPlane, settings: ServingSettings) -> APIRouter:
    """The ``/v1`` routes, bound to one data plane.

    Args:
        dataplane: Where every request goes.
        settings: Server settings (``max_body_bytes``).

    Returns:
        A router to include in the app.
    """
    router = APIRouter(tags=["TF Serving REST API"])
    protocol = Protocol.TFSERVING_REST

    async def infer(
        request: Request, model: str, version: int | None, label: str | None, verb: str, started: float
    ) -> Response:
        rid = request_id(request)
        headers = {REQUEST_ID_HEADER: rid}
        try:
            if verb != "predict":
                raise Unimplemented(
                    f":{verb} is not implemented by this server (tf.Example inputs); use :predict, which "
                    "takes the same model's inputs as tensors"
                )
            check_content_type(request)
            body = await read_body(request, settings.max_body_bytes)
            metadata = dataplane.metadata(model, version, label)
            call = tfserving_json.decode_predict_request(
                body, metadata, model=model, version=version, label=label, request_id=rid
            )
        except ServingError as error:
            dataplane.observe_rejected(model, protocol, error.code, time.perf_counter() - started)
            return serving_error_response(error, headers)
        try:
            response = await dataplane.infer(call.request)
            payload = tfserving_json.encode_predict_response(response, call.row_format)
        except ServingError as error:
            return serving_error_response(error, headers)
        except Exception:
            # Still answer with the request id and the {"error"} body, so the client can report it.
            logger.exception("predict failed for model %s (request %s)", model, rid)
            return error_response("internal server error", 500, headers)
        return Response(payload, media_type=JSON, headers=headers)

    async def path_error(request: Request, error: ServingError, model: str, started: float) -> Response:
        dataplane.observe_rejected(model, protocol, error.code, time.perf_counter() - started)
        return serving_error_response(error, {REQUEST_ID_HEADER: request_id(request)})

    @router.post("/v1/models/{model_method}", summary="Predict (or classify/regress) with the latest version")
    async def predict_latest(request: Request, model_method: str) -> Response:
        started = time.perf_counter()
        try:
            model, verb = split_method(model_method, "POST", request.url.path)
        except ServingError as error:
            return await path_error(request, error, model_method, started)
        return await infer(request, model, None, None, verb, started)

    @router.post("/v1/models/{model}/versions/{version_method}", summary="Predict with a pinned version")
    async def predict_version(request: Request, model: str, version_method: str) -> Response:
        started = time.perf_counter()
        try:
            text, verb = split_method(version_method, "POST", request.url.path)
            version = parse_version(text)
        except ServingError as error:
            return await path_error(request, error, model, started)
        return await infer(request, model, version, None, verb, started)

    @router.post("/v1/models/{model}/labels/{label_method}", summary="Predict with a labelled version")
    async def predict_label(request: Request, model: str, label_method: str) -> Response:
        started = time.perf_counter()
        try:
            label, verb = split_method(label_method, "POST", request.url.path)
        except ServingError as error:
            return await path_error(request, error, model, started)
        return await infer(request, model, None, label, verb, started)

    def status(model: str, version: int | None, label: str | None) -> Response:
        statuses = dataplane.model_status(model, version, label)
        return Response(tfserving_json.encode_model_status(statuses), media_type=JSON)

    def metadata(model: str, version: int | None, label: str | None) -> Response:
        meta = dataplane.metadata(model, version, label)
        return Response(tfserving_json.encode_model_metadata(meta), media_type=JSON)

    @router.get("/v1/models", summary="TF Serving has no model list")
    async def missing_model() -> Response:
        raise InvalidInput("Missing model name in request.")

    @router.get("/v1/models/{model}", summary="Status of every version of a model")
    async def status_all(model: str) -> Response:
        return status(model, None, None)

    @router.get("/v1/models/{model}/versions/{version}", summary="Status of one version")
    async def status_version(model: str, version: str) -> Response:
        return status(model, parse_version(version), None)

    @router.get("/v1/models/{model}/labels/{label}", summary="Status of a labelled version")
    async def status_label(model: str, label: str) -> Response:
        return status(model, None, label)

    @router.get("/v1/models/{model}/metadata", summary="Signature of the latest version")
    async def metadata_latest(model: str) -> Response:
        return metadata(model, None, None)

    @router.get("/v1/models/{model}/versions/{version}/metadata", summary="Signature of one version")
    async def metadata_version(model: str, version: str) -> Response:
        return metadata(model, parse_version(version), None)

    @router.get("/v1/models/{model}/labels/{label}/metadata", summary="Signature of a labelled version")
    async def metadata_label(model: str, label: str) -> Response:
        return metadata(model, None, label)

    return router
