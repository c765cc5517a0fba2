"""Admin routes need the token, paths cannot leave the repository, nothing unpickles,
and the server binds loopback unless told otherwise."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import quote

import grpc
import httpx
import pytest

from modelloop.serving.protos import grpc_service_pb2 as oip
from modelloop.serving.protos import grpc_service_pb2_grpc as oip_grpc
from tests.reliability.reliability_support import ADMIN_TOKEN

REPO_ROOT = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ["training", "export", "serving", "monitoring", "modelloop"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v2/repository/index"),
        ("POST", "/v2/repository/models/digits/load"),
        ("POST", "/v2/repository/models/digits/unload"),
    ],
)
@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, 401),
        ("Bearer wrong-token", 401),
        ("Basic " + ADMIN_TOKEN, 401),
        ("Bearer " + ADMIN_TOKEN[:-1], 401),
    ],
)
def test_admin_routes_refuse_missing_or_wrong_tokens(server, method, path, header, expected):
    headers = {} if header is None else {"authorization": header}
    r = httpx.request(method, f"{server.rest_url}{path}", headers=headers, timeout=10)
    assert r.status_code == expected, r.text
    assert "error" in r.json()
    assert (
        httpx.get(f"{server.rest_url}/v2/models/digits/ready", timeout=5).status_code == 200
    )  # nothing unloaded


def test_admin_route_accepts_the_token(server):
    r = httpx.post(
        f"{server.rest_url}/v2/repository/index",
        headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=10,
    )
    assert r.status_code == 200
    assert {"name": "digits", "version": "1"}.items() <= r.json()[0].items()


def test_admin_routes_are_off_without_a_configured_token(digits_repo):
    from tests.e2e.serverproc import start_server

    server = start_server(digits_repo)
    try:
        r = httpx.post(
            f"{server.rest_url}/v2/repository/index", headers={"authorization": "Bearer anything"}, timeout=10
        )
        assert r.status_code == 403
        assert "MODELLOOP_ADMIN_TOKEN" in r.json()["error"]
        with grpc.insecure_channel(server.grpc_target) as channel, pytest.raises(grpc.RpcError) as info:
            oip_grpc.GRPCInferenceServiceStub(channel).RepositoryModelUnload(
                oip.RepositoryModelUnloadRequest(model_name="digits"),
                timeout=10,
                metadata=[("authorization", "Bearer anything")],
            )
        assert info.value.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.PERMISSION_DENIED)
    finally:
        server.stop()


@pytest.mark.parametrize(
    "path",
    [
        "/v1/models/..%2F..%2Fetc%2Fpasswd",
        "/v1/models/%2e%2e/metadata",
        "/v1/models/..%252F..%252Fetc/metadata",
        "/v1/models/%2Fetc%2Fpasswd/versions/1",
        "/v2/models/..%2Fdigits/ready",
        "/v2/models/%2e%2e%2f%2e%2e%2ftmp",
        "/v2/models/digits/versions/..%2F1",
    ],
)
def test_paths_cannot_escape_the_repository(server, path):
    r = httpx.get(f"{server.rest_url}{path}", timeout=10)
    assert r.status_code in (400, 404), (path, r.status_code, r.text)
    assert "root:" not in r.text


@pytest.mark.parametrize("name", ["../../etc", "/etc", "..", "digits/../../etc", "%2e%2e", ".staging"])
def test_repository_load_cannot_escape_the_repository(server, name):
    r = httpx.post(
        f"{server.rest_url}/v2/repository/models/{quote(name, safe='')}/load",
        headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=10,
    )
    assert r.status_code in (400, 404), r.text


def test_nothing_deserialises_pickles():
    pattern = re.compile(r"\bpickle\b|allow_pickle\s*=\s*True|safe_mode\s*=\s*False|joblib\.load|\bdill\b")
    offenders = [
        f"{path.relative_to(REPO_ROOT)}:{n}"
        for d in SOURCE_DIRS
        for path in (REPO_ROOT / d).rglob("*.py")
        if not path.name.endswith(("_pb2.py", "_pb2_grpc.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


def test_server_binds_loopback_by_default():
    from modelloop.arguments import build_parser
    from modelloop.serving.settings import ServingSettings

    assert ServingSettings(repo=Path(".")).host == "127.0.0.1"
    assert build_parser().parse_args(["serve", "--repo", "x"]).host == "127.0.0.1"
    assert build_parser().parse_args(["up"]).host == "127.0.0.1"
