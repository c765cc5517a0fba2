"""Runs in .venv-clients (tritonclient 2.73): ``python tritonclient_check.py PORT``.

Talks to the REST app over the real DataPlane with fake runtimes (see
``tests/serving/edge_support.py``): ``digits`` versions 1 and 2 answer each row's first
ten pixels; ``multi`` answers the row sums of ``a`` and echoes ``s``. Prints ``ALL OK``
when every check passes.
"""

from __future__ import annotations

import re
import sys

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def expect_error(call: object, status: str, fragment: str) -> None:
    try:
        call()  # type: ignore[operator]
    except InferenceServerException as error:
        assert error.status() == status, (error.status(), error.message())
        assert fragment in error.message(), error.message()
        return
    raise AssertionError(f"expected {status}")


def main(port: str) -> None:
    client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("digits")
    assert client.is_model_ready("digits", "1") and not client.is_model_ready("digits", "7")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    meta = client.get_model_metadata("digits")
    assert meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]
    assert meta["versions"] == ["1", "2"], meta

    x = np.arange(128, dtype=np.float32).reshape(2, 64)
    for binary_in in (True, False):
        pixels = httpclient.InferInput("pixels", [2, 64], "FP32")
        pixels.set_data_from_numpy(x, binary_data=binary_in)
        # No outputs named: tritonclient asks for every output in binary.
        result = client.infer("digits", [pixels])
        assert np.array_equal(result.as_numpy("probabilities"), x[:, :10])
        assert result.get_response()["model_version"] == "2"
        wanted = [httpclient.InferRequestedOutput("probabilities", binary_data=False)]
        result = client.infer("digits", [pixels], outputs=wanted, request_id="abc")
        assert np.array_equal(result.as_numpy("probabilities"), x[:, :10])
        assert result.get_response()["id"] == "abc"
        result = client.infer("digits", [pixels], model_version="1", request_compression_algorithm="gzip")
        assert np.array_equal(result.as_numpy("probabilities"), x[:, :10])
        assert result.get_response()["model_version"] == "1"

    # An id the server cannot keep is replaced by a fresh one.
    result = client.infer("digits", [pixels], headers={"x-request-id": "x" * 200})
    assert re.fullmatch("[0-9a-f]{32}", result.get_response()["id"]), result.get_response()

    a = httpclient.InferInput("a", [2, 2], "FP32")
    a.set_data_from_numpy(np.ones((2, 2), np.float32))
    s = httpclient.InferInput("s", [2], "BYTES")
    s.set_data_from_numpy(np.array([b"x", b"\xffy"], dtype=object))
    result = client.infer("multi", [a, s])
    assert result.as_numpy("y").tolist() == [2.0, 2.0]
    assert result.as_numpy("echo").tolist() == [b"x", b"\xffy"]
    s.set_data_from_numpy(np.array(["x", "yz"], dtype=object), binary_data=False)
    result = client.infer(
        "multi", [a, s], outputs=[httpclient.InferRequestedOutput("echo", binary_data=False)]
    )
    assert result.as_numpy("echo").tolist() == ["x", "yz"]

    expect_error(lambda: client.infer("nope", [a]), "404", "nope")
    expect_error(lambda: client.infer("digits", [pixels], model_version="-1"), "400", "non-negative integer")
    expect_error(lambda: client.infer("digits", [a]), "400", "'a'")
    expect_error(lambda: client.load_model("digits"), "401", "bearer token")
    auth = {"Authorization": "Bearer tok"}
    client.unload_model("digits", headers=auth)
    assert not client.is_model_ready("digits") and client.is_server_ready()
    expect_error(lambda: client.infer("digits", [pixels]), "503", "unloaded")
    client.load_model("digits", headers=auth)
    assert client.is_model_ready("digits")
    assert {row["name"] for row in client.get_model_repository_index(headers=auth)} == {"digits", "multi"}
    print("ALL OK")


if __name__ == "__main__":
    main(sys.argv[1])
