"""Shared fixtures (trained runs and published repositories, made once per session), and the
skip accounting: the summary always gives the number of skipped tests, gathers the skips for a
missing tool into one line per tool, and a CI run (``CI=true``) fails when anything skipped.
``tests/ci_guard.py`` fails a CI run for the other ways of not running: xfail, xpass,
deselection, and a whole suite below its floor of collected tests.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.tools import MISSING, on_ci

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

pytest_plugins = ["tests.ci_guard"]

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTDATA = Path(__file__).resolve().parent / "testdata"


TRAINING_FIXTURES = frozenset({"train_run", "digits_run", "digits_repo"})
"""Fixtures that train a model: a test that uses one, however indirectly, is marked ``trains``."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if TRAINING_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.trains)


def _skip_reasons(config: pytest.Config) -> list[str]:
    """The reason of every skipped test so far, from the terminal reporter's tally."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    reasons = []
    for report in getattr(reporter, "stats", {}).get("skipped", []):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reasons.append(reason.removeprefix("Skipped: "))
    return reasons


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if on_ci() and exitstatus == pytest.ExitCode.OK and _skip_reasons(session.config):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    skips = _skip_reasons(config)
    tools = Counter(reason.removeprefix(MISSING) for reason in skips if reason.startswith(MISSING))
    for tool, count in sorted(tools.items()):
        terminalreporter.write_line(f"{MISSING}{tool}: {count} test(s) skipped", yellow=True)
    line = f"skipped: {len(skips)}"
    if skips and on_ci():
        terminalreporter.write_line(
            f"{line} (CI=true: a CI run must skip nothing, so this run fails)", red=True
        )
    else:
        terminalreporter.write_line(line)


@pytest.fixture(scope="session", autouse=True)
def state_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``$XDG_STATE_HOME`` for the session: every default state directory (and every server a
    test starts without ``--state-dir``) lands under the session's temporary directory."""
    path = tmp_path_factory.mktemp("state-home")
    before = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(path)
    try:
        yield path
    finally:
        if before is None:
            os.environ.pop("XDG_STATE_HOME", None)
        else:
            os.environ["XDG_STATE_HOME"] = before


def _shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory every process of the run sees: the session's temporary directory, or under
    pytest-xdist (``make test`` runs two workers) the one above the workers' own."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextmanager
def _made_once(root: Path, name: str) -> Iterator[tuple[Path, bool]]:
    """``root/name`` made once by whichever worker comes first: yields the path and whether
    it is already made; the others wait on its lock until it is. A worker whose making fails
    leaves no mark, and the next one to ask makes it again."""
    root.mkdir(parents=True, exist_ok=True)
    path, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not done.exists():
                shutil.rmtree(path, ignore_errors=True)
            yield path, done.exists()
            done.touch()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def train_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Trains a spec once per (spec, epochs, folds) for the whole run (the xdist workers share
    it) and returns its run directory."""
    from modelloop.training.spec import load_spec
    from modelloop.training.train import train

    root = _shared_dir(tmp_path_factory) / "runs"

    def _train(spec: str, epochs: int | None = None, folds: int = 0) -> Path:
        key = hashlib.sha256(repr((spec, epochs, folds)).encode()).hexdigest()[:16]
        with _made_once(root, key) as (out, made):
            if not made:
                train(load_spec(spec), out, epochs=epochs, seed=42, folds=folds, interactive=False)
        return out

    return _train


@pytest.fixture(scope="session")
def digits_run(train_run: Callable[..., Path]) -> Path:
    """A digits run trained with the spec's defaults (early stopping bounds it)."""
    return train_run("digits")


@pytest.fixture(scope="session")
def digits_repo(tmp_path_factory: pytest.TempPathFactory, digits_run: Path) -> Path:
    """A model repository holding ``digits`` version 1, exported from ``digits_run`` (once for
    the whole run, like the training).

    Treat it as read-only; tests that publish or delete versions copy it first.
    """
    from modelloop.export.exporter import export_run

    with _made_once(_shared_dir(tmp_path_factory), "digits-repo") as (repo, made):
        if not made:
            export_run(digits_run, repo)
    return repo
