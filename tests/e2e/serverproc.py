"""Start and stop a real ``modelloop serve`` process for end-to-end tests."""

from __future__ import annotations

import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

_REST = re.compile(r"REST listening on (https?://\S+)")
_GRPC = re.compile(r"gRPC listening on (\S+)")


@dataclass
class ServerProcess:
    """A running server, its addresses, and everything it printed so far."""

    proc: subprocess.Popen[str]
    rest_url: str = ""
    grpc_target: str = ""
    lines: list[str] = field(default_factory=list)
    _pump: threading.Thread = field(default_factory=lambda: threading.Thread())

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return "\n".join(self.lines)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Signals the process by its PID and waits; kills it if it does not exit."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self._pump.join(timeout=5)
            self.proc.stdout.close()
        return self.proc.returncode


def _pump(proc: subprocess.Popen[str], lines: list[str]) -> threading.Thread:
    """Starts a thread that collects the process's output lines."""

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


def start_server(
    repo: Path | str,
    *extra: str,
    env: dict[str, str] | None = None,
    timeout: float = 90,
    verify: ssl.SSLContext | bool = True,
    wait_ready: bool = True,
    control_plane: str | None = "in-process",
) -> ServerProcess:
    """Runs ``python -m modelloop serve --repo REPO`` on port 0 and waits until it is ready
    (or, with ``wait_ready=False``, until it listens).

    Without ``--control-plane`` in ``extra``, the server gets ``--control-plane
    control_plane``: by default ``in-process``, one process that answers, logs and watches,
    as the end-to-end tests of monitoring, rollouts and retraining need; None gives no flag
    (``serve``'s own default).

    Raises:
        RuntimeError: The process exited or did not become ready in time (it is stopped).
    """
    cmd = [
        sys.executable,
        "-m",
        "modelloop",
        "serve",
        "--repo",
        str(repo),
        "--rest-port",
        "0",
        "--grpc-port",
        "0",
        "--poll-interval",
        "0.2",
        *(() if "--control-plane" in extra or control_plane is None else ("--control-plane", control_plane)),
        *extra,
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})},
    )
    server = ServerProcess(proc)
    server._pump = _pump(proc, server.lines)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{server.output()}")
            text = server.output()
            rest, grpc_ = _REST.search(text), _GRPC.search(text)
            if rest and grpc_:
                server.rest_url, server.grpc_target = rest.group(1), grpc_.group(1)
                if not wait_ready:
                    return server
                try:
                    ready = httpx.get(f"{server.rest_url}/v2/health/ready", timeout=2, verify=verify)
                    if ready.status_code == 200:
                        return server
                except httpx.HTTPError:
                    pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout} s:\n{server.output()}")
    except BaseException:
        server.stop(signal.SIGKILL)
        raise


def wait_for(predicate, timeout: float = 30, interval: float = 0.1) -> bool:
    """Polls ``predicate`` until it is true or ``timeout`` passes; returns the last result."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


_PLANE = re.compile(r"control plane listening on (http://\S+)")


@dataclass
class MonitorProcess:
    """A running control plane (``modelloop monitor``) and what it printed."""

    proc: subprocess.Popen[str]
    url: str = ""
    lines: list[str] = field(default_factory=list)
    _pump: threading.Thread = field(default_factory=lambda: threading.Thread())

    def output(self) -> str:
        return "\n".join(self.lines)

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample of its ``/metrics`` (0 when absent)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            head, _, value = line.rpartition(" ")
            if head == (f"{name}{{{want}}}" if want else name):
                return float(value)
        return 0.0

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Signals the process by its PID and waits; kills it if it does not exit."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self._pump.join(timeout=5)
            self.proc.stdout.close()
        return self.proc.returncode


def start_monitor(
    repo: Path | str, *extra: str, env: dict[str, str] | None = None, timeout: float = 90, port: int = 0
) -> MonitorProcess:
    """Runs ``python -m modelloop monitor --repo REPO --port PORT`` and waits until it listens.

    Raises:
        RuntimeError: The process exited or did not listen in time (it is stopped).
    """
    cmd = [sys.executable, "-m", "modelloop", "monitor", "--repo", str(repo), "--port", str(port), *extra]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})},
    )
    plane = MonitorProcess(proc)
    plane._pump = _pump(proc, plane.lines)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"control plane exited with {proc.returncode}:\n{plane.output()}")
            found = _PLANE.search(plane.output())
            if found:
                plane.url = found.group(1)
                return plane
            time.sleep(0.1)
        raise RuntimeError(f"control plane not listening after {timeout} s:\n{plane.output()}")
    except BaseException:
        plane.stop(signal.SIGKILL)
        raise
