"""Hot reload under load, a corrupt version, a removed version and SIGTERM under load.

Eight client threads keep predicting while versions are published, broken and
removed. No request may fail, except clean 404s for a version that was pinned and
then removed.
"""

from __future__ import annotations

import shutil
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.e2e.serverproc import ServerProcess, start_server, wait_for

ROW = [[0.0, 0.0, 5.0, 13.0, 9.0, 1.0, 0.0, 0.0] + [0.0] * 56]


class Load:
    """Client threads that predict until stopped and tally the status codes."""

    def __init__(self, url: str, threads: int = 8) -> None:
        self.url = url
        self.codes: Counter[int] = Counter()
        self.versions: Counter[str] = Counter()
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                try:
                    r = client.post(self.url, json={"instances": ROW})
                except httpx.HTTPError as exc:
                    with self._lock:
                        self.errors.append(repr(exc))
                    continue
                with self._lock:
                    self.codes[r.status_code] += 1
                    if r.status_code != 200:
                        self.errors.append(f"{r.status_code} {r.text}")

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=15)

    @property
    def total(self) -> int:
        return sum(self.codes.values())


def _status(server: ServerProcess) -> dict[int, str]:
    body = httpx.get(f"{server.rest_url}/v1/models/digits", timeout=5).json()
    return {int(s["version"]): s["state"] for s in body["model_version_status"]}


def _copy_version(repo: Path, src: int, dst: int) -> None:
    """Publishes a copy of a version the way export does: build aside, then rename in."""
    staging = repo / ".staging" / f"copy-{dst}"
    shutil.copytree(repo / "digits" / str(src), staging)
    staging.rename(repo / "digits" / str(dst))


@pytest.fixture(scope="module")
def lifecycle_server(served_repo: Path):
    (served_repo / ".staging").mkdir(exist_ok=True)
    proc = start_server(served_repo)
    try:
        yield proc
    finally:
        proc.stop()


def test_new_version_under_load_fails_no_request(lifecycle_server, served_repo):
    url = f"{lifecycle_server.rest_url}/v1/models/digits:predict"
    with Load(url) as load:
        time.sleep(1.0)
        _copy_version(served_repo, 1, 2)
        assert wait_for(lambda: _status(lifecycle_server).get(2) == "AVAILABLE", timeout=30)
        assert wait_for(
            lambda: 1 not in _status(lifecycle_server) or _status(lifecycle_server)[1] == "END", 30
        )
        time.sleep(1.0)
    assert load.errors == []
    assert load.total > 50
    assert set(load.codes) == {200}


def test_corrupt_version_under_load_keeps_the_old_one_serving(lifecycle_server, served_repo):
    url = f"{lifecycle_server.rest_url}/v1/models/digits:predict"
    staging = served_repo / ".staging" / "broken"
    shutil.copytree(served_repo / "digits" / "2", staging)
    (staging / "model.onnx").write_bytes(b"this is not an onnx file")
    with Load(url) as load:
        time.sleep(0.5)
        staging.rename(served_repo / "digits" / "3")
        assert wait_for(lambda: _status(lifecycle_server).get(3) == "END", timeout=30)
        time.sleep(1.0)
    assert load.errors == []
    assert load.total > 20
    status = httpx.get(f"{lifecycle_server.rest_url}/v1/models/digits/versions/3", timeout=5).json()
    (entry,) = status["model_version_status"]
    assert entry["status"]["error_code"] != "OK"
    assert entry["status"]["error_message"]
    assert _status(lifecycle_server)[2] == "AVAILABLE"
    metrics = httpx.get(f"{lifecycle_server.rest_url}/metrics", timeout=5).text
    assert 'modelloop_model_load_failures_total{model="digits"} 1.0' in metrics
    index = httpx.post(f"{lifecycle_server.rest_url}/v2/repository/index", timeout=5)
    assert index.status_code in (401, 403)  # admin routes are off without a token
    shutil.rmtree(served_repo / "digits" / "3")


def test_removed_version_unloads_and_pinned_requests_get_a_clean_404(lifecycle_server, served_repo):
    _copy_version(served_repo, 2, 4)
    assert wait_for(lambda: _status(lifecycle_server).get(4) == "AVAILABLE", timeout=30)
    latest = f"{lifecycle_server.rest_url}/v1/models/digits:predict"
    pinned = f"{lifecycle_server.rest_url}/v1/models/digits/versions/4:predict"
    assert httpx.post(pinned, json={"instances": ROW}, timeout=5).status_code == 200
    with Load(latest) as load:
        time.sleep(0.5)
        # Move the directory out atomically, as an operator would, then delete it.
        (served_repo / "digits" / "4").rename(served_repo / ".staging" / "removed-4")
        assert wait_for(
            lambda: 4 not in _status(lifecycle_server) or _status(lifecycle_server)[4] == "END", 30
        )
        time.sleep(0.5)
    assert load.errors == []
    r = httpx.post(pinned, json={"instances": ROW}, timeout=5)
    assert r.status_code == 404, r.text
    assert "4" in r.json()["error"]


def test_sigterm_under_load_drains_and_exits_zero(served_repo):
    server = start_server(served_repo, "--grace-period", "10")
    try:
        url = f"{server.rest_url}/v1/models/digits:predict"
        with Load(url, threads=4) as load:
            time.sleep(1.0)
            started = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            code = server.proc.wait(timeout=30)
            elapsed = time.monotonic() - started
        assert code == 0, server.output()
        assert elapsed < 10
        assert load.codes[200] > 20
        # After the listener closes, clients see refused connections, never a 5xx.
        assert not [c for c in load.codes if c >= 500], load.errors[:5]
        assert "stopped" in server.output()
    finally:
        server.stop(signal.SIGKILL)
