"""A text classifier served by its own ``model.py``, end to end with real processes.

``modelloop train text-topics`` and ``modelloop export RUN --repo R`` make the version
(``model.py`` + ``model.onnx``, BYTES input); one real ``modelloop serve`` then answers
strings over TF Serving REST (row, columnar, ``b64``), OIP REST (JSON and the binary
extension), TF Serving gRPC (``DT_STRING``) and OIP gRPC (typed and raw contents), batches
concurrent requests into one ``predict``, reports a model's own errors as 500 / INTERNAL
with its text, keeps serving when a newer ``model.py`` fails to import, logs the strings'
predictions for monitoring, and refuses code sent through the repository API.
"""

from __future__ import annotations

import base64
import json
import shutil
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

from modelloop.serving.protos import grpc_service_pb2 as oip
from modelloop.serving.protos import grpc_service_pb2_grpc as oip_grpc
from modelloop.training.specs.text_topics import DIMENSIONS, TOPICS
from modelloop.training.specs.text_topics_model import featurize
from tests.e2e.serverproc import ServerProcess, start_server, wait_for

# Tens of seconds or more: `make test-fast` leaves it out.
pytestmark = pytest.mark.slow

MODEL = "text-topics"
ADMIN = "admin-token-for-the-python-model-test"
LABELER = "labeler-token-for-the-python-model-test"
ATOL = 1e-5
TEXTS = [
    "Set a breakpoint at line 12 and step into the function.",
    "Use a format spec to right-align a float in ten characters.",
    "Return a copy of the string with trailing whitespace removed.",
    "Return the value for key if key is in the dictionary.",
    "naïve café — ünïcode",
    "",
]
# Raises in predict on this text, so a client sees the model's own error.
BROKEN_PREDICT = """
import numpy as np

class Model:
    def load(self, version_dir):
        pass

    def predict(self, inputs):
        if b"boom" in inputs["text"].tolist():
            raise ValueError("tokenizer cannot handle 'boom'")
        return {"echo": inputs["text"]}
"""


def _modelloop(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "modelloop", *args], capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``modelloop train text-topics`` then ``modelloop export``, plus a model whose predict raises."""
    base = tmp_path_factory.mktemp("python-model")
    run, repo = base / "run", base / "repo"
    _modelloop("train", "text-topics", "--out", str(run), "--epochs", "3")
    export = _modelloop("export", str(run), "--repo", str(repo))
    assert export.stdout.strip().endswith(f"{MODEL}/1")
    assert "model.py parity passed: max abs diff" in export.stderr
    # Concurrent requests wait up to 50 ms for company, so the batching test is not a race.
    batching = {"max_batch_size": 32, "batch_timeout_micros": 50_000, "num_batch_threads": 1}
    (repo / MODEL / "config.json").write_text(json.dumps({"batching": batching}))
    broken = repo / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "model.py").write_text(BROKEN_PREDICT)
    card = {
        "inputs": [{"name": "text", "dtype": "object", "shape": [-1]}],
        "outputs": [{"name": "echo", "dtype": "object", "shape": [-1]}],
    }
    (broken / "model.json").write_text(json.dumps(card))
    return repo


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {
        "MODELLOOP_ADMIN_TOKEN": ADMIN,
        "MODELLOOP_FEEDBACK_TOKENS": json.dumps({"tester": LABELER}),
        "MODELLOOP_MONITORING_STATE_DIR": str(tmp_path_factory.mktemp("state")),
        "MODELLOOP_MONITORING_EVAL_INTERVAL_S": "0.5",
        "MODELLOOP_MONITORING_MIN_ROWS": "20",
        "MODELLOOP_MONITORING_MIN_LABELS": "5",
        "MODELLOOP_MONITORING_TRIGGER": "none",
    }
    proc = start_server(repo, env=env)
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def expected(repo: Path) -> np.ndarray:
    """The featurizer training used, then ONNX Runtime on the published network."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(repo / MODEL / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"features": featurize(TEXTS, DIMENSIONS)})[0]


