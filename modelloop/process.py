"""What a server process shares with whoever started it.

Its bound addresses and the lines that print them, the error that stops its start-up, and,
as one worker of ``modelloop serve --workers N``, its place among the workers and its end
of the socket to the supervisor (:mod:`modelloop.workers` holds the other end). Light on
imports, so the supervisor and ``modelloop up`` use it without importing the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from modelloop.errors import ModelloopError


@dataclass(frozen=True)
class BoundAddresses:
    """Where the server listens, after port 0 has been resolved."""

    host: str
    rest_port: int
    grpc_port: int
    tls: bool = False

    @property
    def rest_url(self) -> str:
        """Base URL of the REST port."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.rest_port}"

    @property
    def grpc_target(self) -> str:
        """``host:port`` of the gRPC port."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.grpc_port}"


class ServerError(ModelloopError):
    """The server cannot start: bad repository, address in use, bad settings."""


@dataclass(frozen=True)
class WorkerRole:
    """A server's place among the workers of ``modelloop serve --workers N``.

    Attributes:
        index: This worker's number, from 0.
        count: Workers in all.
        link_fd: The file descriptor of the socket to the supervisor.
        metrics_dir: prometheus_client's multiprocess directory (``PROMETHEUS_MULTIPROC_DIR``).
    """

    index: int
    count: int
    link_fd: int
    metrics_dir: Path

    @property
    def leader(self) -> bool:
        """Worker 0 runs what must run once: the in-process rules and the store's retention."""
        return self.index == 0


class SupervisorLink:
    """This worker's end of the socket to the supervisor: one JSON object per line.

    Args:
        fd: The socket's file descriptor (inherited from the supervisor).
    """

    def __init__(self, fd: int) -> None:
        self._sock = socket.socket(fileno=fd)
        self._writer: asyncio.StreamWriter | None = None
        self._reader: asyncio.StreamReader | None = None

    async def open(self) -> None:
        """Wraps the socket in asyncio streams (on the running loop)."""
        self._reader, self._writer = await asyncio.open_connection(sock=self._sock)

    def send(self, message: dict[str, Any]) -> None:
        """Queues one message to the supervisor (never blocks)."""
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write((json.dumps(message) + "\n").encode())

    async def messages(self) -> AsyncIterator[dict[str, Any]]:
        """Yields the supervisor's messages until it goes away (call :meth:`open` first)."""
        reader = self._reader
        if reader is None:
            raise RuntimeError("the supervisor link is not open")
        while line := await reader.readline():
            with contextlib.suppress(ValueError):
                message = json.loads(line)
                if isinstance(message, dict):
                    yield message

    def close(self) -> None:
        """Closes the socket."""
        if self._writer is not None:
            self._writer.close()
        else:
            self._sock.close()


def print_addresses(addresses: BoundAddresses, stream: TextIO | None = None) -> None:
    """Prints the bound ports in the lines tests and users read."""
    out = stream if stream is not None else sys.stdout
    print(f"modelloop: REST listening on {addresses.rest_url}", file=out)
    print(f"modelloop: gRPC listening on {addresses.grpc_target}", file=out)
    out.flush()
