"""uvicorn's httptools protocol with the two limits it lacks: header size and header time.

httptools buffers a request head of any size, and uvicorn waits for a head forever, so
one client could pin memory with a 100 MB header or hold connections open by sending a
byte a second. This protocol answers 431 when the head outgrows ``max_header_bytes``
and 408 when it is not complete ``header_timeout_s`` after its first byte (or after the
connection opened).
"""

from __future__ import annotations

import asyncio
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

DEFAULT_MAX_HEADER_BYTES = 64 * 1024
DEFAULT_HEADER_TIMEOUT_S = 10.0


def _response(status: bytes, message: bytes) -> bytes:
    body = b'{"error":"' + message + b'"}'
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


class _HeadTooLarge(Exception):
    """Raised from a parser callback to stop parsing a head that is over the limit."""


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol that bounds the bytes and the time a request head may take."""

    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True
        self._head_bytes = 0  # raw bytes received while the head is incomplete
        self._head_size = 0  # bytes of request line and headers parsed so far
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # uvicorn's own data_received, plus the head limits. It cannot be reused through
        # super(): it turns every callback exception into a 400.
        if self._in_head:
            self._head_bytes += len(data)
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _HeadTooLarge):
                self._reject_too_large()
                return
            self.logger.warning("Invalid HTTP request received.")
            self.send_400_response("Invalid HTTP request received.")
            return
        except httptools.HttpParserError:
            self.logger.warning("Invalid HTTP request received.")
            self.send_400_response("Invalid HTTP request received.")
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        # A head still incomplete after this many bytes is refused before it grows more.
        if self._in_head and self._head_bytes > self.max_header_bytes and not self.transport.is_closing():
            self._reject_too_large()

    def on_url(self, url: bytes) -> None:
        self._head_size += len(url)
        if self._head_size > self.max_header_bytes:
            raise _HeadTooLarge
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        if self._head_size > self.max_header_bytes:
            raise _HeadTooLarge
        super().on_header(name, value)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_size = 0
        if self._head_timer is None:
            self._arm_head_timer()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._cancel_head_timer()
        super().on_headers_complete()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._in_head and self._head_bytes and not self.transport.is_closing():
            self._reject(b"408 Request Timeout", b"request headers not received in time")
        elif self._in_head and not self.transport.is_closing() and self.cycle is None:
            # A connection that never sent a byte: close it quietly.
            self.transport.close()

    def _reject_too_large(self) -> None:
        message = b"request headers exceed %d bytes" % self.max_header_bytes
        self._reject(b"431 Request Header Fields Too Large", message)

    def _reject(self, status: bytes, message: bytes) -> None:
        self._cancel_head_timer()
        self.transport.write(_response(status, message))
        self.transport.close()


def guarded_protocol(max_header_bytes: int, header_timeout_s: float) -> type[GuardedHttpToolsProtocol]:
    """A :class:`GuardedHttpToolsProtocol` subclass with these limits, for ``uvicorn.Config(http=...)``."""
    return type(
        "GuardedHttpToolsProtocol",
        (GuardedHttpToolsProtocol,),
        {"max_header_bytes": max_header_bytes, "header_timeout_s": header_timeout_s},
    )
