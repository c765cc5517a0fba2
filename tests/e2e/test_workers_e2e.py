"""``modelloop serve --workers 2``: real worker processes behind one REST and one gRPC port.

Every client call below opens a fresh connection, so the kernel's ``SO_REUSEPORT``
spreads them over the workers. What each worker served is read from its own metrics file
in the multiprocess directory the test hands the server; what Prometheus sees is read from
``/metrics``, which any worker answers with the sum.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families

from modelloop.serving.protos import grpc_service_pb2 as pb
from modelloop.serving.protos import grpc_service_pb2_grpc as pb_grpc
from tests.e2e.serverproc import ServerProcess, start_server, wait_for

ROW = [0.0, 0.0, 5.0, 13.0, 9.0, 1.0, 0.0, 0.0] + [0.0] * 56
TOKEN = "workers-admin"
_STARTED = re.compile(r"worker (\d+) started \(pid (\d+)\)")
TESTDATA = Path(__file__).resolve().parents[1] / "testdata"


def worker_pids(server: ServerProcess) -> dict[int, int]:
    """The latest pid of each worker, from the supervisor's log."""
    pids: dict[int, int] = {}
    for match in _STARTED.finditer(server.output()):
        pids[int(match.group(1))] = int(match.group(2))
    return pids


def served_by(metrics_dir: Path, pid: int) -> Counter[tuple[str, str]]:
    """``modelloop_requests_total`` of one worker process, by (protocol, version)."""
    path = metrics_dir / f"counter_{pid}.db"
    counts: Counter[tuple[str, str]] = Counter()
    if not path.exists():
        return counts
    for key, value, *_ in MmapedDict.read_all_values_from_file(str(path)):
        _, name, labels, _ = json.loads(key)
        if name == "modelloop_requests_total" and labels.get("code") == "OK":
            counts[(labels["protocol"], labels["version"])] += int(value)
    return counts


def scrape(server: ServerProcess) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    text = httpx.get(f"{server.rest_url}/metrics", timeout=10).text
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def predict_rest(server: ServerProcess, version: int | None = None) -> httpx.Response:
    # httpx.post opens a new connection each time: the kernel picks a worker per connection.
    path = "/v2/models/digits" + (f"/versions/{version}" if version else "") + "/infer"
    body = {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": ROW}]}
    return httpx.post(server.rest_url + path, json=body, timeout=10)


def infer_grpc(server: ServerProcess) -> pb.ModelInferResponse:
    with grpc.insecure_channel(server.grpc_target) as channel:
        request = pb.ModelInferRequest(model_name="digits")
        tensor = request.inputs.add(name="pixels", datatype="FP32", shape=[1, 64])
        tensor.contents.fp32_contents.extend(ROW)
        return pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)


@pytest.fixture(scope="module")
def metrics_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("multiproc")


