"""A real ``modelloop serve --repo s3://...`` against a real S3 API server (moto's server mode).

One moto server and one model server per module. The store enforces IAM, so wrong
credentials are refused as by AWS. The last test kills the store under the running server.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from modelloop.layout import MODEL_CARD_FILE
from tests.e2e.serverproc import ServerProcess, start_server, wait_for
from tests.s3server import S3Server

BUCKET = "models"
PREFIX = "prod"
URL = f"s3://{BUCKET}/{PREFIX}"
ROW = [[float(i % 17) for i in range(64)]]


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory, digits_repo: Path) -> Iterator[S3Server]:
    """The store, holding digits version 1 (the shared fixture's files)."""
    with S3Server.start(tmp_path_factory.mktemp("moto")) as server:
        server.client().create_bucket(Bucket=BUCKET)
        server.upload_tree(digits_repo / "digits" / "1", BUCKET, f"{PREFIX}/digits/1")
        yield server


@pytest.fixture(scope="module")
def server(s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    cache = tmp_path_factory.mktemp("cache")
    proc = start_server(URL, "--no-monitoring", env=s3.env(MODELLOOP_REPO_CACHE=str(cache)))
    try:
        yield proc
    finally:
        proc.stop()


def served_version(server: ServerProcess) -> int:
    answer = httpx.post(f"{server.rest_url}/v2/models/digits/infer", json=_infer_body(), timeout=10)
    assert answer.status_code == 200, answer.text
    return int(answer.json()["model_version"])


def _version_if_served(server: ServerProcess) -> int | None:
    """The version that answers, or None while the model is not loaded (404)."""
    answer = httpx.post(f"{server.rest_url}/v2/models/digits/infer", json=_infer_body(), timeout=10)
    return int(answer.json()["model_version"]) if answer.status_code == 200 else None


def _infer_body() -> dict[str, object]:
    return {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": ROW[0]}]}


def _ready(server: ServerProcess) -> bool:
    return httpx.get(f"{server.rest_url}/v2/health/ready", timeout=10).status_code == 200


def _versions(server: ServerProcess) -> dict[int, str]:
    states = httpx.get(f"{server.rest_url}/v1/models/digits", timeout=10).json()["model_version_status"]
    return {int(s["version"]): s["state"] for s in states}


def test_a_new_version_in_the_bucket_is_served_and_a_half_uploaded_one_is_ignored(
    s3: S3Server, server: ServerProcess, digits_repo: Path
) -> None:
    # The latest version serves (1, or the export test's if that ran first).
    before = served_version(server)
    new = before + 1
    source = digits_repo / "digits" / "1"
    # The next version without its commit marker: every file but model.json.
    s3.upload_tree(source, BUCKET, f"{PREFIX}/digits/{new}", skip=(MODEL_CARD_FILE,))
    assert not wait_for(lambda: new in _versions(server), timeout=2)  # ten polls at 0.2 s
    assert served_version(server) == before
    # The marker lands: the version is copied into the cache, loaded, and takes the traffic.
    s3.client().upload_file(str(source / MODEL_CARD_FILE), BUCKET, f"{PREFIX}/digits/{new}/{MODEL_CARD_FILE}")
    assert wait_for(lambda: served_version(server) == new, timeout=30), server.output()
    assert "copying from s3://models/prod" in server.output()


def test_export_publishes_into_the_bucket_and_the_server_picks_it_up(
    s3: S3Server, server: ServerProcess, digits_run: Path
) -> None:
    before = served_version(server)
    done = subprocess.run(
        [sys.executable, "-m", "modelloop", "export", str(digits_run), "--repo", URL],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **s3.env()},
    )
    assert done.returncode == 0, done.stderr
    published = done.stdout.strip().splitlines()[-1]
    version = int(published.rsplit("/", 1)[1])
    assert published == f"{URL}/digits/{version}" and version > before
    keys = {o["Key"] for o in s3.client().list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/")["Contents"]}
    assert f"{PREFIX}/digits/{version}/{MODEL_CARD_FILE}" in keys
    assert not [k for k in keys if k.startswith(f"{PREFIX}/.staging/")]  # the staging prefix is cleaned
    assert wait_for(lambda: served_version(server) == version, timeout=30), server.output()


SECRET_IN_URL = "endpoint-s3cret-7f3a"


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("wrong-secret", "access denied"),
        ("no-bucket", "does not exist"),
        ("unreachable", "cannot reach"),
        ("credentials-in-endpoint", "cannot reach the object store at http://***@127.0.0.1:"),
    ],
)
def test_a_store_that_cannot_be_read_at_start_leaves_the_server_not_ready_saying_why(
    s3: S3Server, tmp_path: Path, digits_repo: Path, case: str, expected: str
) -> None:
    digits_version = digits_repo / "digits" / "1"
    env = s3.env(MODELLOOP_REPO_CACHE=str(tmp_path))
    url = URL
    # A port bound for the test and never listened on: every connection to it is refused.
    refusing = socket.socket()
    refusing.bind(("127.0.0.1", 0))
    if case == "wrong-secret":
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    elif case == "no-bucket":
        url = "s3://no-such-bucket/prod"
    elif case == "unreachable":
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{refusing.getsockname()[1]}"
    else:
        env["AWS_ENDPOINT_URL"] = f"http://minio-user:{SECRET_IN_URL}@127.0.0.1:{refusing.getsockname()[1]}"
    try:
        proc = start_server(url, "--no-monitoring", env=env, wait_ready=False)
    except BaseException:
        refusing.close()
        raise
    try:
        ready = httpx.get(f"{proc.rest_url}/v2/health/ready", timeout=10)
        assert ready.status_code == 503
        assert expected in ready.json()["error"], ready.text
        # No answer, and no log line, carries a password from the endpoint URL.
        assert SECRET_IN_URL not in ready.text
        assert SECRET_IN_URL not in httpx.get(f"{proc.rest_url}/", timeout=10).text
        if case == "credentials-in-endpoint":
            assert wait_for(lambda: "cannot reach" in proc.output(), timeout=10)
            assert SECRET_IN_URL not in proc.output()
            return
        line = f"repository {url} is unavailable: {url}: "
        assert wait_for(lambda: line in proc.output(), timeout=10), proc.output()
        assert expected in proc.output().split(line, 1)[1].splitlines()[0]
        assert "not ready until it is read" in proc.output()
        # Nothing was loaded from the (empty) cache, and the server keeps trying.
        assert httpx.post(f"{proc.rest_url}/v2/models/digits/infer", json=_infer_body()).status_code == 404
        assert proc.proc.poll() is None
        if case == "no-bucket":
            # The bucket appears with a version: the next poll reads it, and the server is ready.
            s3.client().create_bucket(Bucket="no-such-bucket")
            s3.upload_tree(digits_version, "no-such-bucket", "prod/digits/1")
            # The empty bucket can be read before the upload lands: ready first, then version 1.
            assert wait_for(lambda: _ready(proc) and _version_if_served(proc) == 1, timeout=30)
            assert f"repository {url} is available again" in proc.output()
    finally:
        proc.stop()
        refusing.close()


def test_when_the_store_goes_away_the_loaded_version_keeps_serving(tmp_path: Path, digits_repo: Path) -> None:
    # A store and a server of its own: the module's store serves the other tests, in any order.
    with S3Server.start(tmp_path) as s3:
        s3.client().create_bucket(Bucket=BUCKET)
        s3.upload_tree(digits_repo / "digits" / "1", BUCKET, f"{PREFIX}/digits/1")
        server = start_server(
            URL, "--no-monitoring", env=s3.env(MODELLOOP_REPO_CACHE=str(tmp_path / "cache"))
        )
        try:
            _keeps_serving_without_the_store(s3, server)
        finally:
            server.stop()


def _keeps_serving_without_the_store(s3: S3Server, server: ServerProcess) -> None:
    version = served_version(server)
    s3.stop()
    assert wait_for(lambda: "cannot reach the object store" in server.output(), timeout=20), server.output()
    for _ in range(5):
        assert served_version(server) == version
    assert httpx.get(f"{server.rest_url}/v2/health/ready", timeout=10).status_code == 200
    metrics = httpx.get(f"{server.rest_url}/metrics", timeout=10).text
    errors = [line for line in metrics.splitlines() if line.startswith("modelloop_repository_errors_total")]
    assert errors and float(errors[0].split()[-1]) >= 1
    assert _versions(server)[version] == "AVAILABLE"
