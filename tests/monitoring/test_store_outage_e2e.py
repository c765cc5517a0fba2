"""PostgreSQL goes away for a while under a real server: predictions keep being served,
feedback answers 503 with a clear message, lost prediction logs are counted (never
silent), and once the database is back, feedback works again with nothing accepted lost."""

from __future__ import annotations

import shutil
import uuid

import httpx

from tests.e2e.serverproc import start_server, wait_for

ROW = [[0.0, 0.0, 5.0, 13.0, 9.0, 1.0, 0.0, 0.0] + [0.0] * 56]


def _predict(server, request_id: str) -> int:
    r = httpx.post(
        f"{server.rest_url}/v1/models/digits:predict",
        json={"instances": ROW},
        headers={"x-request-id": request_id},
        timeout=10,
    )
    return r.status_code


def _feedback(server, ids: list[str]) -> httpx.Response:
    body = {"feedback": [{"request_id": i, "target": 0} for i in ids]}
    return httpx.post(f"{server.rest_url}/v1/models/digits/feedback", json=body, timeout=10)


def _dropped(server) -> float:
    for line in httpx.get(f"{server.rest_url}/metrics", timeout=5).text.splitlines():
        if line.startswith('modelloop_monitoring_dropped_total{model="digits"}'):
            return float(line.split()[-1])
    return 0.0


def _logged(url: str, ids: list[str]) -> int:
    """How many of ``ids`` the server has written to the prediction log (read straight from it)."""
    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM predictions WHERE request_id = ANY(%s)", (ids,)).fetchone()
    return int(row[0]) if row else 0


def _restart(cluster) -> None:
    sock = cluster.data.parent / "sock"
    options = f"-c listen_addresses=127.0.0.1 -p {cluster.port} -c unix_socket_directories={sock} -c fsync=on"
    cluster.pg_ctl("-l", str(cluster.data.parent / "server.log"), "-o", options, "-w", "-t", "60", "start")
    cluster.pid = cluster.read_pid()


def test_postgres_outage_keeps_serving_and_loses_nothing_accepted(postgres_cluster, digits_repo, tmp_path):
    url = postgres_cluster.create_database()
    repo = tmp_path / "repo"
    shutil.copytree(digits_repo, repo, ignore=shutil.ignore_patterns(".staging", ".publish.lock"))
    server = start_server(repo, "--store", url, "--state-dir", str(tmp_path / "state"))
    stopped = False
    try:
        before = [f"before-{uuid.uuid4().hex[:8]}" for _ in range(10)]
        assert all(_predict(server, i) == 200 for i in before)
        # The observer writes its batches off the request path: wait until they are in.
        assert wait_for(lambda: _logged(url, before) == len(before), timeout=20)
        r = _feedback(server, before[:5])
        assert r.status_code == 200, r.text
        assert sorted(r.json()["accepted"]) == sorted(before[:5])

        postgres_cluster.pg_ctl("-m", "fast", "-w", "-t", "30", "stop")
        stopped = True
        during = [f"during-{uuid.uuid4().hex[:8]}" for _ in range(10)]
        assert all(_predict(server, i) == 200 for i in during)  # serving does not need the store
        r = _feedback(server, before[5:])
        assert r.status_code == 503, r.text
        assert "feedback store unavailable" in r.json()["error"]
        _restart(postgres_cluster)
        stopped = False
        # The prediction logger kept what it answered during the outage (a bounded number of
        # segments; past the bound it drops and counts, tests/serving/test_predlog.py) and
        # writes it once the store is back: nothing answered was lost.
        assert wait_for(lambda: _logged(url, during) == len(during), timeout=60)
        assert _dropped(server) == 0
        assert wait_for(lambda: _feedback(server, before[5:]).status_code in (200, 409), timeout=30)
        r = _feedback(server, before)  # all ten now labelled once; nothing accepted before was lost
        assert r.status_code == 409, r.text
        assert sorted(r.json()["duplicate"]) == sorted(before)
        after = f"after-{uuid.uuid4().hex[:8]}"
        assert _predict(server, after) == 200
        assert wait_for(lambda: _feedback(server, [after]).status_code == 200, timeout=20)
    finally:
        if stopped:
            _restart(postgres_cluster)
        server.stop()