@pytest.fixture(scope="module")
def workers(
    served_repo: Path, metrics_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    state = tmp_path_factory.mktemp("state")
    env = {
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "MODELLOOP_ADMIN_TOKEN": TOKEN,
        "MODELLOOP_MONITORING_TRIGGER": "none",
    }
    server = start_server(served_repo, "--workers", "2", "--state-dir", str(state), env=env)
    try:
        yield server
    finally:
        assert server.stop() == 0, server.output()[-3000:]


def test_two_workers_serve_one_port_with_metrics_summed(workers: ServerProcess, metrics_dir: Path) -> None:
    pids = worker_pids(workers)
    assert sorted(pids) == [0, 1]
    # The module's other tests may have run first: publish a version, unload and load the
    # model. Once one version is loaded, count what this test sends on top of what was there.
    assert wait_for(
        lambda: scrape(workers)["modelloop_model_versions_loaded"].get((("model", "digits"),)) == 1,
        timeout=60,
    )
    first = predict_rest(workers)
    assert first.status_code == 200, first.text
    version = str(first.json()["model_version"])
    before_workers = {pid: served_by(metrics_dir, pid) for pid in pids.values()}
    before = scrape(workers)["modelloop_requests_total"]
    sent = {"v2_rest": 0, "v2_grpc": 0}

    def both_served() -> bool:
        assert predict_rest(workers).status_code == 200
        infer_grpc(workers)
        sent["v2_rest"] += 1
        sent["v2_grpc"] += 1
        per_worker = [served_by(metrics_dir, pid) - before_workers[pid] for pid in pids.values()]
        return all(sum(c[(p, version)] for p in sent) > 0 for c in per_worker)

    assert wait_for(both_served, timeout=60, interval=0), "one worker got every connection"
    per_worker = [served_by(metrics_dir, pid) - before_workers[pid] for pid in pids.values()]
    samples = scrape(workers)
    for protocol, count in sent.items():
        labels = (("code", "OK"), ("model", "digits"), ("protocol", protocol), ("version", version))
        # /metrics, from whichever worker answered it, is the sum over both workers.
        assert samples["modelloop_requests_total"][labels] - before.get(labels, 0.0) == count
        assert sum(c[(protocol, version)] for c in per_worker) == count
    assert samples["modelloop_workers"][(("state", "running"),)] == 2
    assert samples["modelloop_model_versions_loaded"][(("model", "digits"),)] == 1


def test_a_repository_unload_and_load_reach_every_worker(workers: ServerProcess) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    url = f"{workers.rest_url}/v2/repository/models/digits"
    assert httpx.post(f"{url}/unload", headers=auth, timeout=30).status_code == 200

    def everywhere(status: int) -> bool:
        # Ten fresh connections in a row answer alike: both workers have followed.
        return all(predict_rest(workers).status_code == status for _ in range(10))

    assert wait_for(lambda: everywhere(503) or everywhere(404), timeout=30)
    assert httpx.post(f"{url}/load", headers=auth, timeout=60).status_code == 200
    assert wait_for(lambda: everywhere(200), timeout=30)


def test_an_alert_starts_one_retrain_whichever_worker_gets_it(workers: ServerProcess) -> None:
    # A drift alert retrains only with trusted labels it has not trained on: give it one.
    response = predict_rest(workers)
    label = httpx.post(
        f"{workers.rest_url}/v1/models/digits/feedback",
        json={"feedback": [{"request_id": response.headers["x-request-id"], "target": 0}]},
        timeout=10,
    )
    assert label.status_code == 200, label.text
    payload = json.loads((TESTDATA / "alertmanager-firing.json").read_text())
    payload["groupKey"] = f"workers-{time.monotonic_ns()}"
    answers = []
    for _ in range(8):  # Alertmanager re-sends; fresh connections land on both workers
        response = httpx.post(
            f"{workers.rest_url}/monitoring/alerts",
            json=payload,
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=10,
        )
        assert response.status_code == 200, response.text
        answers.append(json.dumps(response.json()))
    started = [a for a in answers if '"started"' in a]
    assert len(started) == 1, answers


def test_feedback_finds_a_prediction_another_worker_logged(workers: ServerProcess) -> None:
    # Each prediction and its label travel on separate connections, so about half of the
    # labels reach the worker that did not log the prediction (and has not written it yet).
    for i in range(12):
        response = predict_rest(workers)
        assert response.status_code == 200
        request_id = response.headers["x-request-id"]
        label = httpx.post(
            f"{workers.rest_url}/v1/models/digits/feedback",
            json={"feedback": [{"request_id": request_id, "target": i % 10}]},
            timeout=10,
        )
        assert label.status_code == 200, label.text
        assert label.json()["accepted"] == [request_id], label.text


def test_a_new_version_reaches_every_worker(
    workers: ServerProcess, served_repo: Path, metrics_dir: Path
) -> None:
    staging = served_repo / ".staging" / "v2"
    shutil.copytree(served_repo / "digits" / "1", staging)
    staging.rename(served_repo / "digits" / "2")
    pids = worker_pids(workers)

    def both_on_v2() -> bool:
        response = predict_rest(workers)
        assert response.status_code == 200, response.text
        return all(served_by(metrics_dir, pid)[("v2_rest", "2")] > 0 for pid in pids.values())

    assert wait_for(both_on_v2, timeout=60, interval=0), "a worker never served version 2"


def test_sigterm_drains_every_worker_and_exits_zero(served_repo: Path, tmp_path: Path) -> None:
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "m")}
    server = start_server(
        served_repo, "--workers", "2", "--grace-period", "10", "--state-dir", str(tmp_path / "s"), env=env
    )
    try:
        assert predict_rest(server).status_code == 200
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=60) == 0, server.output()[-3000:]
        output = server.output()
        assert (
            "worker 0 modelloop.server: stopped" in output and "worker 1 modelloop.server: stopped" in output
        )
        assert not wait_for(lambda: any(_alive(pid) for pid in worker_pids(server).values()), timeout=1)
    finally:
        server.stop(signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_worker_that_keeps_crashing_stops_the_server(served_repo: Path, tmp_path: Path) -> None:
    env = {
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "m"),
        "MODELLOOP_WORKER_MAX_RESTARTS": "2",
        "MODELLOOP_WORKER_RESTART_BACKOFF_S": "0.1",
    }
    server = start_server(served_repo, "--workers", "2", "--state-dir", str(tmp_path / "s"), env=env)
    try:
        killed: set[int] = set()
        # One crash: restarted, logged and counted, and the server keeps serving.
        first = worker_pids(server)[1]
        os.kill(first, signal.SIGKILL)
        killed.add(first)
        assert wait_for(lambda: worker_pids(server)[1] != first)
        second = worker_pids(server)[1]
        assert wait_for(lambda: "worker 1 ready" in _after(server, second))
        assert "worker 1 exited with status -9; restarting it in 0.1 s" in server.output()
        samples = scrape(server)
        assert samples["modelloop_worker_restarts_total"][(("worker", "1"),)] == 1
        assert predict_rest(server).status_code == 200
        # Then it keeps crashing: after two restarts in a row the server stops, and says why.
        while server.proc.poll() is None:
            pid = worker_pids(server)[1]
            if pid not in killed:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            time.sleep(0.05)
        assert server.proc.returncode == 1
        last = server.output().strip().splitlines()[-1]
        assert last.startswith("modelloop: error: worker 1 keeps crashing (2 restarts in a row"), last
    finally:
        server.stop(signal.SIGKILL)


def _after(server: ServerProcess, pid: int) -> str:
    text = server.output()
    return text[text.index(f"(pid {pid})") :]
