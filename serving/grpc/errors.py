"""Maps the core's neutral error codes to gRPC status codes, for every handler at once.

The only place in the gRPC edge that knows both vocabularies: :data:`STATUS_CODES` is
the table, and :func:`translate_errors` the one decorator every servicer method wears. ``ErrorCode`` is named
after the canonical gRPC codes, so most map one to one; the two HTTP-flavoured codes
map to their gRPC meaning: a body over the size limit is RESOURCE_EXHAUSTED (what gRPC
itself answers for an oversized message), a wrong content type is INVALID_ARGUMENT.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from types import MappingProxyType
from typing import NoReturn, TypeVar

import grpc

from modelloop.errors import ErrorCode, ServiceError

logger = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"

_Servicer = TypeVar("_Servicer")
_Request = TypeVar("_Request")
_Response = TypeVar("_Response")
Handler = Callable[[_Servicer, _Request, grpc.aio.ServicerContext], Awaitable[_Response]]

STATUS_CODES: MappingProxyType[ErrorCode, grpc.StatusCode] = MappingProxyType(
    {
        ErrorCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
        ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
        ErrorCode.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
        ErrorCode.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
        ErrorCode.UNIMPLEMENTED: grpc.StatusCode.UNIMPLEMENTED,
        ErrorCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
        ErrorCode.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
        ErrorCode.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
        ErrorCode.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
        ErrorCode.CANCELLED: grpc.StatusCode.CANCELLED,
        ErrorCode.PAYLOAD_TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
        ErrorCode.UNSUPPORTED_MEDIA_TYPE: grpc.StatusCode.INVALID_ARGUMENT,
        ErrorCode.INTERNAL: grpc.StatusCode.INTERNAL,
    }
)


def status_code(code: ErrorCode) -> grpc.StatusCode:
    """The gRPC status code of a neutral error code.

    Args:
        code: The core's error code.

    Returns:
        The status code; INTERNAL for a code with no mapping.

    Example:

    >>> status_code(ErrorCode.PAYLOAD_TOO_LARGE)
    <StatusCode.RESOURCE_EXHAUSTED: (8, 'resource exhausted')>
    """
    return STATUS_CODES.get(code, grpc.StatusCode.INTERNAL)


async def abort(
    context: grpc.aio.ServicerContext,
    error: ServiceError,
    trailing_metadata: Sequence[tuple[str, str]] = (),
) -> NoReturn:
    """Ends the call with the status of ``error`` and its message.

    Args:
        context: The call's context.
        error: The core's error; its message names the problem and goes to the client.
        trailing_metadata: Extra trailing metadata, e.g. the request id. Defaults to ``()``.

    Raises:
        grpc.aio.AbortError: Always; grpc turns it into the status the client sees.
    """
    await context.abort(status_code(error.code), error.message, trailing_metadata=tuple(trailing_metadata))
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises


def translate_errors(
    method: Handler[_Servicer, _Request, _Response],
) -> Handler[_Servicer, _Request, _Response]:
    """Turns what a servicer method raises into a gRPC status.

    A :class:`ServiceError` becomes its mapped status with its message, and its request
    id, when the data plane set one, goes back as ``x-request-id`` trailing metadata.
    Anything else is a bug: it is logged with its traceback and the client gets INTERNAL
    without the details, so a bad request can never take the server down or leak
    internals.

    Example:

    ```python
    class Servicer(pb_grpc.GRPCInferenceServiceServicer):
        @translate_errors
        async def ModelReady(self, request, context): ...
    ```
    """
    name = method.__name__

    @functools.wraps(method)
    async def handler(self: _Servicer, request: _Request, context: grpc.aio.ServicerContext) -> _Response:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except ServiceError as error:
            trailing = ((REQUEST_ID_KEY, error.request_id),) if error.request_id else ()
            await abort(context, error, trailing)
        except Exception:
            logger.exception("unexpected error in gRPC %s", name)
            await abort(context, ServiceError(f"internal error in {name}; see the server log"))

    return handler
