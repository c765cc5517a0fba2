"""``modelloop serve --workers N``: N server processes behind one REST port and one gRPC port.

One process serves requests on one core. To use more, the supervisor (this module, the
process the user started) runs N worker processes, each a whole server with its own
registry, batchers and runtimes, all listening on the same two ports through
``SO_REUSEPORT``: the kernel spreads incoming connections over them. The supervisor:

- reserves both ports first (so a busy port fails before any worker starts, and port 0
  resolves to one port for every worker), keeping a bound socket on each until it exits;
- starts the workers and prints the addresses once every worker is ready;
- restarts a worker that dies, after a backoff that doubles with each crash in a row (0.5 s
  up to 30 s), logs it and counts it in ``modelloop_worker_restarts_total``; a worker that
  crashes :attr:`WorkerOptions.max_restarts` times in a row without staying up for
  :attr:`WorkerOptions.stable_after_s` stops the server with exit status 1 and the reason,
  rather than leaving it serving silently with fewer workers;
- passes SIGTERM and SIGINT on to every worker, waits for each to drain, and exits 0 when
  all of them did;
- relays the repository extension's load and unload from the worker that received them
  to the others, so every worker serves the same models (new versions on disk reach
  every worker through its own repository poll);
- keeps ``/metrics`` one target: workers write their metrics to a shared directory
  (``prometheus_client``'s multiprocess mode, ``PROMETHEUS_MULTIPROC_DIR``), and any
  worker answers with the sum; the supervisor adds the pool's state there.

The workers talk to the supervisor over a socket pair, one JSON object per line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelloop.process import BoundAddresses, ServerError
from modelloop.serving.metrics import WORKER_POOL_FILE, write_worker_pool_state

logger = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


@dataclass(frozen=True)
class WorkerOptions:
    """How the supervisor runs its workers.

    Attributes:
        count: Worker processes.
        argv: The ``modelloop serve`` arguments every worker gets (without ports).
        host: The interface both ports bind.
        rest_port: REST port; 0 picks one.
        grpc_port: gRPC port; 0 picks one.
        grace_period_s: The workers' drain time; the supervisor waits that long plus a
            margin before it kills a worker that does not exit.
        tls: Whether the ports serve TLS (for the printed URL).
        max_restarts: Crashes in a row after which the server stops with an error.
        stable_after_s: A worker that stays ready this long resets its crash count.
        backoff_s: The first restart delay; it doubles with each crash in a row.
        max_backoff_s: The longest restart delay.
        env: Variables the workers get besides the supervisor's own environment.
    """

    count: int
    argv: list[str]
    host: str
    rest_port: int
    grpc_port: int
    grace_period_s: float = 20.0
    tls: bool = False
    max_restarts: int = 5
    stable_after_s: float = 60.0
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class _Worker:
    index: int
    process: asyncio.subprocess.Process | None = None
    writer: asyncio.StreamWriter | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    ready_at: float = 0.0
    restarts: int = 0
    crashes_in_a_row: int = 0
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def reserve_port(host: str, port: int, what: str) -> socket.socket:
    """Binds ``host:port`` for the workers to share, and keeps it bound (not listening).

    A fixed port is first bound without ``SO_REUSEPORT``, so that a port another server
    holds is an error here, as it is without workers, instead of a silent share. The socket
    that stays open has ``SO_REUSEPORT``: workers bind beside it, and nothing else can.

    Args:
        host: The interface.
        port: The port; 0 picks a free one.
        what: ``"REST"`` or ``"gRPC"``, for the message.

    Returns:
        The bound socket; its port is the one the workers use.

    Raises:
        ServerError: The port is in use or the address cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if port:
        probe = socket.socket(family, socket.SOCK_STREAM)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ServerError(f"cannot bind {what} port {host}:{port}: {exc.strerror}") from exc
        finally:
            probe.close()
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ServerError(f"cannot bind {what} port {host}:{port}: {exc.strerror}") from exc
    return sock


def worker_command(
    argv: list[str], index: int, count: int, rest_port: int, grpc_port: int, fd: int
) -> list[str]:
    """The command line of one worker: ``modelloop serve`` with the shared ports and its link."""
    return [
        sys.executable,
        "-m",
        "modelloop",
        "serve",
        *argv,
        "--rest-port",
        str(rest_port),
        "--grpc-port",
        str(grpc_port),
        "--worker-index",
        str(index),
        "--worker-count",
        str(count),
        "--worker-fd",
        str(fd),
    ]


