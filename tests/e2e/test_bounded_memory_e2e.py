"""``modelloop serve --max-loaded-models 1`` over three copies of the published digits model."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.e2e.serverproc import ServerProcess, start_server

NAMES = ("digits_a", "digits_b", "digits_c")


@pytest.fixture(scope="module")
def bounded(served_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("bounded") / "repo"
    for name in NAMES:
        shutil.copytree(served_repo / "digits" / "1", repo / name / "1")
        card = json.loads((repo / name / "1" / "model.json").read_text())
        (repo / name / "1" / "model.json").write_text(json.dumps({**card, "name": name}))
    proc = start_server(repo, "--max-loaded-models", "1", "--no-monitoring")
    try:
        yield proc
    finally:
        proc.stop()


def test_every_model_answers_with_room_for_one(bounded: ServerProcess, digits_run: Path) -> None:
    rows = np.load(digits_run / "split.npz")["x_test"][:4].astype(np.float32)
    body = {
        "inputs": [{"name": "pixels", "shape": [4, 64], "datatype": "FP32", "data": rows.ravel().tolist()}]
    }
    answers = {}
    for name in (*NAMES, *NAMES):
        r = httpx.post(f"{bounded.rest_url}/v2/models/{name}/infer", json=body, timeout=60)
        assert r.status_code == 200, r.text
        answers.setdefault(name, []).append(r.json()["outputs"][0]["data"])
    for name in NAMES:
        np.testing.assert_allclose(answers[name][0], answers["digits_a"][0], atol=1e-6)
        assert answers[name][0] == answers[name][1]
    metrics = httpx.get(f"{bounded.rest_url}/metrics", timeout=10).text
    for name in NAMES:
        assert f'modelloop_model_loads_total{{model="{name}"}} 2.0' in metrics
    evictions = {name: f'modelloop_model_evictions_total{{model="{name}"}}' for name in NAMES}
    counted = {
        name: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        for name, prefix in evictions.items()
        if line.startswith(prefix + " ")
    }
    assert counted == {"digits_a": 2.0, "digits_b": 2.0, "digits_c": 1.0}  # six loads, room for one
    assert "modelloop_model_cold_load_seconds_bucket" in metrics
    meta = httpx.get(f"{bounded.rest_url}/v2/models/digits_b", timeout=10).json()
    assert meta["inputs"][0]["name"] == "pixels"
