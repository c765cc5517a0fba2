"""Under CI (``CI=true``) nothing passes by not running.

The skip check in ``tests/conftest.py`` fails a CI run that skipped anything; this plugin
adds the other ways a test can pass without running:

- an ``xfail`` (marker or ``pytest.xfail()``) that fails, or one that passes (``XPASS``):
  each is reported as a failure of its own test, with the reason;
- a deselection (``-k``, ``-m``, ``--deselect``, ``--last-failed``): the run fails and names
  how many tests were left out;
- a whole-suite run (``pytest`` with no paths, or ``tests``, nothing ignored) that
  collected fewer tests than :data:`MIN_TESTS`: a module that stopped being collected, a
  parametrization that lost its cases. Raise the floor when tests are added; lower it
  only with the tests removed on purpose, in the same commit. A run of some modules or files has no floor.

Outside CI all of it is only counted in the summary, so ``-k`` and ``-m`` stay usable while
developing.

Under pytest-xdist (``make test`` runs two workers) each worker collects and deselects the
whole suite; a worker hands its counts to the controller (``workeroutput``), which judges the
run, and the xfail check turns the worker's report into a failure before it is sent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tools import on_ci

MIN_TESTS = 2003
"""Tests a whole-suite run collects at least (it collected 1,991 when this was set)."""

TESTS_DIR = Path(__file__).resolve().parent

_DESELECTED = pytest.StashKey[int]()
_COLLECTED = pytest.StashKey[int]()
_PROBLEMS = pytest.StashKey[list[str]]()


def whole_suite(config: pytest.Config) -> bool:
    """Whether this run asked for the whole suite: no paths (``testpaths``), or ``tests`` itself,
    and nothing ignored (``--ignore``, ``--ignore-glob``)."""
    if config.getoption("ignore", None) or config.getoption("ignore_glob", None):
        return False
    if config.args_source == pytest.Config.ArgsSource.TESTPATHS:
        return True
    paths = [arg.split("::")[0] for arg in config.args]
    return bool(paths) and all(Path(config.invocation_params.dir, p).resolve() == TESTS_DIR for p in paths)


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_DESELECTED] = 0
    config.stash[_COLLECTED] = 0
    config.stash[_PROBLEMS] = []


def _worker(config: pytest.Config) -> bool:
    """Whether this process is a pytest-xdist worker (the controller judges the run)."""
    return hasattr(config, "workerinput")


def pytest_deselected(items: list[pytest.Item]) -> None:
    if items:
        config = items[0].config
        config.stash[_DESELECTED] = config.stash.get(_DESELECTED, 0) + len(items)


def pytest_collection_finish(session: pytest.Session) -> None:
    session.config.stash[_COLLECTED] = len(session.items)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: object, error: object) -> None:
    """pytest-xdist's controller: a worker is done; its counts are those of the run (every
    worker collects the same tests), the largest kept should one worker have stopped early."""
    output = getattr(node, "workeroutput", {})
    config: pytest.Config = node.config  # type: ignore[attr-defined]
    for key, name in ((_DESELECTED, "ci_guard_deselected"), (_COLLECTED, "ci_guard_collected")):
        config.stash[key] = max(config.stash.get(key, 0), int(output.get(name, 0)))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> pytest.TestReport:
    report: pytest.TestReport = yield
    if on_ci() and hasattr(report, "wasxfail"):
        kind = "XPASS" if report.passed else "XFAIL"
        reason = report.wasxfail or "no reason given"
        report.outcome = "failed"
        report.longrepr = (
            f"CI=true: {kind} ({reason}): an expected failure passes the run without testing "
            "anything; fix the test or the code, or remove the marker"
        )
        del report.wasxfail
    return report


def _problems(session: pytest.Session) -> list[str]:
    config = session.config
    problems = []
    deselected = config.stash.get(_DESELECTED, 0)
    if deselected:
        problems.append(f"{deselected} test(s) deselected (-k, -m, --deselect or --last-failed)")
    collected = config.stash.get(_COLLECTED, 0)
    if whole_suite(config) and collected < MIN_TESTS:
        problems.append(
            f"the whole suite collected {collected} tests, below the floor of {MIN_TESTS} "
            "(MIN_TESTS in tests/ci_guard.py)"
        )
    return problems


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    if _worker(config):
        config.workeroutput["ci_guard_deselected"] = config.stash.get(_DESELECTED, 0)  # type: ignore[attr-defined]
        config.workeroutput["ci_guard_collected"] = config.stash.get(_COLLECTED, 0)  # type: ignore[attr-defined]
        return
    problems = _problems(session)
    session.config.stash[_PROBLEMS] = problems
    if on_ci() and problems and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    for problem in config.stash.get(_PROBLEMS, []):
        if on_ci():
            terminalreporter.write_line(
                f"CI=true: {problem}: a CI run must run every test, so it fails", red=True
            )
        else:
            terminalreporter.write_line(problem, yellow=True)
