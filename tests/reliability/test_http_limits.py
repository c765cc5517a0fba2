"""Slow clients, oversized heads and lying bodies: each gets a 4xx or a closed socket,
never a 5xx, and the server keeps serving everyone else."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from tests.e2e.serverproc import start_server

ROW = [0.0] * 64


def _connect(server) -> socket.socket:
    host, port = server.rest_url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _read_responses(sock: socket.socket, count: int) -> list[tuple[int, bytes]]:
    """Reads ``count`` responses (each framed by content-length) off one connection, in order."""
    buf = b""
    responses: list[tuple[int, bytes]] = []
    while len(responses) < count:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            head = buf[:end].decode("latin-1").split("\r\n")
            length = next(
                int(line.split(":", 1)[1]) for line in head[1:] if line.lower().startswith("content-length:")
            )
            if len(buf) >= end + 4 + length:
                responses.append((int(head[0].split()[1]), buf[end + 4 : end + 4 + length]))
                buf = buf[end + 4 + length :]
                continue
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    return responses


def _predict_ok(server) -> None:
    r = httpx.post(f"{server.rest_url}/v1/models/digits:predict", json={"instances": [ROW]}, timeout=10)
    assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def limited_server(hostile_repo):
    proc = start_server(
        hostile_repo, env={"MODELLOOP_HEADER_TIMEOUT_S": "1.5", "MODELLOOP_MAX_HEADER_BYTES": "16384"}
    )
    try:
        yield proc
    finally:
        proc.stop()


@pytest.mark.parametrize(
    "head",
    [
        b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n",
        b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-H%d: v\r\n" % i for i in range(3000))
        + b"\r\n",
        b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
    ids=["one-huge-header", "many-headers", "huge-url"],
)
def test_oversized_heads_get_431(limited_server, head):
    with _connect(limited_server) as sock:
        try:
            sock.sendall(head)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may close before the client finishes writing
        reply = _read_all(sock)
    # httptools itself refuses some malformed-by-size heads with 400 first; both are
    # client errors on a closed connection, and neither buffers the rest.
    assert reply.startswith((b"HTTP/1.1 431", b"HTTP/1.1 400")), reply[:120]
    if reply.startswith(b"HTTP/1.1 431"):
        assert b"request headers exceed 16384 bytes" in reply
    _predict_ok(limited_server)


def test_one_huge_header_gets_431_with_a_reason(limited_server):
    with _connect(limited_server) as sock:
        try:
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = _read_all(sock)
    assert reply.startswith(b"HTTP/1.1 431"), reply[:120]
    assert b'{"error":"request headers exceed 16384 bytes"}' in reply


def test_a_large_body_is_not_mistaken_for_a_large_head(limited_server):
    body = json.dumps({"instances": [ROW] * 8, "padding": "x" * 500_000}).encode()
    r = httpx.post(
        f"{limited_server.rest_url}/v1/models/digits:predict",
        content=body,
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert r.status_code != 431
    assert r.status_code < 500


def test_slow_head_gets_408_while_others_are_served(limited_server):
    idle = [_connect(limited_server) for _ in range(20)]  # connections that never send a byte
    slow = _connect(limited_server)
    try:
        started = time.monotonic()
        answer = b""
        for byte in b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n":
            try:
                slow.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            _predict_ok(limited_server)  # everyone else is served meanwhile
            time.sleep(0.1)
            if time.monotonic() - started > 4:
                break
        slow.settimeout(5)
        answer = _read_all(slow)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:120]
        for sock in idle:  # idle connections were closed after the head timeout too
            sock.settimeout(5)
            assert _read_all(sock) == b""
    finally:
        slow.close()
        for sock in idle:
            sock.close()
    _predict_ok(limited_server)


def test_body_shorter_than_content_length_then_close(limited_server):
    with _connect(limited_server) as sock:
        sock.sendall(
            b"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
            b'content-length: 5000\r\n\r\n{"instances": [[1, 2'
        )
        sock.shutdown(socket.SHUT_WR)
        reply = _read_all(sock)
    assert not reply.startswith(b"HTTP/1.1 5"), reply[:120]
    _predict_ok(limited_server)


def test_body_longer_than_content_length_is_cut_at_the_declared_length(limited_server):
    body = json.dumps({"instances": [ROW]}).encode()
    with _connect(limited_server) as sock:
        sock.sendall(
            b"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: " + str(len(body) - 10).encode() + b"\r\n\r\n" + body
        )
        reply = _read_all(sock)
    assert reply.startswith(b"HTTP/1.1 400"), reply[:200]  # the truncated JSON is malformed
    _predict_ok(limited_server)


LIVE = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"


def test_keep_alive_requests_share_one_connection(limited_server):
    with _connect(limited_server) as sock:
        for _ in range(5):
            sock.sendall(LIVE)
            [(status, _body)] = _read_responses(sock, 1)
            assert status == 200
            time.sleep(0.05)  # each head arrives on an idle keep-alive connection


def test_pipelined_requests_are_answered_in_order(limited_server):
    predict = json.dumps({"instances": [ROW]}).encode()
    post = (
        b"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(len(predict)).encode() + b"\r\n\r\n" + predict
    )
    with _connect(limited_server) as sock:
        sock.sendall(LIVE + post + LIVE + post)
        replies = _read_responses(sock, 4)
    assert [status for status, _ in replies] == [200, 200, 200, 200]
    assert b"predictions" in replies[1][1] and b"predictions" in replies[3][1]


def test_pipelined_heads_just_under_the_limit_are_served(limited_server):
    # Many heads near the limit in one stream: the byte count restarts with each head.
    head = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 15_000 + b"\r\n\r\n"
    with _connect(limited_server) as sock:
        sock.sendall(head * 6)
        replies = _read_responses(sock, 6)
    assert [status for status, _ in replies] == [200] * 6


def test_a_head_sent_in_small_pieces_under_the_limit_is_served(limited_server):
    head = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"p" * 12_000 + b"\r\n\r\n"
    with _connect(limited_server) as sock:
        for start in range(0, len(head), 1000):
            sock.sendall(head[start : start + 1000])
            time.sleep(0.005)
        [(status, _body)] = _read_responses(sock, 1)
    assert status == 200


def test_an_oversized_pipelined_head_is_refused_after_the_earlier_response(limited_server):
    # The 431 answers the second request, so it must come after the first one's 200,
    # never ahead of it on the wire.
    big = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n"
    with _connect(limited_server) as sock:
        try:
            sock.sendall(LIVE + big)
        except (BrokenPipeError, ConnectionResetError):
            pass
        replies = _read_responses(sock, 2)
        rest = _read_all(sock)
    assert [status for status, _ in replies] == [200, 431], replies
    assert replies[1][1] == b'{"error":"request headers exceed 16384 bytes"}'
    assert rest == b""  # and the connection is closed
    _predict_ok(limited_server)


def test_a_slow_pipelined_head_gets_408_after_the_earlier_response(limited_server):
    with _connect(limited_server) as sock:
        sock.sendall(LIVE + b"GET /v2/health/live HTTP/1.1\r\nHo")
        started = time.monotonic()
        replies = _read_responses(sock, 2)
        rest = _read_all(sock)
    assert [status for status, _ in replies] == [200, 408], replies
    # The second head was given its 1.5 s before the 408 (a lower bound: never flaky).
    assert time.monotonic() - started > 1.0
    assert rest == b""
