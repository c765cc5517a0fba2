"""Runs the REST app on uvicorn: the listening socket and the server, for the composition root.

The composition root binds the socket first (so that a busy port fails before any model
loads), builds the server with :func:`create_rest_server`, serves on the socket, and
stops it by setting ``should_exit``. The root owns the signals, not uvicorn.

Example:

```python
sock = bind_rest_socket("127.0.0.1", 8501)
rest = create_rest_server(app, settings)
task = asyncio.create_task(rest.serve(sockets=[sock]))
...
rest.should_exit = True
await task
```
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING

import uvicorn

from modelloop.serving.rest.protocol import guarded_protocol

if TYPE_CHECKING:
    from fastapi import FastAPI

    from modelloop.serving.settings import ServingSettings


class RestServer(uvicorn.Server):
    """uvicorn without its own signal handling: the composition root owns SIGTERM/SIGINT.

    uvicorn's handlers would re-raise the signal after shutdown and kill the process
    before the gRPC server and the models are drained.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Installs nothing."""
        yield


def bind_rest_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A listening, non-blocking TCP socket for the REST port.

    Args:
        host: Interface (``127.0.0.1``, ``0.0.0.0``, ``::1``).
        port: Port; 0 picks a free one.
        reuse_port: Share the port with the other workers of this server
            (``SO_REUSEPORT``: the kernel spreads connections over the listening sockets).
            Defaults to False.

    Returns:
        The socket.

    Raises:
        OSError: The address cannot be bound; the message names it.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets whose proto says TCP; with
    # proto 0 Nagle holds each response's body behind its headers for a delayed ACK (~40 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot bind REST port {host}:{port}: {exc.strerror}") from exc
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def create_rest_server(app: FastAPI, settings: ServingSettings) -> RestServer:
    """The uvicorn server for ``app``, with the project's limits and TLS settings.

    Args:
        app: The REST app.
        settings: Reads ``grace_period_s``, ``max_header_bytes``, ``header_timeout_s`` and
            the TLS files.

    Returns:
        The server; call ``serve(sockets=[...])``.
    """
    config = uvicorn.Config(
        app,
        lifespan="off",
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=max(int(settings.grace_period_s), 1),
        # The data plane bounds the work; this only caps sockets per process.
        limit_concurrency=None,
        # Nothing here reads the client address, so skip rewriting it from X-Forwarded-For
        # on every request (a middleware uvicorn wraps around the app by default).
        proxy_headers=False,
        # httptools with bounded head size and time (uvicorn has neither limit).
        http=guarded_protocol(settings.max_header_bytes, settings.header_timeout_s),
        ssl_certfile=str(settings.tls_cert_file) if settings.tls_cert_file else None,
        ssl_keyfile=str(settings.tls_key_file) if settings.tls_key_file else None,
    )
    return RestServer(config)
