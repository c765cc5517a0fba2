"""Every relative link of README.md, ARCHITECTURE.md and docs/ names a file that exists, and
every ``#anchor`` a heading of that file (GitHub's heading slugs)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

DOCUMENTS = sorted([REPO_ROOT / "README.md", REPO_ROOT / "ARCHITECTURE.md", *REPO_ROOT.glob("docs/**/*.md")])

_LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6} (?P<title>.+)$")


def _outside_code(text: str) -> list[str]:
    lines, fence = [], False
    for line in text.split("\n"):
        if line.startswith("```"):
            fence = not fence
        elif not fence:
            lines.append(line)
    return lines


def slug(title: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = title.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found = set()
    for line in _outside_code(path.read_text()):
        heading = _HEADING.match(line)
        if heading:
            found.add(slug(heading["title"]))
    return found


def test_slug_matches_github() -> None:
    assert slug("Python models: pre- and post-processing in `model.py`") == (
        "python-models-pre--and-post-processing-in-modelpy"
    )
    assert slug("Tracing (OpenTelemetry)") == "tracing-opentelemetry"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_relative_links_resolve(document: Path) -> None:
    broken = []
    for line in _outside_code(document.read_text()):
        for found in _LINK.finditer(line):
            target = found["target"]
            if re.match(r"^[a-z]+:", target):
                continue  # http:, https:, mailto:
            file_part, _, anchor = target.partition("#")
            path = (document.parent / file_part).resolve() if file_part else document
            if not path.exists():
                broken.append(f"{target}: no such file")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                broken.append(f"{target}: no heading #{anchor} in {path.name}")
    assert not broken, f"{document.relative_to(REPO_ROOT)}: " + "; ".join(broken)
