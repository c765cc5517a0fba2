"""Labels join only the input they were meant for, and every labeler's label is kept.

Against a real server: a request id squatted by another client's input makes the id
ambiguous, so no label can be joined to the squatter's input (nor trained on); a retry
with the same input stays one prediction; and a labeler who labels first does not shut out
the others.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from sklearn.datasets import load_digits

from tests.e2e.serverproc import ServerProcess, start_server

ALICE = "alice-token-0a1b2c"
MALLORY = "mallory-token-9f8e7d"


@pytest.fixture(scope="module")
def server(digits_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    state = tmp_path_factory.mktemp("label-join-state")
    tokens = f'{{"alice": "{ALICE}", "mallory": "{MALLORY}"}}'
    proc = start_server(digits_repo, "--state-dir", str(state), env={"MODELLOOP_FEEDBACK_TOKENS": tokens})
    try:
        yield proc
    finally:
        proc.stop()


def _predict(server: ServerProcess, rid: str, row: list[float]) -> httpx.Response:
    r = httpx.post(
        f"{server.rest_url}/v1/models/digits:predict",
        json={"instances": [row]},
        headers={"x-request-id": rid},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == rid
    return r


def _label(server: ServerProcess, token: str, rid: str, target: int) -> httpx.Response:
    return httpx.post(
        f"{server.rest_url}/v1/models/digits/feedback",
        json={"feedback": [{"request_id": rid, "target": target}]},
        headers={"authorization": f"Bearer {token}"},
        timeout=30,
    )


def _metric(server: ServerProcess, outcome: str) -> float:
    text = httpx.get(f"{server.rest_url}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("modelloop_feedback_total{") and f'outcome="{outcome}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_squatted_request_id_never_joins_a_label_to_the_squatters_input(server: ServerProcess) -> None:
    digits = load_digits()
    real = digits.data[digits.target == 3][0].astype(float).tolist()
    _predict(server, "order-18", [16.0] * 64)  # the squatter comes first
    _predict(server, "order-18", real)  # the real request: answered
    before = _metric(server, "ambiguous")
    r = _label(server, ALICE, "order-18", 3)
    assert r.status_code == 409, r.text
    body = r.json()
    assert body["accepted"] == [] and "different inputs" in body["ambiguous"]["order-18"]
    assert "ambiguous" in body["error"]
    assert _metric(server, "ambiguous") == before + 1


def test_a_retry_with_the_same_input_stays_one_prediction(server: ServerProcess) -> None:
    row = load_digits().data[7].astype(float).tolist()
    first = _predict(server, "order-20", row).json()["predictions"]
    again = _predict(server, "order-20", row).json()["predictions"]
    assert np.allclose(first, again)
    r = _label(server, ALICE, "order-20", 7)
    assert r.status_code == 200 and r.json()["accepted"] == ["order-20"], r.text


def test_every_labelers_label_is_kept(server: ServerProcess) -> None:
    digits = load_digits()
    row = digits.data[digits.target == 5][0].astype(float).tolist()
    _predict(server, "order-21", row)
    first = _label(server, MALLORY, "order-21", 8)  # a poisoning source labels first
    assert first.status_code == 200 and first.json()["source"] == "mallory"
    honest = _label(server, ALICE, "order-21", 5)  # the honest label is still stored
    assert honest.status_code == 200, honest.text
    assert honest.json()["accepted"] == ["order-21"] and honest.json()["source"] == "alice"
    # One label per source and prediction: a second one from the same source is refused.
    again = _label(server, ALICE, "order-21", 6)
    assert again.status_code == 409 and again.json()["duplicate"] == ["order-21"]
