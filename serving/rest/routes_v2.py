"""Open Inference Protocol V2 REST routes (``/v2``), with Triton's repository extension.

The repository routes (index, load, unload) change what the server serves, so they need
``Authorization: Bearer <admin token>`` and are off when no token is configured.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import orjson
from fastapi import APIRouter, Request, Response

from modelloop.serving.codecs import v2_json
from modelloop.serving.errors import (
    InvalidInput,
    ServingError,
)
from modelloop.serving.rest.auth import require_admin as check_admin
from modelloop.serving.rest.errors import error_response, serving_error_response
from modelloop.serving.rest.routes_tfserving import parse_version
from modelloop.serving.rest.transport import REQUEST_ID_HEADER, check_content_type, read_body, request_id
from modelloop.serving.types import ModelState, Protocol

if TYPE_CHECKING:
    from modelloop.serving.dataplane import DataPlane
    from modelloop.serving.settings import ServingSettings

logger = logging.getLogger(__name__)

JSON = "application/json"


def _header_length(request: Request) -> int | None:
    raw = request.headers.get(v2_json.HEADER_LENGTH)
    if raw is None:
        return None
    if not (raw.isascii() and raw.strip().isdigit()):
        raise InvalidInput(f"{v2_json.HEADER_LENGTH} must be a non-negative integer, got {raw!r}")
    return int(raw)


def _json(payload: bytes, status: int = 200) -> Response:
    return Response(payload, status_code=status, media_type=JSON)


def create_v2_router(dataplane: DataPlane, settings: ServingSettings) -> APIRouter:
    """The ``/v2`` routes, bound to one data plane.

    Args:
        dataplane: Where every request goes.
        settings: Server settings (``max_body_bytes``, ``admin_token``).

    Returns:
        A router to include in the app.
    """
    router = APIRouter(tags=["Open Inference Protocol V2"])
    protocol = Protocol.V2_REST

    def require_admin(request: Request) -> None:
        check_admin(request, settings)

    @router.get("/v2", summary="Server metadata")
    async def server_metadata() -> Response:
        return _json(v2_json.encode_server_metadata(dataplane.server_metadata()))

    @router.get("/v2/health/live", summary="Liveness")
    async def live() -> Response:
        if dataplane.live():
            return _json(b'{"live":true}')
        return error_response("server is not live", 503)

    @router.get("/v2/health/ready", summary="Readiness: every model has an available version")
    async def ready() -> Response:
        # 503 when not ready follows KServe (kserve#818) and what Kubernetes probes expect;
        # Triton answers 400 here, which reads as a client error.
        if dataplane.ready():
            return _json(b'{"ready":true}')
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

    @router.get("/v2/models/{model}", summary="Model metadata (latest version)")
    async def metadata_latest(model: str) -> Response:
        return metadata(model, None)

    @router.get("/v2/models/{model}/versions/{version}", summary="Model metadata (one version)")
    async def metadata_version(model: str, version: str) -> Response:
        return metadata(model, parse_version(version))

    @router.get("/v2/models/{model}/ready", summary="Model readiness")
    async def ready_latest(model: str) -> Response:
        return model_ready(model, None)

    @router.get("/v2/models/{model}/versions/{version}/ready", summary="Model version readiness")
    async def ready_version(model: str, version: str) -> Response:
        return model_ready(model, parse_version(version))

    async def infer(request: Request, model: str, version_text: str | None, started: float) -> Response:
        headers = {REQUEST_ID_HEADER: request_id(request)}
        try:
            version = parse_version(version_text) if version_text is not None else None
            check_content_type(request, binary=True)
            header_length = _header_length(request)
            body = await read_body(request, settings.max_body_bytes)
            call = v2_json.decode_infer_request(
                body, model=model, version=version, header_length=header_length
            )
        except ServingError as error:
            dataplane.observe_rejected(model, protocol, error.code, time.perf_counter() - started)
            return serving_error_response(error, headers)
        # One id for logs, metrics and feedback: the header's, else the body's, else a new one.
        rid = request_id(request, call.body_id)
        headers[REQUEST_ID_HEADER] = rid
        call.request.id = rid
        try:
            response = await dataplane.infer(call.request)
            payload, json_length = v2_json.encode_infer_response(response, call)
        except ServingError as error:
            return serving_error_response(error, headers)
        except Exception:
            logger.exception("infer failed for model %s (request %s)", model, rid)
            return error_response("internal server error", 500, headers)
        if json_length is None:
            return Response(payload, media_type=JSON, headers=headers)
        headers[v2_json.HEADER_LENGTH] = str(json_length)
        return Response(payload, media_type=v2_json.BINARY_CONTENT_TYPE, headers=headers)

    @router.post("/v2/models/{model}/infer", summary="Inference (latest version)")
    async def infer_latest(request: Request, model: str) -> Response:
        return await infer(request, model, None, time.perf_counter())

    @router.post("/v2/models/{model}/versions/{version}/infer", summary="Inference (one version)")
    async def infer_version(request: Request, model: str, version: str) -> Response:
        return await infer(request, model, version, time.perf_counter())

    @router.post("/v2/repository/index", summary="Repository index (admin)")
    async def repository_index(request: Request) -> Response:
        require_admin(request)
        ready_only = v2_json.decode_repository_index_request(
            await read_body(request, settings.max_body_bytes)
        )
        return _json(v2_json.encode_repository_index(dataplane.repository_index(), ready_only))

    @router.post("/v2/repository/models/{model}/load", summary="Load a model (admin)")
    async def load(request: Request, model: str) -> Response:
        require_admin(request)
        await dataplane.load_model(model)
        return Response(status_code=200)

    @router.post("/v2/repository/models/{model}/unload", summary="Unload a model (admin)")
    async def unload(request: Request, model: str) -> Response:
        require_admin(request)
        await dataplane.unload_model(model)
        return Response(status_code=200)

    return router