@pytest.fixture(scope="module")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.grpc_target) as ch:
        yield ch


def _labels(probabilities: np.ndarray) -> list[str]:
    names = list(TOPICS.values())
    return [names[i] for i in probabilities.argmax(axis=1)]


def _check(probabilities: object, labels: object, expected: np.ndarray) -> None:
    np.testing.assert_allclose(np.asarray(probabilities, dtype=np.float32), expected, atol=ATOL)
    assert list(labels) == _labels(expected)  # type: ignore[call-overload]


def test_the_version_is_served_by_its_model_py(server: ServerProcess, repo: Path) -> None:
    version = repo / MODEL / "1"
    shipped = {p.name for p in version.iterdir()}
    assert {"model.py", "model.onnx", "model.json", "baseline.json", "warmup.json"} <= shipped
    # Its warm-up is the spec's raw texts (what model.py takes), and it passed: the version serves.
    warmup = json.loads((version / "warmup.json").read_text())
    assert warmup[0]["inputs"][0]["datatype"] == "BYTES"
    assert not (version / "saved_model").exists()
    card = json.loads((version / "model.json").read_text())
    assert card["parity"]["model_py"]["passed"] is True
    meta = httpx.get(f"{server.rest_url}/v2/models/{MODEL}", timeout=5).json()
    assert meta["platform"] == "python"
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert [o["datatype"] for o in meta["outputs"]] == ["FP32", "BYTES"]


def test_tfserving_rest_rows_columns_and_b64(server: ServerProcess, expected: np.ndarray) -> None:
    url = f"{server.rest_url}/v1/models/{MODEL}:predict"
    rows = httpx.post(url, json={"instances": TEXTS}, timeout=10)
    assert rows.status_code == 200, rows.text
    predictions = rows.json()["predictions"]
    _check([p["probabilities"] for p in predictions], [p["label"] for p in predictions], expected)

    b64 = [{"b64": base64.b64encode(t.encode()).decode()} for t in TEXTS]
    columns = httpx.post(url, json={"inputs": {"text": b64}}, timeout=10)
    assert columns.status_code == 200, columns.text
    outputs = columns.json()["outputs"]
    _check(outputs["probabilities"], outputs["label"], expected)


def test_oip_rest_json_and_binary(server: ServerProcess, expected: np.ndarray) -> None:
    url = f"{server.rest_url}/v2/models/{MODEL}/infer"
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(TEXTS)], "data": TEXTS}]}
    r = httpx.post(url, json=body, timeout=10)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert out["label"]["datatype"] == "BYTES" and out["label"]["shape"] == [len(TEXTS)]
    _check(np.reshape(out["probabilities"]["data"], (len(TEXTS), -1)), out["label"]["data"], expected)

    # The binary extension: each BYTES element is a 4-byte little-endian length, then its bytes.
    raw = b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in TEXTS)
    header = {
        "inputs": [
            {
                "name": "text",
                "datatype": "BYTES",
                "shape": [len(TEXTS)],
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
        "outputs": [{"name": "label"}, {"name": "probabilities"}],
    }
    head = json.dumps(header).encode()
    r = httpx.post(
        url,
        content=head + raw,
        headers={
            "Inference-Header-Content-Length": str(len(head)),
            "Content-Type": "application/octet-stream",
        },
        timeout=10,
    )
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    _check(np.reshape(out["probabilities"]["data"], (len(TEXTS), -1)), out["label"]["data"], expected)


def test_tfserving_grpc_dt_string(channel: grpc.Channel, expected: np.ndarray) -> None:
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL
    request.inputs["text"].CopyFrom(
        tensor_pb2.TensorProto(
            dtype=types_pb2.DT_STRING,
            tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[{"size": len(TEXTS)}]),
            string_val=[t.encode() for t in TEXTS],
        )
    )
    response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=10)
    probabilities = response.outputs["probabilities"]
    got = (
        np.frombuffer(probabilities.tensor_content, np.float32)
        if probabilities.tensor_content
        else np.array(probabilities.float_val)
    )
    label = response.outputs["label"]
    assert label.dtype == types_pb2.DT_STRING
    _check(got.reshape(expected.shape), [v.decode() for v in label.string_val], expected)


