"""One admin check for both transports: every admin route and RPC, REST and gRPC, with no
token, an empty one, a wrong one, a labeler's and the admin's; and a blank configured token
stops the server at start-up instead of opening the door to an empty credential."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from modelloop.serving.protos import grpc_service_pb2 as oip
from modelloop.serving.protos import grpc_service_pb2_grpc as oip_grpc
from tests.e2e.serverproc import ServerProcess, start_server

ADMIN = "admin-token-5f1c2d9e"
LABELER = "alice-token-77a0b3"

REST_ADMIN_ROUTES = [
    "/v2/repository/index",
    "/v2/repository/models/digits/load",
    "/monitoring/alerts",
    "/monitoring/rollouts/digits/pause",
    "/monitoring/rollouts/digits/promote",
    "/monitoring/rollouts/digits/rollback",
    # Last: with the admin's token it unloads the model, and the test loads it again.
    "/v2/repository/models/digits/unload",
]
GRPC_ADMIN_RPCS = ["RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"]
REFUSED = {
    "none": None,
    "empty": "Bearer ",
    "blank": "Bearer    ",
    "wrong": "Bearer not-the-admin-token",
    "labeler": f"Bearer {LABELER}",
    "basic": f"Basic {ADMIN}",
}


@pytest.fixture(scope="module")
def server(digits_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    state = tmp_path_factory.mktemp("admin-auth-state")
    proc = start_server(
        digits_repo,
        "--state-dir",
        str(state),
        env={"MODELLOOP_ADMIN_TOKEN": ADMIN, "MODELLOOP_FEEDBACK_TOKENS": f'{{"alice": "{LABELER}"}}'},
    )
    try:
        yield proc
    finally:
        proc.stop()


def _grpc_call(server: ServerProcess, rpc: str, authorization: str | None) -> grpc.StatusCode:
    metadata = [] if authorization is None else [("authorization", authorization)]
    requests = {
        "RepositoryIndex": oip.RepositoryIndexRequest(),
        "RepositoryModelLoad": oip.RepositoryModelLoadRequest(model_name="digits"),
        "RepositoryModelUnload": oip.RepositoryModelUnloadRequest(model_name="digits"),
    }
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        try:
            getattr(stub, rpc)(requests[rpc], timeout=30, metadata=metadata)
        except grpc.RpcError as error:
            return error.code()
    return grpc.StatusCode.OK


def _ready(server: ServerProcess) -> bool:
    return httpx.get(f"{server.rest_url}/v2/models/digits/ready", timeout=10).status_code == 200


@pytest.mark.parametrize("who", sorted(REFUSED))
def test_every_admin_route_and_rpc_refuses_anything_but_the_admin_token(
    server: ServerProcess, who: str
) -> None:
    authorization = REFUSED[who]
    headers = {} if authorization is None else {"authorization": authorization}
    for path in REST_ADMIN_ROUTES:
        r = httpx.post(f"{server.rest_url}{path}", headers=headers, json={"alerts": []}, timeout=10)
        assert r.status_code == 401, (path, r.status_code, r.text)
        assert "admin token" in r.json()["error"]
    for rpc in GRPC_ADMIN_RPCS:
        assert _grpc_call(server, rpc, authorization) == grpc.StatusCode.UNAUTHENTICATED, rpc
    assert _ready(server)  # nothing was unloaded


def test_the_admin_token_opens_every_admin_route_and_rpc(server: ServerProcess) -> None:
    headers = {"authorization": f"Bearer {ADMIN}"}
    for path in REST_ADMIN_ROUTES:
        r = httpx.post(f"{server.rest_url}{path}", headers=headers, json={"alerts": []}, timeout=30)
        # Past the check: the route's own answer (a rollout action on a model without one
        # is 404 or 409), never the admin check's 401 or 403.
        assert r.status_code not in (401, 403), (path, r.text)
        if path.endswith("/unload"):
            assert r.status_code == 200 and not _ready(server)
            reload = httpx.post(
                f"{server.rest_url}/v2/repository/models/digits/load", headers=headers, timeout=60
            )
            assert reload.status_code == 200 and _ready(server)
    for rpc in GRPC_ADMIN_RPCS:
        assert _grpc_call(server, rpc, f"Bearer {ADMIN}") == grpc.StatusCode.OK, rpc
    assert not _ready(server)  # the last RPC unloaded it
    assert _grpc_call(server, "RepositoryModelLoad", f"Bearer {ADMIN}") == grpc.StatusCode.OK
    assert _ready(server)


def test_without_an_admin_token_both_transports_answer_permission_denied(digits_repo: Path) -> None:
    proc = start_server(digits_repo)
    try:
        for path in REST_ADMIN_ROUTES[:2]:
            r = httpx.post(f"{proc.rest_url}{path}", headers={"authorization": "Bearer x"}, timeout=10)
            assert r.status_code == 403 and "MODELLOOP_ADMIN_TOKEN" in r.json()["error"]
        for rpc in GRPC_ADMIN_RPCS:
            assert _grpc_call(proc, rpc, "Bearer ") == grpc.StatusCode.PERMISSION_DENIED, rpc
        assert _ready(proc)
    finally:
        proc.stop()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("MODELLOOP_ADMIN_TOKEN", ""),
        ("MODELLOOP_ADMIN_TOKEN", "   "),
        ("MODELLOOP_ADMIN_TOKEN_FILE", "blank-file"),
        ("MODELLOOP_FEEDBACK_TOKEN", ""),
        ("MODELLOOP_FEEDBACK_TOKEN", " "),
        ("MODELLOOP_FEEDBACK_TOKEN_FILE", "blank-file"),
        ("MODELLOOP_FEEDBACK_TOKENS", '{"alice": ""}'),
    ],
)
def test_an_empty_or_blank_token_stops_start_up_with_one_line(
    digits_repo: Path, tmp_path: Path, variable: str, value: str
) -> None:
    if value == "blank-file":
        blank = tmp_path / "token"
        blank.write_text("  \n")
        value = str(blank)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELLOOP_")}
    env[variable] = value
    cmd = [sys.executable, "-m", "modelloop", "serve", "--repo", str(digits_repo), "--rest-port", "0"]
    cmd += ["--grpc-port", "0", "--state-dir", str(tmp_path / "state")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("modelloop: error:")]
    assert len(errors) == 1, done.stderr
    assert variable.removesuffix("_FILE") in errors[0] and "Traceback" not in done.stderr
