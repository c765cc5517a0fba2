"""Servers under test, each a subprocess pinned to the server CPU and stopped by its PID.

CPU time is read from ``/proc``: the server process, every live descendant (the workers of
``--workers N``), and the children it has reaped (a worker that was replaced), so that a
point's CPU per request counts everything the server spent.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

SERVER_CPU = os.environ.get("BENCH_SERVER_CPUS", "0")
"""CPUs of the servers under test, as ``taskset -c`` takes them (``BENCH_SERVER_CPUS``, default 0).

A worker-scaling run on a bigger machine gives the servers several: ``BENCH_SERVER_CPUS=0-7
BENCH_LOAD_CPUS=8-15 python -m bench --only heavy --heavy-workers 1,2,4,8``.
"""
ROOT = Path(__file__).resolve().parent.parent
_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    # The command name (field 2) may hold spaces; everything after its ")" splits cleanly.
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from ``/proc/<pid>/task/*/children``)."""
    found: list[int] = []
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            tasks = list(Path(f"/proc/{current}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found.extend(children)
            stack.extend(children)
    return found


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid``, its live descendants and its reaped children."""
    total = 0
    for member in [pid, *descendants(pid)]:
        try:
            fields = _stat_fields(member)
        except OSError:
            continue
        # utime and stime (stat fields 14, 15), plus cutime and cstime (16, 17): the time of
        # the children each one reaped, which are no longer in the live tree.
        total += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    return total / _TICKS


def tree_rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` and its live descendants, summed."""
    total = 0
    for member in [pid, *descendants(pid)]:
        try:
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


_REST = re.compile(r"REST listening on (http://\S+)")
_GRPC = re.compile(r"gRPC listening on (\S+)")


@dataclass
class Proc:
    """A started server: its process, its URLs and what it printed."""

    name: str
    popen: subprocess.Popen[str]
    rest_url: str = ""
    grpc_url: str = ""
    lines: list[str] = field(default_factory=list)
    ready_s: float = 0.0

    @property
    def pid(self) -> int:
        """The server's PID (taskset execs into it)."""
        return self.popen.pid

    def output(self) -> str:
        """Everything the process printed so far."""
        return "\n".join(self.lines)

    def rss_bytes(self) -> int:
        """Resident set size of the server and its workers, from ``/proc``."""
        return tree_rss_bytes(self.pid)

    def cpu_seconds(self) -> float:
        """CPU seconds the server and its workers have used so far."""
        return tree_cpu_seconds(self.pid)

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM by PID, then SIGKILL if it does not exit in ``timeout`` seconds."""
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)


def start(
    name: str,
    args: list[str],
    *,
    ready_path: str | None = "/v2/health/ready",
    needs: tuple[str, ...] = ("rest", "grpc"),
    timeout: float = 120,
    env: dict[str, str] | None = None,
    cpu: int | str = SERVER_CPU,
    cwd: Path = ROOT,
    python: str | Path | None = None,
) -> Proc:
    """Starts ``python ARGS`` pinned to ``cpu`` and waits until it prints its addresses.

    ``python`` is this interpreter unless given (a peer's own virtualenv).

    The process must print ``REST listening on http://...`` and/or ``gRPC listening on
    host:port`` (as ``modelloop serve`` does). With ``ready_path``, the REST URL must also
    answer 200 there.

    Raises:
        RuntimeError: The process exited or was not ready in time (it is killed).
    """
    cmd = ["taskset", "-c", str(cpu), str(python or sys.executable), *args]
    launched = time.monotonic()
    popen = subprocess.Popen(
        cmd,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    proc = Proc(name, popen)

    def pump() -> None:
        assert popen.stdout is not None
        for line in popen.stdout:
            proc.lines.append(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if popen.poll() is not None:
                raise RuntimeError(f"{name} exited with {popen.returncode}:\n{proc.output()[-4000:]}")
            text = proc.output()
            rest, grpc = _REST.search(text), _GRPC.search(text)
            if rest:
                proc.rest_url = rest.group(1)
            if grpc:
                proc.grpc_url = "http://" + grpc.group(1)
            found = {"rest": rest is not None, "grpc": grpc is not None}
            if all(found[n] for n in needs) and (ready_path is None or _ok(proc.rest_url + ready_path)):
                proc.ready_s = time.monotonic() - launched
                return proc
            time.sleep(0.02)
        raise RuntimeError(f"{name} not ready after {timeout} s:\n{proc.output()[-4000:]}")
    except BaseException:
        if popen.poll() is None:
            os.kill(popen.pid, signal.SIGKILL)
            popen.wait(timeout=10)
        raise


def _ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False
