"""Hot reload under load, a corrupt version, a removed version and SIGTERM under load.

Client threads keep predicting, over TF Serving REST and OIP REST, while versions are
published, broken and removed. No request may fail, except clean 404s for a version that
was pinned and then removed; every answer's body must hold the model's prediction, and the
OIP answers' ``model_version`` shows which version served each request, so a test can see
the traffic move. Each test has its own server over its own copy of the repository, so any
one of them runs alone or in any order.
"""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.e2e.serverproc import ServerProcess, start_server, wait_for

ROW = [[0.0, 0.0, 5.0, 13.0, 9.0, 1.0, 0.0, 0.0] + [0.0] * 56]
ATOL = 1e-5


@dataclass
class Answer:
    """One request of the load: when it was sent, and what came back."""

    sent: float
    status: int | None = None
    version: str | None = None
    error: str = ""


class Load:
    """Client threads that predict until stopped, keeping every answer in order.

    Even threads use TF Serving REST, odd ones OIP REST. Every 200's body is checked against
    the expected probabilities; a body that differs is recorded as an error.

    Args:
        server: The server.
        expected: The model's probabilities for ``ROW``.
        threads: How many client threads. Defaults to 8.
    """

    def __init__(self, server: ServerProcess, expected: np.ndarray, threads: int = 8) -> None:
        self.tfserving_url = f"{server.rest_url}/v1/models/digits:predict"
        self.v2_url = f"{server.rest_url}/v2/models/digits/infer"
        self.expected = expected
        self.answers: list[Answer] = []
        self.lock = threading.Lock()
        self.stopping = False
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _check(self, v2: bool, response: httpx.Response, answer: Answer) -> None:
        body = response.json()
        if v2:
            (output,) = body["outputs"]
            answer.version = body["model_version"]
            got = np.array(output["data"], dtype=np.float32).reshape(output["shape"])
        else:
            got = np.array(body["predictions"], dtype=np.float32)
        if got.shape != self.expected.shape or not np.allclose(got, self.expected, atol=ATOL):
            answer.error = f"wrong prediction {got.tolist()}"

    def _run(self, index: int) -> None:
        v2 = index % 2 == 1
        with httpx.Client(timeout=30) as client:
            while True:
                # Starting a request and stopping the load exclude each other, so that after
                # `stop_new_requests` no request starts.
                with self.lock:
                    if self.stopping:
                        return
                    answer = Answer(sent=time.monotonic())
                    self.answers.append(answer)
                try:
                    if v2:
                        body = {
                            "inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": ROW}]
                        }
                        response = client.post(self.v2_url, json=body)
                    else:
                        response = client.post(self.tfserving_url, json={"instances": ROW})
                except httpx.HTTPError as exc:
                    answer.error = repr(exc)
                    continue
                answer.status = response.status_code
                if response.status_code == 200:
                    self._check(v2, response, answer)
                else:
                    answer.error = f"{response.status_code} {response.text}"

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self.lock:
            self.stopping = True
        for t in self._threads:
            t.join(timeout=30)

    def snapshot(self) -> list[Answer]:
        with self.lock:
            return list(self.answers)

    def answered(self) -> int:
        return sum(a.status is not None for a in self.snapshot())

    def wait_for_answers(self, count: int, predicate: Callable[[Answer], bool] = lambda a: True) -> None:
        """Waits until ``count`` more answers that satisfy ``predicate`` have come back."""
        start = sum(a.status is not None and predicate(a) for a in self.snapshot())
        assert wait_for(
            lambda: sum(a.status is not None and predicate(a) for a in self.snapshot()) >= start + count,
            timeout=60,
            interval=0.02,
        ), f"fewer than {count} answers in 60 s"

    def errors(self) -> list[str]:
        return [a.error for a in self.snapshot() if a.error]

    def versions(self) -> Counter[str]:
        return Counter(a.version for a in self.snapshot() if a.version is not None)


def _status(server: ServerProcess) -> dict[int, str]:
    body = httpx.get(f"{server.rest_url}/v1/models/digits", timeout=5).json()
    return {int(s["version"]): s["state"] for s in body["model_version_status"]}


def _gone_or_ended(server: ServerProcess, version: int) -> bool:
    return _status(server).get(version, "END") == "END"


def _copy_version(repo: Path, src: int, dst: int) -> None:
    """Publishes a copy of a version the way export does: build aside, then rename in."""
    staging = repo / ".staging" / f"copy-{dst}"
    shutil.copytree(repo / "digits" / str(src), staging)
    staging.rename(repo / "digits" / str(dst))


@pytest.fixture
def repo(tmp_path: Path, digits_repo: Path) -> Path:
    copy = tmp_path / "repo"
    shutil.copytree(digits_repo, copy, ignore=shutil.ignore_patterns(".staging", ".publish.lock"))
    (copy / ".staging").mkdir()
    return copy


