"""HTTP plumbing both REST dialects share: request ids, content types and the body limit."""

from __future__ import annotations

import zlib

from fastapi import Request

from modelloop.errors import ErrorCode
from modelloop.serving.errors import ServingError
from modelloop.serving.ids import new_request_id

REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_ID_LENGTH = 128

# `curl -d` sends application/x-www-form-urlencoded, and TF Serving's own REST examples use
# `curl -d '{"instances": ...}'`; TF Serving ignores the content type, so these must work.
_JSON_MEDIA_TYPES = frozenset({"application/json", "application/x-www-form-urlencoded"})
BINARY_MEDIA_TYPE = "application/octet-stream"
# zlib wbits: gzip wrapper and zlib wrapper (HTTP "deflate" is zlib-wrapped, RFC 9110 8.4.1.2).
_DECODERS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def valid_request_id(value: str) -> bool:
    """Whether a client's request id may be kept: 1..128 printable ASCII characters."""
    return 0 < len(value) <= MAX_REQUEST_ID_LENGTH and value.isascii() and value.isprintable()


def request_id(request: Request, fallback: str | None = None) -> str:
    """The request's id: the client's ``x-request-id`` if valid, else ``fallback`` if valid,
    else a fresh random 32-hex id.

    Args:
        request: The HTTP request.
        fallback: A second candidate (the OIP body ``id``). Defaults to None.

    Returns:
        The id to log, pass on and echo in ``x-request-id``.
    """
    for candidate in (request.headers.get(REQUEST_ID_HEADER), fallback):
        if candidate is not None and valid_request_id(candidate):
            return candidate
    return new_request_id()  # uuid4().hex costs a syscall and an object per request


def check_content_type(request: Request, *, binary: bool = False) -> bool:
    """Accepts JSON bodies (and, when ``binary``, the octet-stream of Triton's extension).

    A missing content type is accepted: tritonclient and many scripts send none.

    Args:
        request: The HTTP request.
        binary: Whether ``application/octet-stream`` is allowed. Defaults to False.

    Returns:
        Whether the body was declared binary.

    Raises:
        ServingError: UNSUPPORTED_MEDIA_TYPE for any other content type.
    """
    raw = request.headers.get("content-type")
    if raw is None:
        return False
    media = raw.split(";", 1)[0].strip().lower()
    if not media or media in _JSON_MEDIA_TYPES or media.endswith("+json"):
        return False
    if binary and media == BINARY_MEDIA_TYPE:
        return True
    accepted = "application/json" + (f" or {BINARY_MEDIA_TYPE}" if binary else "")
    raise ServingError(
        f"unsupported content type {media!r}; send {accepted}", ErrorCode.UNSUPPORTED_MEDIA_TYPE
    )


def _too_large(limit: int, what: str = "request body") -> ServingError:
    return ServingError(
        f"{what} is larger than the limit of {limit} bytes (max_body_bytes)", ErrorCode.PAYLOAD_TOO_LARGE
    )


async def read_body(request: Request, limit: int) -> bytes:
    """Reads the body, refusing it as soon as it is known to exceed ``limit``.

    ``Content-Length`` is checked before reading; a chunked body is counted while it
    streams in, so an oversized upload is never held in memory whole. A gzip or deflate
    ``Content-Encoding`` (tritonclient's request compression) is undone, and the
    decompressed size is held to the same limit.

    Args:
        request: The HTTP request.
        limit: The most bytes accepted.

    Returns:
        The body, decompressed.

    Raises:
        ServingError: PAYLOAD_TOO_LARGE beyond the limit, INVALID_ARGUMENT for a bad
            Content-Length or a corrupt compressed body, UNSUPPORTED_MEDIA_TYPE for an
            unknown Content-Encoding.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ServingError(f"invalid Content-Length {declared!r}", ErrorCode.INVALID_ARGUMENT)
        if int(declared) > limit:
            raise _too_large(limit)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", "") and encoding not in _DECODERS:
        raise ServingError(
            f"unsupported Content-Encoding {encoding!r}; use gzip, deflate or none",
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
        )
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    body = b"".join(chunks)
    if encoding in _DECODERS:
        body = _decompress(body, _DECODERS[encoding], limit)
    return body


def _decompress(body: bytes, wbits: int, limit: int) -> bytes:
    decoder = zlib.decompressobj(wbits)
    try:
        # max_length bounds the output, so a small "zip bomb" cannot exhaust memory.
        out = decoder.decompress(body, limit + 1)
        if len(out) > limit or decoder.unconsumed_tail:
            raise _too_large(limit, "decompressed request body")
        out += decoder.flush()
    except zlib.error as error:
        raise ServingError(f"corrupt compressed request body: {error}", ErrorCode.INVALID_ARGUMENT) from None
    if len(out) > limit:
        raise _too_large(limit, "decompressed request body")
    return out
