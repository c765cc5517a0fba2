"""TLS on both ports with a self-signed certificate made in the test."""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import pytest

from modelloop.serving.protos import grpc_service_pb2 as oip
from modelloop.serving.protos import grpc_service_pb2_grpc as oip_grpc
from tests.e2e.serverproc import start_server
from tests.tools import require_tool


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    openssl = require_tool("openssl", "Debian package openssl")
    root = tmp_path_factory.mktemp("tls")
    cert, key = root / "cert.pem", root / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


@pytest.fixture(scope="module")
def tls_server(hostile_repo, certificate):
    cert, key = certificate
    proc = start_server(
        hostile_repo,
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
        verify=ssl.create_default_context(cafile=str(cert)),
    )
    try:
        yield proc
    finally:
        proc.stop()


def test_rest_over_tls(tls_server, certificate):
    cert, _ = certificate
    assert tls_server.rest_url.startswith("https://")
    r = httpx.post(
        f"{tls_server.rest_url}/v1/models/digits:predict",
        json={"instances": [[0.0] * 64]},
        verify=ssl.create_default_context(cafile=str(cert)),
        timeout=10,
    )
    assert r.status_code == 200
    assert len(r.json()["predictions"][0]) == 10
    with pytest.raises(httpx.HTTPError):  # an untrusted certificate is refused by a verifying client
        httpx.get(f"{tls_server.rest_url}/v2/health/live", timeout=10)
    plain = tls_server.rest_url.replace("https://", "http://")
    with pytest.raises(httpx.HTTPError):  # plaintext on the TLS port gets no HTTP answer
        httpx.get(f"{plain}/v2/health/live", timeout=5)


def test_grpc_over_tls(tls_server, certificate):
    cert, _ = certificate
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    with grpc.secure_channel(tls_server.grpc_target, credentials) as channel:
        assert oip_grpc.GRPCInferenceServiceStub(channel).ServerLive(oip.ServerLiveRequest(), timeout=10).live
    with grpc.insecure_channel(tls_server.grpc_target) as channel, pytest.raises(grpc.RpcError):
        oip_grpc.GRPCInferenceServiceStub(channel).ServerLive(oip.ServerLiveRequest(), timeout=5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tls-cert", "/nonexistent/cert.pem", "--tls-key", "/nonexistent/key.pem"], "does not exist"),
        (["--tls-cert", __file__], "must be set together"),
    ],
)
def test_bad_tls_settings_are_one_line_errors(hostile_repo, args, message):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "modelloop",
            "serve",
            "--repo",
            str(hostile_repo),
            "--rest-port",
            "0",
            "--grpc-port",
            "0",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1]
