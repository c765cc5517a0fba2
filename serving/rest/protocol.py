"""uvicorn's httptools protocol with the two limits it lacks: header size and header time.

httptools buffers a request head of any size, and uvicorn waits for a head forever, so
one client could pin memory with a 100 MB header or hold connections open by sending a
byte a second. This protocol answers 431 when the head outgrows ``max_header_bytes``
and 408 when it is not complete ``header_timeout_s`` after its first byte (or after the
connection opened).

Neither uvicorn nor httptools offers these limits (uvicorn 0.54.0 has no head timeout for
either HTTP implementation; its h11 implementation bounds the head through
``h11_max_incomplete_event_size`` but answers a plain 400, and serves about 40% fewer
requests a second than httptools). So the limits are added here, by wrapping: each
override does its bookkeeping and then either calls the uvicorn method it overrides
through ``super()`` or, for a refused head, skips it. Nothing of uvicorn's method bodies is
copied, so an upgrade cannot leave a stale copy behind; tests/reliability/
test_http_head_guard.py fails if a wrapped method disappears or changes its parameters.
No override raises from a parser callback, since uvicorn turns any callback exception
into a 400: an over-limit head only sets a flag, and the 431 is sent once the parser has
returned. The overrides on the per-request path call uvicorn's method by its class
(``HttpToolsProtocol.on_header(self, ...)``) rather than through ``super()``, and one timer per
connection watches the head's deadline: each request costs the guard a few attribute
writes, not a timer.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

DEFAULT_MAX_HEADER_BYTES = 64 * 1024
DEFAULT_HEADER_TIMEOUT_S = 10.0

_HEADER_OVERHEAD = len(b": \r\n")  # what httptools strips around each header it reports


# Bodies up to this size are joined with their head into one write; larger ones go as two
# writes, since copying them would cost more than the extra system call.
_JOIN_LIMIT = 64 * 1024


class CoalescingTransport:
    """A transport that sends a response's head together with the first piece of its body.

    uvicorn writes the status line and headers as soon as the app starts the response, and
    the body when it comes: two system calls and two TCP segments per response (with
    ``TCP_NODELAY``), where one does. This wrapper holds a response head back and writes it
    with the next write; :meth:`flush` (called when a response completes, and on close)
    sends a head whose body never comes (HEAD, 204). ``100 Continue`` is never held, since
    the client waits for it before it sends the body. Everything else is the transport's.

    Args:
        transport: The connection's transport.
    """

    __slots__ = ("_held", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        """Writes ``data``, after a held head; holds ``data`` if it is a response head."""
        held = self._held
        if held is not None:
            self._held = None
            if len(data) <= _JOIN_LIMIT:
                self._transport.write(held + data)
            else:
                self._transport.write(held)
                self._transport.write(data)
            return
        if data.startswith(b"HTTP/1.1 ") and not data.startswith(b"HTTP/1.1 100 "):
            self._held = data
            return
        self._transport.write(data)

    def flush(self) -> None:
        """Writes a held head now."""
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held)

    def is_closing(self) -> bool:
        """Whether the transport is closing (asked twice a request: not left to ``__getattr__``)."""
        return self._transport.is_closing()

    def close(self) -> None:
        """Flushes, then closes the transport."""
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def _response(status: bytes, message: bytes) -> bytes:
    """Builds a complete, closing HTTP/1.1 response with a JSON error body.

    Args:
        status: The status code and reason phrase, e.g. ``b"408 Request Timeout"``.
        message: The error text, placed as is in ``{"error": ...}`` (no JSON escaping).

    Returns:
        The response bytes, ready to write to the transport.
    """
    body = b'{"error":"' + message + b'"}'
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol that bounds the bytes and the time a request head may take.

    Two counts bound the size. ``_head_bytes`` counts the raw bytes received while a head
    is incomplete; it catches a head that is still arriving, such as one huge header value
    that httptools buffers internally and reports only once complete. ``_head_size`` counts
    what the parser reports (URL and headers); it catches a head that arrives whole in one
    read, including a pipelined head that starts in the middle of a read. Memory per
    connection is therefore bounded by ``max_header_bytes`` plus one transport read.

    Attributes:
        max_header_bytes: Largest request head accepted, in bytes.
        header_timeout_s: Seconds a head may take, from its first byte or from the
            connection opening, whichever is earlier (see ``_check_head``).
    """

    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Creates the protocol; arguments are passed to ``HttpToolsProtocol`` unchanged.

        Args:
            *args: Positional arguments for ``HttpToolsProtocol``.
            **kwargs: Keyword arguments for ``HttpToolsProtocol``.
        """
        super().__init__(*args, **kwargs)
        # True while the bytes arriving belong to a head: from connection start or the end
        # of a message, until the head's headers are complete.
        self._in_head = True
        self._head_begun = False  # the parser has seen the first byte of the current head
        self._head_bytes = 0  # raw bytes received while the head is incomplete
        self._head_size = 0  # bytes of URL and headers parsed so far
        self._over_limit = False  # the current head outgrew max_header_bytes
        self._reply: bytes | None = None  # the 408/431 decided on, sent or waiting to be
        # When the current head must be complete (loop time), None while no head is timed.
        # One timer per connection checks it (see _check_head): arming and cancelling a
        # timer for every request would cost more than the rest of the guard.
        self._head_deadline: float | None = None
        self._head_timer: asyncio.TimerHandle | None = None

    # Connection events

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Starts the head timer as the connection opens, so a silent client is dropped too.

        Args:
            transport: The connection's transport.
        """
        super().connection_made(transport)
        # Everything uvicorn writes, its response cycles included, goes through the wrapper.
        self.transport = CoalescingTransport(transport)  # type: ignore[assignment]
        self._head_deadline = self.loop.time() + self.header_timeout_s
        self._arm_head_timer(self._head_deadline)

    def connection_lost(self, exc: Exception | None) -> None:
        """Cancels the head timer before uvicorn tears the connection down.

        Args:
            exc: The error that closed the connection, or None on a clean close.
        """
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Feeds ``data`` to uvicorn's parser, then refuses a head that is over the limit.

        Args:
            data: Bytes read from the connection.
        """
        if self._reply is not None:
            # Refused: whatever else the client sends is dropped, never parsed or buffered.
            return
        if self._in_head:
            # Counted before parsing because httptools holds a partial header value until it
            # is complete. If this read completes the head, on_headers_complete clears the
            # count, so a body that shares the read with its head is not mistaken for head.
            self._head_bytes += len(data)
        HttpToolsProtocol.data_received(self, data)
        if self.transport.is_closing():
            return  # uvicorn refused the request itself (400) or the client went away
        if self._over_limit or (self._in_head and self._head_bytes > self.max_header_bytes):
            self._reject_too_large()

    def send_400_response(self, msg: str) -> None:
        """Answers 431 instead of uvicorn's 400 when the head was already over the limit.

        The parser goes on parsing the rest of a read after a callback flags the head, and
        may find it malformed; the size is still the better reason to give the client.

        Args:
            msg: uvicorn's message for the 400.
        """
        if self._over_limit:
            self._reject_too_large()
        else:
            super().send_400_response(msg)

    def on_response_complete(self) -> None:
        """Sends a held head, and a 408/431 held back until the earlier pipelined responses were written."""
        self.transport.flush()  # type: ignore[attr-defined]
        HttpToolsProtocol.on_response_complete(self)
        if self._reply is not None and not self._answering():
            self._send_reply()

    # Parser callbacks. Once a head is over the limit each one returns without calling
    # uvicorn: the rest of the read is parsed, but nothing is buffered or dispatched.

    def on_message_begin(self) -> None:
        """Starts the count for a new head and, unless one runs (the connection's first), its time."""
        if self._over_limit:
            return
        HttpToolsProtocol.on_message_begin(self)
        self._in_head = True
        self._head_begun = True
        self._head_size = 0
        if self._head_deadline is None:
            self._head_deadline = self.loop.time() + self.header_timeout_s

    def on_url(self, url: bytes) -> None:
        """Counts a piece of the URL (httptools may report it in several pieces).

        Args:
            url: The next piece of the request target.
        """
        if self._over_limit:
            return
        self._head_size += len(url)
        if self._head_size > self.max_header_bytes:
            self._flag_over_limit()
            return
        HttpToolsProtocol.on_url(self, url)

    def on_header(self, name: bytes, value: bytes) -> None:
        """Counts one complete header line.

        Args:
            name: The header name.
            value: The header value.
        """
        if self._over_limit:
            return
        self._head_size += len(name) + len(value) + _HEADER_OVERHEAD
        if self._head_size > self.max_header_bytes:
            self._flag_over_limit()
            return
        HttpToolsProtocol.on_header(self, name, value)

    def on_headers_complete(self) -> None:
        """Ends the head: stops its time and count before uvicorn dispatches the request."""
        if self._over_limit:
            return
        self._in_head = False
        self._head_begun = False
        self._head_bytes = 0
        self._head_deadline = None
        HttpToolsProtocol.on_headers_complete(self)

    def on_body(self, body: bytes) -> None:
        """Passes a body piece to uvicorn unless the request's head was refused.

        Args:
            body: The next piece of the request body.
        """
        if self._over_limit:
            return
        HttpToolsProtocol.on_body(self, body)

    def on_message_complete(self) -> None:
        """Marks the bytes that follow as the next head, so they are counted from the start."""
        if self._over_limit:
            return
        HttpToolsProtocol.on_message_complete(self)
        self._in_head = True
        self._head_bytes = 0

    # The limits

    def _flag_over_limit(self) -> None:
        """Marks the head as over the limit and drops what uvicorn buffered of it."""
        self._over_limit = True
        # Without these headers uvicorn cannot mistake the refused head for a WebSocket
        # upgrade if the parser reports one for it.
        self.headers.clear()
        self.url = b""

    def _arm_head_timer(self, when: float) -> None:
        """(Re)starts the head timer to check the head at loop time ``when``."""
        self._cancel_head_timer()
        self._head_timer = self.loop.call_at(when, self._check_head)

    def _cancel_head_timer(self) -> None:
        """Stops the head timer, if it runs."""
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _check_head(self) -> None:
        """Answers 408 to a head still incomplete at its deadline, or checks again later.

        A silent connection (no request ever began) is closed without an answer. Between
        heads, and while a request is read or answered, the timer only looks again one
        timeout later. The limit counts only time spent waiting on the client: while an
        earlier request on the connection is still being answered, the head's time starts
        over.
        """
        self._head_timer = None
        if self.transport.is_closing():
            return
        now = self.loop.time()
        deadline = self._head_deadline
        if deadline is None or not self._in_head:
            self._arm_head_timer(now + self.header_timeout_s)
        elif now < deadline:
            self._arm_head_timer(deadline)
        elif self._answering():
            # The head is pipelined behind a request still being answered, so the wait may
            # be the server's: uvicorn stops reading while a queued request waits its turn,
            # and a client may hold the rest until it has its answer. Time it from scratch.
            self._head_deadline = now + self.header_timeout_s
            self._arm_head_timer(self._head_deadline)
        elif self._head_begun:
            self._reject(b"408 Request Timeout", b"request headers not received in time")
        else:
            # No head begun by the deadline set when the connection opened: no request was
            # ever made here, so there is no one to answer; just close.
            self.transport.close()

    def _reject_too_large(self) -> None:
        """Refuses the current head with 431."""
        message = b"request headers exceed %d bytes" % self.max_header_bytes
        self._reject(b"431 Request Header Fields Too Large", message)

    def _reject(self, status: bytes, message: bytes) -> None:
        """Refuses the current head and closes the connection.

        Args:
            status: The status code and reason phrase.
            message: The error text for the JSON body.
        """
        self._cancel_head_timer()
        if self._reply is not None:
            return
        self._reply = _response(status, message)
        if self._answering():
            # An earlier pipelined request is still being answered. Writing now would put
            # this reply ahead of (or inside) that response, so read no more and send it
            # from on_response_complete once every earlier response is out.
            self.flow.pause_reading()
        else:
            self._send_reply()

    def _answering(self) -> bool:
        """Tells whether a response to an earlier request on this connection is unfinished.

        Returns:
            True while the latest dispatched request has not been fully answered. uvicorn
            answers pipelined requests in order, so that one finishes last.
        """
        return self.cycle is not None and not self.cycle.response_complete

    def _send_reply(self) -> None:
        """Writes the decided 408/431 and closes the connection."""
        if self._reply is not None and not self.transport.is_closing():
            self.transport.write(self._reply)
            self.transport.close()


def guarded_protocol(max_header_bytes: int, header_timeout_s: float) -> type[GuardedHttpToolsProtocol]:
    """Builds a :class:`GuardedHttpToolsProtocol` subclass with these limits.

    Args:
        max_header_bytes: Largest request head accepted, in bytes.
        header_timeout_s: Seconds a request head may take to arrive.

    Returns:
        A protocol class to pass as ``uvicorn.Config(http=...)``.
    """
    return type(
        "GuardedHttpToolsProtocol",
        (GuardedHttpToolsProtocol,),
        {"max_header_bytes": max_header_bytes, "header_timeout_s": header_timeout_s},
    )
