"""The TF Serving messages generated without TensorFlow are TF Serving's, byte for byte.

The generated modules must (1) be what the generator makes from the committed ``.proto``
files, (2) come from ``.proto`` files that are exactly the installed
``tensorflow-serving-api``'s definitions, (3) load without importing TensorFlow, and
(4) serialize the same content to the same bytes as ``tensorflow_serving.apis``. The
last check builds the messages in a child process that never imports TensorFlow, so the
two sides do not share one descriptor pool.
"""

from __future__ import annotations

import base64
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from modelloop.serving.protos import tfserving_generate as gen

# Builds the same messages in a TensorFlow-free child and prints them, base64, as JSON.
_CHILD = r"""
import base64, json, sys
import numpy as np
from modelloop.serving.codecs import tensor_proto
from modelloop.serving.protos.tfserving import (
    tensorflow_serving_apis_get_model_status_pb2 as status_pb2,
    tensorflow_serving_apis_predict_pb2 as predict_pb2,
)
from modelloop.serving.types import (
    InferResponse, ModelMetadata, ModelState, TensorSpec, VersionStatus,
)

request = predict_pb2.PredictRequest()
request.model_spec.name = "digits"
request.model_spec.version.value = 3
request.model_spec.signature_name = "serving_default"
request.output_filter.append("probabilities")
tensor = request.inputs["pixels"]
tensor.dtype = 1
tensor.tensor_shape.dim.add().size = 2
tensor.tensor_shape.dim.add().size = 3
tensor.float_val.extend([0.5, 1.0, 2.0, 3.0, 4.0, 5.0])
response = tensor_proto.encode_predict_response(
    InferResponse(model="digits", version=3, id="r1",
                  outputs={"probabilities": np.arange(6, dtype=np.float32).reshape(2, 3),
                           "labels": np.array([b"a", b"b"], dtype=object)}),
    "serving_default",
)
meta = ModelMetadata(
    name="digits", version=3, platform="onnxruntime_onnx",
    inputs=(TensorSpec("pixels", np.dtype(np.float32), (-1, 64)),),
    outputs=(TensorSpec("probabilities", np.dtype(np.float32), (-1, 10)),),
)
metadata = tensor_proto.encode_model_metadata_response(meta)
status = tensor_proto.encode_model_status_response(
    [VersionStatus(3, ModelState.AVAILABLE), VersionStatus(2, ModelState.FAILED, "bad file")]
)
out = {name: base64.b64encode(m.SerializeToString(deterministic=True)).decode()
       for name, m in (("request", request), ("response", response), ("metadata", metadata),
                       ("status", status))}
out["tensorflow_imported"] = any(m == "tensorflow" or m.startswith("tensorflow.") for m in sys.modules)
print(json.dumps(out))
"""


def test_committed_modules_match_a_fresh_compile(tmp_path: Path) -> None:
    fresh = gen.compile_protos(gen.PROTO_ROOT, tmp_path)
    assert fresh, "nothing was generated"
    for path in fresh:
        committed = gen.PACKAGE_DIR / path.name
        assert committed.is_file(), f"{path.name} is missing: run `python -m {gen.__name__} --compile-only`"
        assert committed.read_text() == path.read_text(), f"{path.name} is stale"
    stale = {p.name for p in gen.PACKAGE_DIR.glob("*_pb2*.py*")} - {p.name for p in fresh}
    assert not stale, f"generated modules without a .proto: {sorted(stale)}"


def test_proto_files_are_the_installed_definitions() -> None:
    installed = {f.name: gen.render_proto(f) for f in gen.installed_files()}
    assert set(installed) == set(gen.proto_files(gen.PROTO_ROOT))
    for name, text in installed.items():
        assert (gen.PROTO_ROOT / name).read_text() == text, f"{name} differs: run `python -m {gen.__name__}`"


def test_descriptors_are_byte_identical_to_tensorflow_serving_apis() -> None:
    # Both copies may live in one process (a SavedModel runtime imports TensorFlow): the
    # pool accepts a file twice only if it is identical, and then both share its classes.
    for file in gen.installed_files():
        ours = importlib.import_module(f"{gen.PACKAGE}.{gen.module_name(file.name)}")
        assert ours.DESCRIPTOR.serialized_pb == file.SerializeToString(), file.name
    from tensorflow_serving.apis import predict_pb2

    ours_predict = importlib.import_module(f"{gen.PACKAGE}.tensorflow_serving_apis_predict_pb2")
    assert ours_predict.PredictRequest is predict_pb2.PredictRequest


