"""Fails when the whole suite's line or branch coverage fell below its floor.

``.ci/run`` runs it after ``make test`` (``python -m tests.coverage_floor``): it reads the
combined ``.coverage`` data that run left (servers and CLI subprocesses included) and the
floors in ``pyproject.toml``, ``[tool.modelloop.coverage]`` ``fail_under_lines`` and
``fail_under_branches``. coverage.py's own ``fail_under`` checks one figure, lines and
branches together, and would also fail a run of a few modules; these two hold each
figure, after a whole-suite run only.
"""

from __future__ import annotations

import json
import sys
import tempfile
import tomllib
from pathlib import Path

import coverage

ROOT = Path(__file__).resolve().parents[1]


def floors(pyproject: Path = ROOT / "pyproject.toml") -> tuple[float, float]:
    """The committed line and branch floors, in percent."""
    table = tomllib.loads(pyproject.read_text())["tool"]["modelloop"]["coverage"]
    return float(table["fail_under_lines"]), float(table["fail_under_branches"])


def totals(data_file: Path = ROOT / ".coverage") -> tuple[float, float]:
    """Line and branch coverage of the run that wrote ``data_file``, in percent."""
    cov = coverage.Coverage(data_file=str(data_file), config_file=str(ROOT / "pyproject.toml"))
    cov.load()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "coverage.json"
        cov.json_report(outfile=str(out))
        summary = json.loads(out.read_text())["totals"]
    return float(summary["percent_statements_covered"]), float(summary["percent_branches_covered"])


def main() -> int:
    lines_floor, branches_floor = floors()
    lines, branches = totals()
    failed = False
    for name, value, floor in (("lines", lines, lines_floor), ("branches", branches, branches_floor)):
        verdict = "ok" if value >= floor else "BELOW THE FLOOR"
        failed |= value < floor
        print(f"coverage of {name}: {value:.1f} % (floor {floor:.1f} %): {verdict}")
    if failed:
        print(
            "coverage fell: add tests, or lower the floor in pyproject.toml with the reason", file=sys.stderr
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
