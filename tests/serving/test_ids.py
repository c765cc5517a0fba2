"""Request ids (``serving/ids.py``) and the REST socket's TCP_NODELAY (``rest.server.bind_rest_socket``)."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest

from modelloop.serving.ids import RequestIdSource, new_request_id
from modelloop.serving.rest.server import bind_rest_socket


def test_ids_are_32_hex_characters_and_unique_across_blocks() -> None:
    source = RequestIdSource(block_bytes=64)  # 4 ids per block: crosses many refills
    ids = [source.new() for _ in range(1000)]
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert len(set(ids)) == len(ids)
    assert len(new_request_id()) == 32 and new_request_id() != new_request_id()


def test_ids_are_unique_across_threads() -> None:
    source = RequestIdSource(block_bytes=128)
    seen: list[list[str]] = [[] for _ in range(4)]

    def take(out: list[str]) -> None:
        out.extend(source.new() for _ in range(500))

    threads = [threading.Thread(target=take, args=(out,)) for out in seen]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = [i for out in seen for i in out]
    assert len(set(flat)) == 2000


def test_block_size_must_hold_whole_ids() -> None:
    with pytest.raises(ValueError):
        RequestIdSource(block_bytes=10)


async def test_rest_connections_get_tcp_nodelay() -> None:
    # Without it, Nagle and delayed ACKs add ~40 ms to every keep-alive response.
    sock = bind_rest_socket("127.0.0.1", 0)
    accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = writer.get_extra_info("socket")
        accepted.set_result(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(on_connect, sock=sock)
    try:
        _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        assert await asyncio.wait_for(accepted, 5) != 0
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
