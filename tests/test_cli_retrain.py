"""``modelloop retrain`` and ``modelloop simulate``: exit codes, JSON result, demo traffic."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from modelloop.cli import main
from modelloop.export.publish import list_versions
from modelloop.monitoring.simulate import drift_digits

SPEC = Path(__file__).resolve().parent / "testdata" / "specs" / "functional_spec.py"


@pytest.fixture(scope="module")
def blobs_repo(tmp_path_factory: pytest.TempPathFactory, train_run: Callable[..., Path]) -> Path:
    from modelloop.export.exporter import export_run

    repo = tmp_path_factory.mktemp("cli-blobs")
    export_run(train_run(str(SPEC)), repo, name="blobs")
    return repo


def test_retrain_prints_a_json_result_and_exits_by_outcome(
    blobs_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    repo = tmp_path / "repo"
    shutil.copytree(blobs_repo, repo)
    (repo / "blobs" / "config.json").write_text(json.dumps({"retrain": {"accuracy_floor": 0.5}}))
    argv = ["retrain", "--repo", str(repo), "--name", "blobs", "--state-dir", str(tmp_path / "state")]
    code = main([*argv, "--store", f"sqlite:///{tmp_path / 'empty.db'}", "--epochs", "3"])
    out, err = capsys.readouterr()
    result = json.loads(out.strip().splitlines()[-1])
    assert (code, result["outcome"]) in {(0, "blessed"), (3, "rejected")}, err
    assert result["feedback_rows"] == {"train": 0, "holdout": 0, "quarantined": 0}
    assert f"retrain blobs: {result['outcome']}" in err
    assert Path(result["record"]).is_file()
    assert list_versions(repo / "blobs") == ([1, 2] if code == 0 else [1])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--name", "nope"], "model 'nope' has no version"),
        (["--name", "blobs", "--store", "mysql://x"], "must start with sqlite:/// or postgresql://"),
    ],
)
def test_retrain_cannot_start(
    blobs_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
):
    code = main(["retrain", "--repo", str(blobs_repo), "--state-dir", str(tmp_path), *argv])
    err = capsys.readouterr().err
    assert code == 1 and message in err and err.count("\n") == 1


class _FakeServer(BaseHTTPRequestHandler):
    """Answers predict with the true class of an undrifted digit and accepts every label."""

    seen: ClassVar[list[tuple[str, str | None, Any]]] = []
    authorization: ClassVar[list[str | None]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.seen.append((self.path, self.headers.get("x-request-id"), body))
        if self.path.endswith("/feedback"):
            self.authorization.append(self.headers.get("authorization"))
        if self.path.endswith(":predict"):
            rows = np.asarray(body["instances"])
            # A "model" that reads the class from the mean pixel: enough to tell the phases apart.
            preds = [[1.0 if k == int(r.mean() > 8) else 0.0 for k in range(10)] for r in rows]
            payload: dict[str, Any] = {"predictions": preds}
        else:
            payload = {
                "accepted": [f["request_id"] for f in body["feedback"]],
                "unknown": [],
                "duplicate": [],
                "invalid": {},
            }
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def fake_server() -> Iterator[str]:
    _FakeServer.seen = []
    _FakeServer.authorization = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_simulate_sends_labelled_traffic_then_feedback(fake_server: str, capsys: pytest.CaptureFixture[str]):
    code = main(["simulate", "--url", fake_server, "--drift", "--requests", "5", "--batch", "3"])
    out = capsys.readouterr().out
    assert code == 0
    assert "simulate: normal: served accuracy" in out and "simulate: drifted: served accuracy" in out
    predicts = [s for s in _FakeServer.seen if s[0] == "/v1/models/digits:predict"]
    feedback = [s for s in _FakeServer.seen if s[0] == "/v1/models/digits/feedback"]
    assert len(predicts) == 10 and all(rid and rid.startswith("sim-") for _, rid, _ in predicts)
    assert len(feedback) == 2
    labelled = {f["request_id"]: f["targets"] for _, _, body in feedback for f in body["feedback"]}
    assert set(labelled) == {rid for _, rid, _ in predicts}
    assert all(len(t) == 3 for t in labelled.values())


def test_simulate_sends_the_labeler_token(
    fake_server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    token = tmp_path / "feedback.token"
    token.write_text("labeler-token\n")
    assert main(["simulate", "--url", fake_server, "--requests", "3", "--token-file", str(token)]) == 0
    assert _FakeServer.authorization == ["Bearer labeler-token"]
    assert (
        main(["simulate", "--url", fake_server, "--requests", "1", "--token-file", str(tmp_path / "no")]) == 1
    )
    assert "--token-file: cannot read" in capsys.readouterr().err


def test_simulate_errors(capsys: pytest.CaptureFixture[str]):
    assert main(["simulate", "--url", "http://127.0.0.1:9", "--requests", "1"]) == 1
    assert "cannot reach" in capsys.readouterr().err
    assert main(["simulate", "--url", "http://x", "--drift-only"]) == 1
    assert "--drift-only needs --drift" in capsys.readouterr().err


def test_drift_digits_inverts_and_stays_in_range():
    x = np.tile(np.arange(17, dtype=np.float32), (50, 4))[:, :64]
    drifted = drift_digits(x, np.random.default_rng(0), noise=0.0)
    np.testing.assert_array_equal(drifted, 16 - x)
    noisy = drift_digits(x, np.random.default_rng(0))
    assert noisy.min() >= 0 and noisy.max() <= 16 and noisy.dtype == np.float32