@pytest.fixture
def server(repo: Path) -> Iterator[ServerProcess]:
    proc = start_server(repo)
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def expected(digits_repo: Path) -> np.ndarray:
    """ONNX Runtime's probabilities for ``ROW`` on the published model: what every answer must be."""
    import onnxruntime as ort

    session = ort.InferenceSession(
        str(digits_repo / "digits" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    return session.run(["probabilities"], {"pixels": np.array(ROW, dtype=np.float32)})[0]


def test_new_version_under_load_fails_no_request_and_takes_the_traffic(server, repo, expected):
    with Load(server, expected) as load:
        load.wait_for_answers(40)
        _copy_version(repo, 1, 2)
        assert wait_for(lambda: _status(server).get(2) == "AVAILABLE", timeout=30)
        assert wait_for(lambda: _gone_or_ended(server, 1), timeout=30)
        switched = time.monotonic()
        load.wait_for_answers(40, lambda a: a.version == "2")
    answers = load.snapshot()
    assert load.errors() == []
    assert {a.status for a in answers} == {200}
    versions = load.versions()
    assert versions["1"] > 0 and versions["2"] >= 40, versions
    # Once version 1 had unloaded, every request sent after it went to version 2.
    assert {a.version for a in answers if a.sent > switched and a.version} == {"2"}


def test_corrupt_version_under_load_keeps_the_old_one_serving(server, repo, expected):
    staging = repo / ".staging" / "broken"
    shutil.copytree(repo / "digits" / "1", staging)
    (staging / "model.onnx").write_bytes(b"this is not an onnx file")
    with Load(server, expected) as load:
        load.wait_for_answers(20)
        staging.rename(repo / "digits" / "2")
        assert wait_for(lambda: _status(server).get(2) == "END", timeout=30)
        load.wait_for_answers(20)
    assert load.errors() == []
    assert {a.status for a in load.snapshot()} == {200}
    assert set(load.versions()) == {"1"}  # the broken version never answered
    status = httpx.get(f"{server.rest_url}/v1/models/digits/versions/2", timeout=5).json()
    (entry,) = status["model_version_status"]
    assert entry["status"]["error_code"] != "OK"
    assert entry["status"]["error_message"]
    assert _status(server)[1] == "AVAILABLE"
    metrics = httpx.get(f"{server.rest_url}/metrics", timeout=5).text
    assert 'modelloop_model_load_failures_total{model="digits"} 1.0' in metrics
    index = httpx.post(f"{server.rest_url}/v2/repository/index", timeout=5)
    assert index.status_code == 403  # admin routes are off without a token


def test_removed_version_unloads_and_pinned_requests_get_a_clean_404(server, repo, expected):
    _copy_version(repo, 1, 2)
    assert wait_for(lambda: _status(server).get(2) == "AVAILABLE", timeout=30)
    pinned = f"{server.rest_url}/v1/models/digits/versions/2:predict"
    assert httpx.post(pinned, json={"instances": ROW}, timeout=5).status_code == 200
    with Load(server, expected) as load:
        load.wait_for_answers(20, lambda a: a.version == "2")
        # Move the directory out atomically, as an operator would.
        (repo / "digits" / "2").rename(repo / ".staging" / "removed-2")
        assert wait_for(lambda: _gone_or_ended(server, 2), timeout=30)
        removed = time.monotonic()
        load.wait_for_answers(20, lambda a: a.version == "1")
    assert load.errors() == []
    assert {a.version for a in load.snapshot() if a.sent > removed and a.version} == {"1"}
    r = httpx.post(pinned, json={"instances": ROW}, timeout=5)
    assert r.status_code == 404, r.text
    assert "2" in r.json()["error"]


def test_sigterm_under_load_answers_every_request_sent_before_it(repo, expected):
    # Under load a batch waits up to 300 ms for company, so requests are in flight whenever
    # SIGTERM lands. The model runs on the batcher's thread (inline_max_micros 0): a model
    # this small would otherwise run on the event loop, with no timeout, and answer at once.
    batching = {
        "enabled": True,
        "max_batch_size": 64,
        "batch_timeout_micros": 300_000,
        "inline_max_micros": 0,
    }
    (repo / "digits" / "config.json").write_text(json.dumps({"batching": batching}))
    server = start_server(repo, "--grace-period", "20")
    try:
        with Load(server, expected, threads=4) as load:
            load.wait_for_answers(8)

            def all_in_flight() -> bool:
                # Every thread has a request out that the server has had 50 ms to read; if so,
                # stop the load right there (under its lock, so that no request starts after).
                with load.lock:
                    now = time.monotonic()
                    pending = [a for a in load.answers if a.status is None and not a.error]
                    if len(pending) == 4 and all(now - a.sent > 0.05 for a in pending):
                        load.stopping = True
                        return True
                    return False

            assert wait_for(all_in_flight, timeout=30, interval=0.005)
            in_flight = [a for a in load.snapshot() if a.status is None]
            sigterm = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            code = server.proc.wait(timeout=60)
        answers = load.snapshot()
        assert code == 0, server.output()
        # No client saw an error, and every request, the four in flight at SIGTERM included,
        # was answered 200 with the right prediction.
        assert load.errors() == []
        assert len(in_flight) == 4 and all(a.sent < sigterm for a in answers)
        assert [a.status for a in answers] == [200] * len(answers)
        assert all(a.status == 200 for a in in_flight)
        output = server.output()
        assert "draining requests in flight" in output and "stopped" in output
        assert "still running" not in output  # the drain finished, it did not give up
    finally:
        server.stop(signal.SIGKILL)
