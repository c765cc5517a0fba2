"""Maps the core's neutral error codes to gRPC status codes, for every handler at once.

The only place in the gRPC edge that knows both vocabularies: :data:`STATUS_CODES` is
the table, and :func:`translate_errors` the one decorator every servicer method wears. ``ErrorCode`` is named
after the canonical gRPC codes, so most map one to one; the two HTTP-flavoured codes
map to their gRPC meaning: a body over the size limit is RESOURCE_EXHAUSTED (what gRPC
itself answers for an oversized message), a wrong content type is INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from types import MappingProxyType
from typing import NoReturn, TypeVar, cast

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
        except ServiceError as caught:
            error = caught
        except Exception as caught:
            logger.exception("unexpected error in gRPC %s", name)
            release_frames(caught)
            error = ServiceError(f"internal error in {name}; see the server log")
        # Aborted outside the except block, with the error's frames released: a refused
        # call's message (up to the message limit) is freed when the call ends, not at the
        # next full collection of the cycle error -> traceback -> frame -> error.
        release_frames(error)
        trailing = ((REQUEST_ID_KEY, error.request_id),) if error.request_id else ()
        fail(context, error, trailing)
        if _message_bytes(request) >= TRIM_AFTER_BYTES:
            TRIMMER.schedule()
        return cast(_Response, None)  # grpc discards the response of a call whose code is set

    return handler


TRIM_AFTER_BYTES = 4 * 1024 * 1024
"""A refused or failed call of a message this large gives the C heap back to the system."""


def _message_bytes(request: object) -> int:
    size = getattr(request, "ByteSize", None)
    try:
        return int(size()) if callable(size) else 0
    except Exception:  # noqa: BLE001 - a size is only a hint
        return 0


class HeapTrimmer:
    """Returns the C heap's free pages to the system, at most once a second, off the event loop.

    A large message arrives in many small buffers of grpc's; freed, they stay in the C
    allocator's arenas (glibc keeps free memory inside its heaps), so the process's RSS
    stays hundreds of MiB above its start after a few refused 60 MiB calls although
    nothing holds them. ``malloc_trim(0)`` hands those pages back. Where the C library has
    no ``malloc_trim`` (not glibc) this does nothing.
    """

    def __init__(self, delay_s: float = 0.2) -> None:
        self.delay_s = delay_s
        self._pending: asyncio.AbstractEventLoop | None = None  # the loop a trim is due on
        self._wanted = False
        self._trim: Callable[[int], int] | None = None
        self._looked_up = False

    def _function(self) -> Callable[[int], int] | None:
        if not self._looked_up:
            self._looked_up = True
            # The process's own symbols: glibc's malloc_trim, without searching for a library.
            with contextlib.suppress(OSError, AttributeError):
                self._trim = ctypes.CDLL(None).malloc_trim
        return self._trim

    def schedule(self) -> None:
        """Trims shortly (once the refused call's message is freed); calls meanwhile share it."""
        if self._function() is None:
            return
        self._wanted = True
        loop = asyncio.get_running_loop()
        if self._pending is loop and not loop.is_closed():
            return  # the running trimmer trims again after its pause
        self._pending = loop
        loop.call_later(self.delay_s, self._start)

    def _start(self) -> None:
        task = asyncio.get_running_loop().create_task(self._run())
        _TRIMS.add(task)
        task.add_done_callback(_TRIMS.discard)

    async def _run(self) -> None:
        try:
            while self._wanted and self._trim is not None:
                self._wanted = False
                await asyncio.to_thread(self._trim, 0)  # ctypes lets the GIL go during the call
                await asyncio.sleep(1.0)
        finally:
            self._pending = None


_TRIMS: set[asyncio.Task[None]] = set()
TRIMMER = HeapTrimmer()


def fail(
    context: grpc.aio.ServicerContext,
    error: ServiceError,
    trailing_metadata: Sequence[tuple[str, str]] = (),
) -> None:
    """Sets the call's status from ``error``; the handler then returns (its response is dropped).

    Unlike :func:`abort`, nothing is raised: ``context.abort`` keeps the ``AbortError`` it
    raises on the call's state, and that error's traceback holds the handler's frame and so
    the call's state again, a cycle that kept every refused message (up to the message
    limit each) until a full collection.
    """
    context.set_code(status_code(error.code))
    context.set_details(error.message)
    if trailing_metadata:
        context.set_trailing_metadata(tuple(trailing_metadata))


def release_frames(error: BaseException) -> None:
    """Drops the tracebacks of an exception and of the exceptions it was raised from.

    A traceback holds every frame the exception passed through, and each frame its locals:
    the request message, the decoded inputs, and the exception itself (``except ... as
    exc: ...; raise``), which makes a cycle only the cyclic collector frees. Without the
    tracebacks the frames go as soon as the call's references do.
    """
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        current.__traceback__ = None
        pending += [current.__cause__, current.__context__]
