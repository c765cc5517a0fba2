"""Runs in .venv-clients (tritonclient 2.73): ``python tritonclient_grpc_check.py PORT PIXELS_NPY TOKEN``.

Talks to our gRPC server over the real DataPlane serving ``digits`` version 1, with
tritonclient's own generated stubs (which is why it runs in another process: two copies
of ``inference.*`` in one descriptor pool collide). Writes the probabilities it got to
``PIXELS_NPY`` with ``.out.npy`` appended, and prints ``ALL OK`` when every check passes.
"""

from __future__ import annotations

import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def expect_error(call: object, status: str, fragment: str) -> None:
    try:
        call()  # type: ignore[operator]
    except InferenceServerException as error:
        assert status in str(error.status()), (error.status(), error.message())
        assert fragment in error.message(), error.message()
        return
    raise AssertionError(f"expected {status}")


def main(port: str, pixels_path: str, token: str) -> None:
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits") and client.is_model_ready("digits", "1")
    server = client.get_server_metadata(as_json=True)
    assert server["name"] == "modelloop", server
    meta = client.get_model_metadata("digits", as_json=True)
    assert meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": ["-1", "64"]}], meta
    assert meta["versions"] == ["1"], meta
    config = client.get_model_config("digits", as_json=True)["config"]
    assert config["name"] == "digits" and config["input"][0]["data_type"] == "TYPE_FP32", config
    admin = {"authorization": f"Bearer {token}"}  # the index is an admin call
    expect_error(lambda: client.get_model_repository_index(as_json=True), "UNAUTHENTICATED", "Bearer")
    index = client.get_model_repository_index(headers=admin, as_json=True)
    entry = index["models"][0]
    assert (entry["name"], entry["version"], entry["state"]) in {
        ("digits", "1", "READY"),
        ("digits", "1", "AVAILABLE"),
    }, index
    assert client.get_model_repository_index(headers=admin, as_json=True) == index

    x = np.load(pixels_path)
    pixels = grpcclient.InferInput("pixels", list(x.shape), "FP32")
    pixels.set_data_from_numpy(x)
    result = client.infer("digits", [pixels], request_id="triton-1")
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (x.shape[0], 10) and probabilities.dtype == np.float32
    assert result.get_response().id == "triton-1"
    assert result.get_response().model_version == "1"
    wanted = [grpcclient.InferRequestedOutput("probabilities")]
    again = client.infer("digits", [pixels], model_version="1", outputs=wanted, headers={"x-request-id": "h"})
    assert np.array_equal(again.as_numpy("probabilities"), probabilities)
    np.save(pixels_path + ".out.npy", probabilities)

    expect_error(lambda: client.infer("nope", [pixels]), "NOT_FOUND", "nope")
    expect_error(lambda: client.infer("digits", [pixels], model_version="7"), "NOT_FOUND", "7")
    wrong = grpcclient.InferInput("image", list(x.shape), "FP32")
    wrong.set_data_from_numpy(x)
    expect_error(lambda: client.infer("digits", [wrong]), "INVALID_ARGUMENT", "image")
    narrow = grpcclient.InferInput("pixels", [x.shape[0], 8], "FP32")
    narrow.set_data_from_numpy(np.ascontiguousarray(x[:, :8]))
    expect_error(lambda: client.infer("digits", [narrow]), "INVALID_ARGUMENT", "64")
    expect_error(
        lambda: client.infer("digits", [pixels], outputs=[grpcclient.InferRequestedOutput("logits")]),
        "INVALID_ARGUMENT",
        "logits",
    )
    [stats] = client.get_inference_statistics("digits", as_json=True)["model_stats"]
    assert int(stats["inference_count"]) >= 2 * x.shape[0], stats  # the two answered infers
    assert int(stats["inference_stats"]["fail"]["count"]) >= 3, stats  # the refused ones after them
    expect_error(lambda: client.get_inference_statistics("nope"), "NOT_FOUND", "nope")
    assert client.is_server_ready(), "the server keeps serving after bad requests"
    print("ALL OK")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
