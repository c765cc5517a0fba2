"""The code blocks of README.md and docs/*.md marked ``runnable``, run against a real server.

A fence ```` ```sh runnable ```` or ```` ```python runnable ```` marks a block; words after
``runnable`` tune its check: ``expect=TEXT`` (repeatable: TEXT must appear in the output)
and ``timeout=SECONDS`` (default 60). docs/operations.md ("Examples in the docs are run")
documents the convention for writers.

Each block runs in one temporary working directory (``.venv`` there links to the project's)
with ``$MODELLOOP_URL``, ``$MODELLOOP_GRPC`` and ``$MODELLOOP_FEEDBACK_TOKEN`` set to a
server of this module's own. The blocks that use none of them (the tour's train and export)
come first in the tour and make the repository that server serves, so they run once, in the
module's fixture, whichever test asks first; every other block is a test of its own. A block
must exit 0 and print each of its ``expect`` texts.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.e2e.serverproc import ServerProcess, start_server

# Tens of seconds or more: `make test-fast` leaves it out.
pytestmark = pytest.mark.slow

DOCUMENTS = ("README.md", "docs/*.md")
"""Where runnable blocks are looked for (``docs/generated/`` is written by tools, not people)."""

SERVER_VARIABLES = ("MODELLOOP_URL", "MODELLOOP_GRPC", "MODELLOOP_FEEDBACK_TOKEN")
"""The variables a block uses to reach the server; a block that names none needs no server."""

_FENCE = re.compile(r"^```(?P<lang>sh|python)[ \t]+runnable\b(?P<options>.*)$")


@dataclass(frozen=True)
class Block:
    """One runnable code block of a document."""

    path: str
    line: int
    lang: str
    code: str
    expects: tuple[str, ...]
    timeout: float

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def needs_server(self) -> bool:
        return any(name in self.code for name in SERVER_VARIABLES)


def parse_blocks(text: str, path: str) -> list[Block]:
    """The runnable blocks of one Markdown text, in order.

    Raises:
        ValueError: An option after ``runnable`` is not ``expect=`` or ``timeout=``, or a
            fence is not closed.
    """
    blocks: list[Block] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        found = _FENCE.match(lines[i])
        if found is None:
            i += 1
            continue
        expects: list[str] = []
        timeout = 60.0
        for option in found["options"].split():
            key, _, value = option.partition("=")
            if key == "expect" and value:
                expects.append(value)
            elif key == "timeout" and value:
                timeout = float(value)
            else:
                raise ValueError(f"{path}:{i + 1}: unknown option {option!r} of a runnable block")
        start = i + 1
        end = start
        while end < len(lines) and not lines[end].startswith("```"):
            end += 1
        if end == len(lines):
            raise ValueError(f"{path}:{i + 1}: the runnable block is not closed")
        code = "\n".join(lines[start:end]) + "\n"
        blocks.append(Block(path, i + 1, found["lang"], code, tuple(expects), timeout))
        i = end + 1
    return blocks


def runnable_blocks(root: Path = REPO_ROOT) -> list[Block]:
    """Every runnable block of the documents, README first, then docs/ by name."""
    blocks: list[Block] = []
    for pattern in DOCUMENTS:
        for file in sorted(root.glob(pattern)):
            blocks += parse_blocks(file.read_text(), str(file.relative_to(root)))
    return blocks


BLOCKS = runnable_blocks()
SETUP = [block for block in BLOCKS if not block.needs_server]
SERVED = [block for block in BLOCKS if block.needs_server]


@dataclass
class Outcome:
    returncode: int
    output: str


def run_block(block: Block, workdir: Path, env: dict[str, str]) -> Outcome:
    """Runs one block in ``workdir``; its whole process group is killed when it overruns."""
    if block.lang == "python":
        script = workdir / f"block_{block.line}.py"
        script.write_text(block.code)
        cmd = [sys.executable, str(script)]
    else:
        cmd = ["bash", "-euo", "pipefail", "-c", block.code]
    proc = subprocess.Popen(
        cmd,
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=block.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{block.id} ran past its {block.timeout:.0f} s:\n{block.code}\n{output}")
    return Outcome(proc.returncode, output)


def check(block: Block, outcome: Outcome) -> None:
    context = f"{block.id}:\n{block.code}\n--- output ---\n{outcome.output}"
    assert outcome.returncode == 0, f"exit status {outcome.returncode}, {context}"
    for text in block.expects:
        assert text in outcome.output, f"{text!r} not in the output, {context}"


@dataclass
class Tour:
    """The working directory, the blocks' environment, and what the setup blocks gave."""

    workdir: Path
    env: dict[str, str]
    setup: dict[str, Outcome]


@pytest.fixture(scope="module")
def tour(tmp_path_factory: pytest.TempPathFactory) -> Tour:
    workdir = tmp_path_factory.mktemp("docs-examples")
    (workdir / ".venv").symlink_to(REPO_ROOT / ".venv", target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELLOOP_")}
    env.update(
        TF_CPP_MIN_LOG_LEVEL="3",
        PATH=f"{REPO_ROOT / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        MODELLOOP_FEEDBACK_TOKEN=secrets.token_hex(16),
    )
    # The setup blocks (train, export) make the repository; each test of one reads its outcome.
    setup = {block.id: run_block(block, workdir, env) for block in SETUP}
    return Tour(workdir, env, setup)


@pytest.fixture(scope="module")
def served(tour: Tour) -> Iterator[dict[str, str]]:
    """A server of the tour's repository; the blocks' environment, pointed at it."""
    for block in SETUP:
        check(block, tour.setup[block.id])
    server: ServerProcess = start_server(
        tour.workdir / "models", env={"MODELLOOP_FEEDBACK_TOKEN": tour.env["MODELLOOP_FEEDBACK_TOKEN"]}
    )
    try:
        yield {**tour.env, "MODELLOOP_URL": server.rest_url, "MODELLOOP_GRPC": server.grpc_target}
    finally:
        server.stop()


def test_the_tour_is_runnable() -> None:
    """The README's tour keeps its runnable blocks: train, export, both REST dialects, gRPC, labels, drift."""
    readme = [block for block in BLOCKS if block.path == "README.md"]
    codes = "\n".join(block.code for block in readme)
    needles = (
        "modelloop train",
        "modelloop export",
        ":predict",
        "/infer",
        "ServiceStub",
        "/feedback",
        "modelloop simulate",
    )
    for needle in needles:
        assert needle in codes, f"no runnable README block does {needle!r}"
    assert all(block.expects for block in BLOCKS), "every runnable block checks its output"


def test_parse_blocks_options_and_errors() -> None:
    text = "```sh runnable expect=a expect=b timeout=5\necho a b\n```\n```sh\nnot run\n```\n"
    [block] = parse_blocks(text, "x.md")
    assert (block.line, block.expects, block.timeout, block.code) == (1, ("a", "b"), 5.0, "echo a b\n")
    with pytest.raises(ValueError, match="unknown option"):
        parse_blocks("```sh runnable expects=a\n```\n", "x.md")
    with pytest.raises(ValueError, match="not closed"):
        parse_blocks("```python runnable\nprint(1)\n", "x.md")


@pytest.mark.trains
@pytest.mark.parametrize("block", SETUP, ids=[block.id for block in SETUP])
def test_setup_block(block: Block, tour: Tour) -> None:
    check(block, tour.setup[block.id])


@pytest.mark.trains
@pytest.mark.parametrize("block", SERVED, ids=[block.id for block in SERVED])
def test_served_block(block: Block, tour: Tour, served: dict[str, str]) -> None:
    check(block, run_block(block, tour.workdir, served))