def test_messages_serialize_like_tensorflow_serving_apis() -> None:
    child = subprocess.run(
        [sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=120, check=False
    )
    assert child.returncode == 0, child.stderr
    built = json.loads(child.stdout.strip().splitlines()[-1])
    assert built.pop("tensorflow_imported") is False
    wire = {name: base64.b64decode(value) for name, value in built.items()}

    import tensorflow as tf
    from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "digits"
    request.model_spec.version.value = 3
    request.model_spec.signature_name = "serving_default"
    request.output_filter.append("probabilities")
    request.inputs["pixels"].CopyFrom(
        tf.make_tensor_proto(np.array([[0.5, 1, 2], [3, 4, 5]], np.float32), dtype=tf.float32)
    )
    # make_tensor_proto writes tensor_content; the child wrote float_val: same values,
    # different fields. Compare the decoded values, then the exact bytes of float_val.
    parsed = predict_pb2.PredictRequest.FromString(wire["request"])
    assert parsed.model_spec == request.model_spec
    assert np.array_equal(tf.make_ndarray(parsed.inputs["pixels"]), tf.make_ndarray(request.inputs["pixels"]))
    request.inputs["pixels"].ClearField("tensor_content")
    request.inputs["pixels"].float_val.extend([0.5, 1.0, 2.0, 3.0, 4.0, 5.0])
    assert request.SerializeToString(deterministic=True) == wire["request"]

    response = predict_pb2.PredictResponse()
    response.model_spec.name = "digits"
    response.model_spec.version.value = 3
    response.model_spec.signature_name = "serving_default"
    response.outputs["probabilities"].CopyFrom(
        tf.make_tensor_proto(np.arange(6, dtype=np.float32).reshape(2, 3))
    )
    response.outputs["labels"].CopyFrom(tf.make_tensor_proto(np.array([b"a", b"b"], dtype=object)))
    assert response.SerializeToString(deterministic=True) == wire["response"]

    metadata = get_model_metadata_pb2.GetModelMetadataResponse.FromString(wire["metadata"])
    assert metadata.SerializeToString(deterministic=True) == wire["metadata"]
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    assert metadata.metadata["signature_def"].Unpack(signature_map)
    assert (
        signature_map.signature_def["serving_default"].inputs["pixels"].dtype == tf.float32.as_datatype_enum
    )

    status = get_model_status_pb2.GetModelStatusResponse.FromString(wire["status"])
    assert [v.version for v in status.model_version_status] == [3, 2]
    assert status.model_version_status[1].status.error_message == "bad file"
    assert status.SerializeToString(deterministic=True) == wire["status"]


@pytest.mark.parametrize(
    "module", ["modelloop.server", "modelloop.serving.grpc.server", "modelloop.serving.codecs.tensor_proto"]
)
def test_the_server_imports_no_tensorflow(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'tf2onnx'))\n"
        "print(bad)\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == "[]"


def test_module_names_are_flat_and_unique() -> None:
    names = [gen.module_name(f) for f in gen.proto_files(gen.PROTO_ROOT)]
    assert len(names) == len(set(names))
    assert gen.module_name("xla/tsl/protobuf/error_codes.proto") == "xla_tsl_protobuf_error_codes_pb2"


def test_tensorflow_loads_only_with_a_savedmodel_runtime(digits_repo: Path) -> None:
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "import modelloop.server\n"
        "from modelloop.serving.servable import create_runtime\n"
        "from modelloop.serving.repository import ModelRepository\n"
        "from modelloop.serving.settings import ModelConfig, ServingSettings\n"
        "repo = Path(sys.argv[1]); version = repo / 'digits' / '1'\n"
        "loaded = lambda: 'tensorflow' in sys.modules\n"
        "print(loaded())\n"
        "for kind, platform in (('onnx', 'onnxruntime_onnx'), ('savedmodel', 'tensorflow_savedmodel')):\n"
        "    meta = ModelRepository.read_metadata(version, 'digits', 1, platform)\n"
        "    runtime = create_runtime(kind, version, meta, ModelConfig(), ServingSettings(repo=repo))\n"
        "    print(loaded())\n"
        "    runtime.load()\n"
        "    print(loaded())\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", code, str(digits_repo)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert child.returncode == 0, child.stderr
    # Nothing after the server's imports and an ONNX load; TensorFlow once a SavedModel loads.
    assert child.stdout.split() == ["False", "False", "False", "False", "True"]