@pytest.mark.parametrize("raw", [False, True], ids=["bytes_contents", "raw_input_contents"])
def test_oip_grpc_bytes(channel: grpc.Channel, expected: np.ndarray, raw: bool) -> None:
    request = oip.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name="text", datatype="BYTES", shape=[len(TEXTS)])
    if raw:
        request.raw_input_contents.append(
            b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in TEXTS)
        )
    else:
        tensor.contents.bytes_contents.extend(t.encode() for t in TEXTS)
    response = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    names = [o.name for o in response.outputs]
    contents = dict(zip(names, response.raw_output_contents, strict=True))
    probabilities = np.frombuffer(contents["probabilities"], np.float32).reshape(expected.shape)
    labels, data = [], contents["label"]
    while data:
        (size,) = struct.unpack("<I", data[:4])
        labels.append(data[4 : 4 + size].decode())
        data = data[4 + size :]
    _check(probabilities, labels, expected)


def _samples(server: ServerProcess, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels`` (0 when there is none)."""
    text = httpx.get(f"{server.rest_url}/metrics", timeout=5).text
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") and all(w in line for w in wanted)
    )


def test_concurrent_requests_are_batched_into_one_predict(
    server: ServerProcess, expected: np.ndarray
) -> None:
    calls_before = _samples(server, "modelloop_batch_size_count", model=MODEL, version="1")
    rows_before = _samples(server, "modelloop_batch_size_sum", model=MODEL, version="1")
    url = f"{server.rest_url}/v1/models/{MODEL}:predict"

    def one(i: int) -> dict[str, object]:
        r = httpx.post(url, json={"instances": [TEXTS[i % len(TEXTS)]]}, timeout=20)
        assert r.status_code == 200, r.text
        return r.json()["predictions"][0]

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(one, range(24)))
    for i, answer in enumerate(answers):
        np.testing.assert_allclose(answer["probabilities"], expected[i % len(TEXTS)], atol=ATOL)
    calls = _samples(server, "modelloop_batch_size_count", model=MODEL, version="1") - calls_before
    rows = _samples(server, "modelloop_batch_size_sum", model=MODEL, version="1") - rows_before
    assert rows == 24
    assert calls < 24, f"{calls} model calls for 24 concurrent one-row requests"


def test_a_model_that_raises_in_predict_is_500_with_its_text(
    server: ServerProcess, channel: grpc.Channel
) -> None:
    url = f"{server.rest_url}/v2/models/broken/infer"
    ok = httpx.post(
        url, json={"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["hi"]}]}
    )
    assert ok.status_code == 200 and ok.json()["outputs"][0]["data"] == ["hi"]
    bad = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["hi", "boom"]}]}
    r = httpx.post(url, json=bad, timeout=10)
    assert r.status_code == 500
    assert "ValueError: tokenizer cannot handle 'boom'" in r.json()["error"]

    tf_rest = httpx.post(f"{server.rest_url}/v1/models/broken:predict", json={"instances": ["boom"]})
    assert tf_rest.status_code == 500 and "tokenizer cannot handle 'boom'" in tf_rest.json()["error"]

    request = oip.ModelInferRequest(model_name="broken")
    request.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"boom")
    with pytest.raises(grpc.RpcError) as info:
        oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "tokenizer cannot handle 'boom'" in info.value.details()

    # Logged (the server's output reaches this process through a pipe, so it may lag a little).
    assert wait_for(lambda: "tokenizer cannot handle 'boom'" in server.output(), timeout=10)
    # Counted: the two REST calls and the gRPC call, under code INTERNAL.
    assert _samples(server, "modelloop_requests_total", model="broken", code="INTERNAL") == 3


def test_string_predictions_reach_monitoring(server: ServerProcess) -> None:
    url = f"{server.rest_url}/v1/models/{MODEL}:predict"
    names = list(TOPICS.values())
    feedback = []
    for i in range(5):
        r = httpx.post(url, json={"instances": TEXTS[:4]}, headers={"x-request-id": f"text-{i}"}, timeout=10)
        assert r.status_code == 200
        # Labels that agree with three of the four answers: accuracy 0.75.
        targets = [names.index(p["label"]) for p in r.json()["predictions"]]
        targets[0] = (targets[0] + 1) % len(names)
        feedback.append({"request_id": r.headers["x-request-id"], "targets": targets})
    r = httpx.post(
        f"{server.rest_url}/v1/models/{MODEL}/feedback",
        json={"feedback": feedback},
        headers={"Authorization": f"Bearer {LABELER}"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    assert wait_for(lambda: _samples(server, "modelloop_accuracy", model=MODEL, version="1") == 0.75, 20)
    assert wait_for(lambda: _samples(server, "modelloop_prediction_drift", model=MODEL, version="1") > 0, 20)
    # Strings have no feature columns: no feature drift is reported for this model.
    assert _samples(server, "modelloop_feature_drift", model=MODEL) == 0
    assert _samples(server, "modelloop_drift_detected", model=MODEL) == 0


def test_a_new_version_whose_model_py_fails_to_import_leaves_the_old_one_serving(
    server: ServerProcess, repo: Path, expected: np.ndarray
) -> None:
    staged = repo / ".staging" / "v2"
    shutil.copytree(repo / MODEL / "1", staged)
    (staged / "model.py").write_text(
        textwrap.dedent(
            """\
            import numpy as np
            import tokenizers_that_are_not_installed
            """
        )
    )
    staged.rename(repo / MODEL / "2")

    def status() -> dict[str, object]:
        versions = httpx.get(f"{server.rest_url}/v1/models/{MODEL}", timeout=5).json()["model_version_status"]
        return {v["version"]: v for v in versions}

    assert wait_for(
        lambda: status().get("2", {}).get("status", {}).get("error_code") == "UNKNOWN", timeout=20
    )
    message = status()["2"]["status"]["error_message"]
    assert "No module named 'tokenizers_that_are_not_installed'" in message and "model.py line 2" in message
    assert status()["1"]["state"] == "AVAILABLE"
    r = httpx.post(f"{server.rest_url}/v1/models/{MODEL}:predict", json={"instances": TEXTS}, timeout=10)
    assert r.status_code == 200
    predictions = r.json()["predictions"]
    _check([p["probabilities"] for p in predictions], [p["label"] for p in predictions], expected)


def test_the_repository_api_takes_no_code(server: ServerProcess, channel: grpc.Channel, repo: Path) -> None:
    auth = {"Authorization": f"Bearer {ADMIN}"}
    upload = {"parameters": {"file:1/model.py": base64.b64encode(b"import os\n").decode()}}
    url = f"{server.rest_url}/v2/repository/models/broken/load"
    r = httpx.post(url, json=upload, headers=auth, timeout=10)
    assert r.status_code == 400
    assert "model files cannot be uploaded" in r.json()["error"]
    assert "file:1/model.py" in r.json()["error"]

    request = oip.RepositoryModelLoadRequest(model_name="broken")
    request.parameters["file:1/model.py"].bytes_param = b"import os\n"
    with pytest.raises(grpc.RpcError) as info:
        oip_grpc.GRPCInferenceServiceStub(channel).RepositoryModelLoad(
            request, metadata=(("authorization", f"Bearer {ADMIN}"),), timeout=10
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model files cannot be uploaded" in info.value.details()

    assert (repo / "broken" / "1" / "model.py").read_text() == BROKEN_PREDICT
    assert httpx.post(url, headers=auth, timeout=10).status_code == 200  # a plain load still works
