"""Triton's shared memory extensions over REST (``/v2/systemsharedmemory``, ``/v2/cudasharedmemory``).

Registering a region makes the server read and write memory another process named, so
every route here needs ``Authorization: Bearer <admin token>`` (the one admin check,
:func:`modelloop.tokens.authorize_admin`) and is off without a token. Infer requests then
name a registered region in their tensors' parameters (:mod:`modelloop.serving.shared_memory`).
The CUDA routes answer 503: this server takes no CUDA IPC handles.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, Request, Response

from modelloop.serving.errors import InvalidInput
from modelloop.serving.rest.schemas import ADMIN_ERRORS, ErrorBody, SharedMemoryRegion
from modelloop.serving.shared_memory import CUDA_UNAVAILABLE, SharedMemoryUnavailable
from modelloop.web import ADMIN_SECURITY, error_responses, read_body, require_admin

if TYPE_CHECKING:
    from modelloop.serving.dataplane import DataPlane
    from modelloop.serving.settings import ServingSettings

TAG = "Shared memory (Triton extension)"


def _register_body(body: bytes) -> tuple[str, int, int]:
    try:
        document: Any = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"the register request body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidInput('the register request must be a JSON object {"key", "offset", "byte_size"}')
    key = document.get("key")
    if not isinstance(key, str) or not key:
        raise InvalidInput('the register request needs "key": the name of a POSIX shared memory object')
    sizes: dict[str, int] = {}
    for field, default in (("offset", 0), ("byte_size", None)):
        value = document.get(field, default)
        if type(value) is not int or value < 0:
            raise InvalidInput(f'the register request needs "{field}": a non-negative integer, got {value!r}')
        sizes[field] = value
    return key, sizes["offset"], sizes["byte_size"]


def create_shared_memory_router(dataplane: DataPlane, settings: ServingSettings) -> APIRouter:
    """The shared memory routes, bound to one data plane's regions.

    Args:
        dataplane: Holds the regions (``dataplane.shared_memory``).
        settings: Server settings (``admin_token``, ``max_body_bytes``).

    Returns:
        A router to include in the app.
    """
    router = APIRouter(tags=[TAG])
    admin_token = settings.admin_token.get_secret_value() if settings.admin_token is not None else None
    regions = dataplane.shared_memory
    failures = {**error_responses(ErrorBody, 400), **ADMIN_ERRORS}

    def status(request: Request, name: str | None) -> Response:
        require_admin(request, admin_token)
        return Response(orjson.dumps(regions.status(name)), media_type="application/json")

    @router.get(
        "/v2/systemsharedmemory/status",
        summary="Registered system shared memory regions (admin)",
        openapi_extra=ADMIN_SECURITY,
        responses={200: {"model": list[SharedMemoryRegion]}, **failures},
    )
    async def status_all(request: Request) -> Response:
        return status(request, None)

    @router.get(
        "/v2/systemsharedmemory/region/{name}/status",
        summary="One system shared memory region (admin)",
        openapi_extra=ADMIN_SECURITY,
        responses={200: {"model": list[SharedMemoryRegion]}, **failures},
    )
    async def status_one(request: Request, name: str) -> Response:
        return status(request, name)

    @router.post(
        "/v2/systemsharedmemory/region/{name}/register",
        summary="Register a system shared memory region (admin)",
        response_class=Response,
        openapi_extra=ADMIN_SECURITY,
        responses={200: {"description": "Registered"}, **failures, **error_responses(ErrorBody, 503)},
    )
    async def register(request: Request, name: str) -> Response:
        require_admin(request, admin_token)
        key, offset, byte_size = _register_body(await read_body(request, settings.max_body_bytes))
        regions.register(name, key, offset=offset, byte_size=byte_size)
        return Response(status_code=200)

    @router.post(
        "/v2/systemsharedmemory/region/{name}/unregister",
        summary="Unregister a system shared memory region (admin)",
        response_class=Response,
        openapi_extra=ADMIN_SECURITY,
        responses={200: {"description": "Unregistered (or was not registered)"}, **failures},
    )
    async def unregister(request: Request, name: str) -> Response:
        require_admin(request, admin_token)
        regions.unregister(name)
        return Response(status_code=200)

    @router.post(
        "/v2/systemsharedmemory/unregister",
        summary="Unregister every system shared memory region (admin)",
        response_class=Response,
        openapi_extra=ADMIN_SECURITY,
        responses={200: {"description": "Unregistered"}, **failures},
    )
    async def unregister_all(request: Request) -> Response:
        require_admin(request, admin_token)
        regions.unregister(None)
        return Response(status_code=200)

    cuda = error_responses(ErrorBody, 503)

    @router.get("/v2/cudasharedmemory/status", summary="CUDA shared memory (unavailable)", responses=cuda)
    @router.get(
        "/v2/cudasharedmemory/region/{name}/status",
        summary="CUDA shared memory (unavailable)",
        responses=cuda,
    )
    @router.post(
        "/v2/cudasharedmemory/unregister", summary="CUDA shared memory (unavailable)", responses=cuda
    )
    @router.post(
        "/v2/cudasharedmemory/region/{name}/register",
        summary="CUDA shared memory (unavailable)",
        responses=cuda,
    )
    @router.post(
        "/v2/cudasharedmemory/region/{name}/unregister",
        summary="CUDA shared memory (unavailable)",
        responses=cuda,
    )
    async def cuda_shared_memory(request: Request) -> Response:
        raise SharedMemoryUnavailable(CUDA_UNAVAILABLE)

    return router