class Supervisor:
    """Starts, watches, restarts and stops the workers of one server.

    Args:
        options: The workers and ports.
        on_ready: Called once with the addresses when every worker is ready.
    """

    def __init__(self, options: WorkerOptions, on_ready: Callable[[BoundAddresses], None]) -> None:
        self.options = options
        self.on_ready = on_ready
        self._workers = [_Worker(i) for i in range(options.count)]
        # Everything the supervisor reacts to, in order: signals, messages, exits, restarts.
        self._events: asyncio.Queue[tuple[str, _Worker, Any]] = asyncio.Queue()
        self._stopping = False
        self._failure: str | None = None
        self._metrics_dir: Path | None = None
        self._own_metrics_dir = False
        self._ports: tuple[int, int] = (0, 0)

    def run(self) -> int:
        """Runs the server until SIGTERM or SIGINT (or a worker that keeps crashing).

        Returns:
            0 when every worker drained and exited 0.

        Raises:
            ServerError: A port cannot be bound, a worker failed to start, or a worker
                keeps crashing; the message says which and why.
        """
        opts = self.options
        rest = reserve_port(opts.host, opts.rest_port, "REST")
        try:
            grpc_sock = reserve_port(opts.host, opts.grpc_port, "gRPC")
        except ServerError:
            rest.close()
            raise
        self._ports = (rest.getsockname()[1], grpc_sock.getsockname()[1])
        try:
            self._prepare_metrics_dir()
            status = asyncio.run(self._main())
        finally:
            rest.close()
            grpc_sock.close()
            if self._own_metrics_dir and self._metrics_dir is not None:
                shutil.rmtree(self._metrics_dir, ignore_errors=True)
        if self._failure is not None:
            raise ServerError(self._failure)
        return status

    # -- metrics ----------------------------------------------------------------------

    def _prepare_metrics_dir(self) -> None:
        configured = os.environ.get(MULTIPROC_ENV)
        if configured:
            path = Path(configured)
            path.mkdir(parents=True, exist_ok=True)
            # Files of an earlier run would be summed into this one's counters.
            for old in [*path.glob("*.db"), path / WORKER_POOL_FILE]:
                old.unlink(missing_ok=True)
        else:
            path = Path(tempfile.mkdtemp(prefix="modelloop-metrics-"))
            self._own_metrics_dir = True
        self._metrics_dir = path
        self._write_state()

    def _write_state(self) -> None:
        if self._metrics_dir is None:
            return
        running = sum(1 for w in self._workers if w.process is not None and w.ready.is_set())
        restarts = {str(w.index): w.restarts for w in self._workers}
        write_worker_pool_state(self._metrics_dir, self.options.count, running, restarts)

    def _forget_metrics_of(self, pid: int) -> None:
        if self._metrics_dir is None:
            return
        from prometheus_client import multiprocess

        # The live gauges of a dead process would otherwise stay in the sums.
        multiprocess.mark_process_dead(pid, str(self._metrics_dir))

    # -- the loop -----------------------------------------------------------------------

    async def _main(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            for worker in self._workers:
                await self._start(worker)
            if not await self._all_ready():
                status = await self._stop_all()
                # A signal while starting is a clean stop; a worker that died is not.
                return 1 if self._failure is not None else status
            self._write_state()
            opts = self.options
            addresses = BoundAddresses(opts.host, self._ports[0], self._ports[1], tls=opts.tls)
            logger.info("%d workers ready", opts.count)
            self.on_ready(addresses)
            await self._watch()
            return await self._stop_all()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: int) -> None:
        if not self._stopping:
            logger.info("%s: stopping the workers", signal.Signals(sig).name)
        self._stopping = True
        self._events.put_nowait(("stop", self._workers[0], sig))

    async def _all_ready(self) -> bool:
        """Waits until every worker is ready; False when one exits first or a stop comes."""
        while not all(w.ready.is_set() for w in self._workers):
            kind, worker, detail = await self._events.get()
            if kind == "stop":
                return False
            if kind == "exit":
                self._failure = (
                    f"worker {worker.index} exited with status {detail} while starting; "
                    "its reason is in the log above"
                )
                logger.error("%s", self._failure)
                return False
            if kind == "message":
                await self._on_message(worker, detail)
        return True

    async def _watch(self) -> None:
        while True:
            kind, worker, detail = await self._events.get()
            if kind == "stop":
                return
            if kind == "message":
                await self._on_message(worker, detail)
            elif kind == "exit" and not self._stopping:
                if not self._crashed(worker, detail):
                    return
            elif kind == "restart" and not self._stopping:
                await self._start(worker)

    def _crashed(self, worker: _Worker, status: int) -> bool:
        """Schedules the restart of a worker that died; False when it is time to give up."""
        opts = self.options
        stable = worker.ready.is_set() and time.monotonic() - worker.ready_at >= opts.stable_after_s
        worker.crashes_in_a_row = 1 if stable else worker.crashes_in_a_row + 1
        worker.ready.clear()
        self._write_state()
        if worker.crashes_in_a_row > opts.max_restarts:
            self._failure = (
                f"worker {worker.index} keeps crashing ({opts.max_restarts} restarts in a row, "
                f"last exit status {status}); stopping the server"
            )
            logger.error("%s", self._failure)
            return False
        delay = min(opts.backoff_s * 2 ** (worker.crashes_in_a_row - 1), opts.max_backoff_s)
        worker.restarts += 1
        self._write_state()
        logger.warning(
            "worker %d exited with status %s; restarting it in %.1f s (restart %d, %d in a row)",
            worker.index,
            status,
            delay,
            worker.restarts,
            worker.crashes_in_a_row,
        )
        asyncio.get_running_loop().call_later(delay, self._events.put_nowait, ("restart", worker, None))
        return True

    # -- one worker ---------------------------------------------------------------------

    async def _start(self, worker: _Worker) -> None:
        opts = self.options
        parent, child = socket.socketpair()
        env = {**os.environ, **opts.env, MULTIPROC_ENV: str(self._metrics_dir)}
        command = worker_command(
            opts.argv, worker.index, opts.count, self._ports[0], self._ports[1], child.fileno()
        )
        try:
            worker.process = await asyncio.create_subprocess_exec(
                *command, env=env, pass_fds=(child.fileno(),)
            )
        finally:
            child.close()
        reader, worker.writer = await asyncio.open_connection(sock=parent)
        logger.info("worker %d started (pid %d)", worker.index, worker.process.pid)
        worker.tasks = [
            asyncio.create_task(self._read(worker, reader), name=f"worker-{worker.index}-link"),
            asyncio.create_task(self._wait(worker, worker.process), name=f"worker-{worker.index}-exit"),
        ]

    async def _read(self, worker: _Worker, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            try:
                message = json.loads(line)
            except ValueError:
                logger.warning("worker %d sent an unreadable message: %r", worker.index, line[:200])
                continue
            if isinstance(message, dict):
                self._events.put_nowait(("message", worker, message))

    async def _wait(self, worker: _Worker, process: asyncio.subprocess.Process) -> None:
        status = await process.wait()
        self._forget_metrics_of(process.pid)
        if worker.writer is not None:
            worker.writer.close()
        self._events.put_nowait(("exit", worker, status))

    async def _on_message(self, worker: _Worker, message: dict[str, Any]) -> None:
        event = message.get("event")
        if event == "ready":
            worker.ready.set()
            worker.ready_at = time.monotonic()
            self._write_state()
            logger.info("worker %d ready", worker.index)
        elif event == "repository" and message.get("op") in ("load", "unload"):
            # One worker took a repository load or unload; the others follow.
            relay = (
                json.dumps({"op": message["op"], "model": str(message.get("model", ""))}) + "\n"
            ).encode()
            for other in self._workers:
                if other is not worker and other.writer is not None and not other.writer.is_closing():
                    other.writer.write(relay)
                    with contextlib.suppress(ConnectionError):
                        await other.writer.drain()

    async def _stop_all(self) -> int:
        """SIGTERM to every worker, then waits for their drain; 0 when all exited 0."""
        self._stopping = True
        live = [w for w in self._workers if w.process is not None and w.process.returncode is None]
        for worker in live:
            with contextlib.suppress(ProcessLookupError, AttributeError):
                worker.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        deadline = self.options.grace_period_s + 15.0
        status = 0
        for worker in self._workers:
            process = worker.process
            if process is None:
                continue
            try:
                code = await asyncio.wait_for(process.wait(), deadline)
            except TimeoutError:
                logger.error("worker %d did not stop in %.0f s; killing it", worker.index, deadline)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                code = await process.wait()
            if worker in live and code != 0:
                logger.error("worker %d exited with status %d while stopping", worker.index, code)
                status = 1
        for worker in self._workers:
            for task in worker.tasks:
                task.cancel()
        logger.info("stopped")
        return status
