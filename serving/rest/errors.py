"""Maps the neutral :class:`ErrorCode` to HTTP statuses; every error body is ``{"error": ...}``.

The table is TF Serving's ``ToHTTPStatusCode`` (``util/net_http``), which KServe and
MLServer agree with for the codes both use, plus 413 and 415 for the body checks.
"""

from __future__ import annotations

import logging
from typing import cast

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from modelloop.errors import ErrorCode, ServiceError

logger = logging.getLogger(__name__)

HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_ARGUMENT: 400,
    ErrorCode.FAILED_PRECONDITION: 400,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.PERMISSION_DENIED: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: 415,
    ErrorCode.RESOURCE_EXHAUSTED: 429,
    ErrorCode.CANCELLED: 499,
    ErrorCode.INTERNAL: 500,
    ErrorCode.UNIMPLEMENTED: 501,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.DEADLINE_EXCEEDED: 504,
}


class JsonResponse(Response):
    """A 200 ``application/json`` response whose header list is built directly.

    Starlette's ``Response`` builds its headers through ``MutableHeaders`` on every
    response; the predict and infer routes answer thousands a second with the same three
    headers, so they are written as the raw list the ASGI server sends.

    Args:
        body: The encoded JSON.
        headers: Extra headers (``x-request-id``).
    """

    media_type = "application/json"

    def __init__(self, body: bytes, headers: dict[str, str]) -> None:
        self.status_code = 200
        self.body = body
        self.background = None
        self.raw_headers = [
            (b"content-length", str(len(body)).encode("latin-1")),
            (b"content-type", b"application/json"),
            *((k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()),
        ]


def http_status(code: ErrorCode) -> int:
    """The HTTP status of a neutral error code (500 for any code not in the table)."""
    return HTTP_STATUS.get(code, 500)


def error_response(message: str, status: int, headers: dict[str, str] | None = None) -> Response:
    """A JSON ``{"error": message}`` response.

    Args:
        message: What went wrong, for the client.
        status: The HTTP status.
        headers: Extra headers (``x-request-id``, ``WWW-Authenticate``). Defaults to None.

    Returns:
        The response.
    """
    return Response(
        orjson.dumps({"error": message}), status_code=status, media_type="application/json", headers=headers
    )


def service_error_response(error: ServiceError, headers: dict[str, str] | None = None) -> Response:
    """The response for a :class:`ServiceError`: its mapped status and its message."""
    if error.code is ErrorCode.UNAUTHENTICATED:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return error_response(error.message, http_status(error.code), headers)


def install_error_handlers(app: FastAPI) -> None:
    """Makes every error the app answers, FastAPI's own included, a ``{"error": ...}`` body.

    Args:
        app: The application.
    """

    async def on_serving_error(request: Request, error: Exception) -> Response:
        return service_error_response(cast(ServiceError, error))

    async def on_http_error(request: Request, error: Exception) -> Response:
        error = cast(StarletteHTTPException, error)
        if error.status_code == 404:
            message = f"no route for {request.method} {request.url.path}"
        elif error.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(error.detail)
        return error_response(message, error.status_code, dict(error.headers or {}))

    async def on_validation_error(request: Request, error: Exception) -> Response:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in item.get('loc', ()))}: {item.get('msg', '')}"
            for item in cast(RequestValidationError, error).errors()
        )
        # INVALID_ARGUMENT is 400 in both protocols; FastAPI's 422 is neither's.
        return error_response(f"invalid request: {problems}", 400)

    async def on_unexpected(request: Request, error: Exception) -> Response:
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=error)
        return error_response("internal server error", 500)

    app.add_exception_handler(ServiceError, on_serving_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_unexpected)
