"""The head guard driven directly, without a server: the corners the socket tests in
test_http_limits.py cannot aim at, and the uvicorn hooks the guard relies on.

The guard wraps uvicorn's ``HttpToolsProtocol`` instead of copying it, so a uvicorn
upgrade cannot leave a stale copy behind; what it can do is rename or reshape a method
the guard overrides, which would silently bypass a limit. The first tests fail loudly
then.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from modelloop.serving.rest.protocol import GuardedHttpToolsProtocol, guarded_protocol

LIMIT = 1024
RESYNC = "uvicorn changed HttpToolsProtocol; re-check serving/rest/protocol.py against it"


# What the guard uses of uvicorn beyond the methods it overrides.
USED_METHODS = ("send_400_response", "on_response_complete")
USED_ATTRIBUTES = ("transport", "flow", "loop", "cycle", "headers", "url", "parser")


def test_every_override_wraps_an_existing_uvicorn_method():
    overrides = [
        name
        for name, value in vars(GuardedHttpToolsProtocol).items()
        if inspect.isfunction(value) and not (name.startswith("_") and name != "__init__")
    ]
    assert "data_received" in overrides and "on_header" in overrides
    for name in overrides:
        assert inspect.isfunction(getattr(HttpToolsProtocol, name, None)), f"{RESYNC}: {name} is gone"
        if name == "__init__":
            continue  # passes everything through
        ours = list(inspect.signature(getattr(GuardedHttpToolsProtocol, name)).parameters)
        theirs = list(inspect.signature(getattr(HttpToolsProtocol, name)).parameters)
        assert ours == theirs, f"{RESYNC}: {name}{theirs} now, wrapped as {name}{ours}"


async def test_the_uvicorn_state_the_guard_reads_still_exists():
    protocol, _transport, _calls = _protocol()
    for name in USED_METHODS:
        assert callable(getattr(protocol, name, None)), f"{RESYNC}: {name} is gone"
    protocol.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    for name in USED_ATTRIBUTES:
        assert hasattr(protocol, name), f"{RESYNC}: attribute {name} is gone"
    assert hasattr(protocol.cycle, "response_complete"), f"{RESYNC}: cycle.response_complete is gone"
    await asyncio.sleep(0)


class FakeTransport(asyncio.Transport):
    """Collects what the protocol writes; reads are never really paused."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False
        self.reading = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"peername": ("127.0.0.1", 5000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


def _protocol(
    timeout_s: float = 10.0, hold: asyncio.Event | None = None
) -> tuple[GuardedHttpToolsProtocol, FakeTransport, list[str]]:
    """A connected guard with a 1 KiB limit over an app that records the paths it serves."""
    calls: list[str] = []

    async def app(scope, receive, send) -> None:
        calls.append(scope["path"])
        if hold is not None:
            await hold.wait()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    config = Config(app=app, lifespan="off", log_level="critical")
    config.load()
    cls = guarded_protocol(LIMIT, timeout_s)
    protocol = cls(config=config, server_state=ServerState(), app_state={}, _loop=asyncio.get_running_loop())
    transport = FakeTransport()
    protocol.connection_made(transport)
    return protocol, transport, calls


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def _until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Lets the loop run (and the guard's timers fire) until ``predicate`` holds."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


async def test_a_head_over_the_limit_in_one_read_gets_431_and_never_reaches_the_app():
    protocol, transport, calls = _protocol()
    protocol.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-A: aaaaaaaa\r\n" * 200 + b"\r\n")
    await _settle()
    assert transport.written.startswith(b"HTTP/1.1 431 ")
    assert transport.written.endswith(b'{"error":"request headers exceed 1024 bytes"}')
    assert transport.closed and calls == []
    protocol.connection_lost(None)


async def test_a_header_value_still_arriving_is_refused_once_the_bytes_pass_the_limit():
    protocol, transport, _calls = _protocol()
    protocol.data_received(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 600)
    assert not transport.closed
    protocol.data_received(b"a" * 600)  # still no end to the header: refused on bytes alone
    assert transport.written.startswith(b"HTTP/1.1 431 ") and transport.closed
    protocol.data_received(b"a" * 10_000)  # anything later is dropped, not parsed
    assert transport.written.count(b"HTTP/1.1") == 1
    protocol.connection_lost(None)


async def test_a_head_that_is_also_malformed_gets_431_not_400():
    protocol, transport, _calls = _protocol()
    # X-Big is reported (and flagged) when the next header starts; the bad one follows.
    protocol.data_received(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 2000 + b"\r\nOk: 1\r\nBad Header\r\n\r\n")
    assert transport.written.startswith(b"HTTP/1.1 431 "), bytes(transport.written[:60])
    protocol.connection_lost(None)


async def test_an_oversized_head_asking_for_a_websocket_upgrade_gets_431():
    protocol, transport, calls = _protocol()
    protocol.data_received(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"X-Big: " + b"a" * 2000 + b"\r\n\r\n"
    )
    await _settle()
    assert transport.written.startswith(b"HTTP/1.1 431 ") and calls == []
    protocol.connection_lost(None)


async def test_a_small_head_with_a_large_body_in_the_same_read_is_served():
    protocol, transport, calls = _protocol()
    body = b"x" * 50_000
    protocol.data_received(b"POST /up HTTP/1.1\r\nHost: x\r\ncontent-length: 50000\r\n\r\n" + body[:20_000])
    protocol.data_received(body[20_000:])
    await _settle()
    assert transport.written.startswith(b"HTTP/1.1 200 "), bytes(transport.written[:60])
    assert calls == ["/up"] and not transport.closed
    protocol.connection_lost(None)


async def test_the_count_restarts_for_each_request_on_a_connection():
    protocol, transport, calls = _protocol()
    head = b"GET /%d HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 900 + b"\r\n\r\n"
    for i in range(4):
        protocol.data_received(head % i)
        await _settle()
    protocol.data_received(b"".join(head % i for i in range(4, 8)))  # pipelined, in one read
    await _settle()
    assert calls == [f"/{i}" for i in range(8)]
    assert transport.written.count(b"HTTP/1.1 200 ") == 8 and not transport.closed
    protocol.connection_lost(None)


async def test_an_oversized_pipelined_head_waits_for_the_earlier_response():
    hold = asyncio.Event()
    protocol, transport, calls = _protocol(hold=hold)
    # The second head starts mid-read, so its bytes in this read are not counted (the
    # parser does not say where it started): the bound is the limit plus one read.
    protocol.data_received(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\nGET /second HTTP/1.1\r\nX-Big: aaa")
    await _settle()
    assert calls == ["/first"] and not transport.closed
    protocol.data_received(b"a" * (LIMIT + 1))
    await _settle()
    assert transport.written == b"" and not transport.reading  # refused, held back, reading stopped
    hold.set()
    await _settle()
    first, _, second = bytes(transport.written).partition(b"okHTTP/1.1 ")
    assert first.startswith(b"HTTP/1.1 200 ") and second.startswith(b"431 "), bytes(transport.written)
    assert transport.closed and calls == ["/first"]
    protocol.connection_lost(None)


async def test_an_oversized_pipelined_head_whole_in_one_read_is_caught_by_the_parsed_count():
    hold = asyncio.Event()
    protocol, transport, calls = _protocol(hold=hold)
    protocol.data_received(
        b"GET /first HTTP/1.1\r\nHost: x\r\n\r\nGET /second HTTP/1.1\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n"
    )
    await _settle()
    assert transport.written == b"" and not transport.reading
    hold.set()
    await _settle()
    assert bytes(transport.written).partition(b"okHTTP/1.1 ")[2].startswith(b"431 ")
    assert transport.closed and calls == ["/first"]
    protocol.connection_lost(None)


async def test_a_slow_head_gets_408_and_a_silent_connection_is_closed_quietly():
    protocol, transport, _calls = _protocol(timeout_s=0.05)
    protocol.data_received(b"GET / HTTP/1.1\r\nHo")
    await _until(lambda: transport.closed)
    assert transport.written.startswith(b"HTTP/1.1 408 ")
    assert transport.written.endswith(b'{"error":"request headers not received in time"}')
    protocol.connection_lost(None)

    silent, transport, _calls = _protocol(timeout_s=0.05)
    await _until(lambda: transport.closed)
    assert transport.written == b""
    silent.connection_lost(None)


async def test_the_head_timer_waits_while_an_earlier_response_is_being_written():
    hold = asyncio.Event()
    protocol, transport, _calls = _protocol(timeout_s=0.05, hold=hold)
    protocol.data_received(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\nGET /next HTTP/1.1\r\nHo")
    await asyncio.sleep(0.15)  # three timeouts, all while /slow is still being answered
    assert transport.written == b"" and not transport.closed
    hold.set()
    await _until(lambda: transport.closed)  # now the client is the one keeping the head waiting
    reply = bytes(transport.written)
    assert reply.startswith(b"HTTP/1.1 200 ") and b"HTTP/1.1 408 " in reply
    protocol.connection_lost(None)


async def test_a_head_completed_in_time_is_not_timed_out_later():
    protocol, transport, calls = _protocol(timeout_s=0.05)
    protocol.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.sleep(0.1)
    assert calls == ["/"] and transport.written.startswith(b"HTTP/1.1 200 ") and not transport.closed
    protocol.connection_lost(None)


def test_guarded_protocol_sets_the_limits_on_a_new_class():
    cls = guarded_protocol(LIMIT, 3.5)
    assert issubclass(cls, GuardedHttpToolsProtocol) and cls is not GuardedHttpToolsProtocol
    assert (cls.max_header_bytes, cls.header_timeout_s) == (LIMIT, 3.5)


async def test_a_head_after_an_idle_spell_gets_its_whole_time():
    protocol, transport, calls = _protocol(timeout_s=0.1)
    protocol.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.sleep(0.35)  # idle between requests: several of the connection's checks pass
    assert calls == ["/"] and not transport.closed
    started = asyncio.get_running_loop().time()
    protocol.data_received(b"GET /next HTTP/1.1\r\nHo")
    await _until(lambda: transport.closed)
    waited = asyncio.get_running_loop().time() - started
    assert b"HTTP/1.1 408 " in bytes(transport.written)
    assert waited >= 0.099, f"the head was refused {waited:.3f} s after its first byte, before its 0.1 s"
    protocol.connection_lost(None)
