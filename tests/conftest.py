"""Shared fixtures: trained runs and published repositories, made once per session."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTDATA = Path(__file__).resolve().parent / "testdata"


@pytest.fixture(scope="session")
def train_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Trains a spec once per (spec, epochs, folds) and returns its run directory."""
    from modelloop.training.spec import load_spec
    from modelloop.training.train import train

    cache: dict[tuple[str, int | None, int], Path] = {}

    def _train(spec: str, epochs: int | None = None, folds: int = 0) -> Path:
        key = (spec, epochs, folds)
        if key not in cache:
            out = tmp_path_factory.mktemp("run") / "run"
            train(load_spec(spec), out, epochs=epochs, seed=42, folds=folds, interactive=False)
            cache[key] = out
        return cache[key]

    return _train


@pytest.fixture(scope="session")
def digits_run(train_run: Callable[..., Path]) -> Path:
    """A digits run trained with the spec's defaults (early stopping bounds it)."""
    return train_run("digits")


@pytest.fixture(scope="session")
def digits_repo(tmp_path_factory: pytest.TempPathFactory, digits_run: Path) -> Path:
    """A model repository holding ``digits`` version 1, exported from ``digits_run``.

    Treat it as read-only; tests that publish or delete versions copy it first.
    """
    from modelloop.export.exporter import export_run

    repo = tmp_path_factory.mktemp("repo")
    export_run(digits_run, repo)
    return repo
