"""The Open Inference Protocol's own examples and schemas, run through our OIP REST codec.

Sources, each cited where it is used (all Apache License 2.0 or, for Triton, BSD-3-Clause):

* OIP: KServe's ``docs/predict-api/v2/required_api.md`` (kserve/kserve at commit
  00c994162ae1acdeca5738971f5aed08f3cdbbfc), the same text as the Open Inference Protocol's
  ``specification/protocol/inference_rest.md`` (kserve/open-inference-protocol at commit
  011728e1fe18619e620e4df99f63678e2b6b7285): the inference request and response examples,
  the tensor data forms, parameters and the error object.
* OIP's OpenAPI description, ``docs/predict-api/v2/rest_predict_v2.yaml`` (kserve/kserve at
  commit 2159c3fcccd810e3f73c6cd4d26146fc8685deb4): the JSON schemas of the answers, copied
  below as ``SPEC_SCHEMAS``; every answer we encode must validate against them.
* Triton's binary tensor data extension, ``docs/protocol/extension_binary_data.md``
  (triton-inference-server/server at commit 02c5c956f11ccfcf2a1c1b2d906149d43a71045f): the
  binary request and response example.

Where the spec's own example does not follow the spec, the case says so and what we do.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import jsonschema
import numpy as np
import pytest

from modelloop.errors import ErrorCode
from modelloop.serving.codecs import v2_json
from modelloop.serving.errors import InvalidInput
from modelloop.serving.rest.errors import error_response
from modelloop.serving.types import InferResponse, ModelMetadata, TensorSpec

# rest_predict_v2.yaml, components/schemas (the response schemas), as JSON Schema.
SPEC_SCHEMAS: dict[str, Any] = {
    "parameters": {"type": "object"},
    "tensor_data": {
        "type": "array",
        "items": {
            "anyOf": [
                {"$ref": "#/$defs/tensor_data"},
                {"type": "number"},
                {"type": "string"},
                {"type": "boolean"},
            ]
        },
    },
    "response_output": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
            "datatype": {"type": "string"},
            "parameters": {"$ref": "#/$defs/parameters"},
            "data": {"$ref": "#/$defs/tensor_data"},
        },
        "required": ["name", "shape", "datatype", "data"],
    },
    "inference_response": {
        "type": "object",
        "properties": {
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
            "id": {"type": "string"},
            "parameters": {"$ref": "#/$defs/parameters"},
            "outputs": {"type": "array", "items": {"$ref": "#/$defs/response_output"}},
        },
        "required": ["model_name", "outputs"],
    },
    "metadata_tensor": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "datatype": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
        },
        "required": ["name", "datatype", "shape"],
    },
    "metadata_model_response": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "versions": {"type": "array", "items": {"type": "string"}},
            "platform": {"type": "string"},
            "inputs": {"type": "array", "items": {"$ref": "#/$defs/metadata_tensor"}},
            "outputs": {"type": "array", "items": {"$ref": "#/$defs/metadata_tensor"}},
        },
        "required": ["name", "platform"],
    },
    "metadata_server_response": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "version": {"type": "string"},
            "extensions": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["name", "version", "extensions"],
    },
    "inference_error_response": {"type": "object", "properties": {"error": {"type": "string"}}},
}


def conforms(document: Any, schema: str) -> None:
    jsonschema.validate(document, {"$ref": f"#/$defs/{schema}", "$defs": SPEC_SCHEMAS})


def decode(document: dict[str, Any] | bytes, header_length: int | None = None) -> v2_json.InferCall:
    body = document if isinstance(document, bytes) else json.dumps(document).encode()
    return v2_json.decode_infer_request(body, model="mymodel", header_length=header_length)


# required_api.md, "Inference Request Examples": a model with two inputs and one output.
SPEC_REQUEST = {
    "id": "42",
    "inputs": [
        {"name": "input0", "shape": [2, 2], "datatype": "UINT32", "data": [1, 2, 3, 4]},
        {"name": "input1", "shape": [3], "datatype": "BOOL", "data": [True]},
    ],
    "outputs": [{"name": "output0"}],
}
# ... and the answer: output0, a [3, 2] FP32 tensor (the spec's example leaves out
# model_name, which its own schema requires; ours has it).
SPEC_RESPONSE = {
    "id": "42",
    "outputs": [
        {"name": "output0", "shape": [3, 2], "datatype": "FP32", "data": [1.0, 1.1, 2.0, 2.1, 3.0, 3.1]}
    ],
}
OUTPUT0 = np.array([[1.0, 1.1], [2.0, 2.1], [3.0, 3.1]], dtype=np.float32)


def test_the_spec_request_example_is_refused_for_its_own_shape_mismatch() -> None:
    # The example gives input1 the shape [3] but one element. The spec asks that shape and data
    # describe the full tensor, so we refuse it and say so.
    with pytest.raises(
        InvalidInput, match=r'input "input1": shape \[3\] needs 3 elements but data has 1'
    ) as info:
        decode(SPEC_REQUEST)
    assert info.value.code is ErrorCode.INVALID_ARGUMENT


def test_the_spec_request_example_with_three_booleans() -> None:
    fixed = json.loads(json.dumps(SPEC_REQUEST))
    fixed["inputs"][1]["data"] = [True, False, True]
    call = decode(fixed)
    inputs = call.request.inputs
    assert inputs["input0"].dtype == np.uint32 and inputs["input0"].tolist() == [[1, 2], [3, 4]]
    assert inputs["input1"].dtype == np.bool_ and inputs["input1"].tolist() == [True, False, True]
    assert call.request.outputs == ["output0"]
    assert call.body_id == "42" and call.request.id == "42"


def test_the_spec_response_example() -> None:
    call = decode({"id": "42", "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [0]}]})
    body, header_length = v2_json.encode_infer_response(
        InferResponse(model="mymodel", version=1, outputs={"output0": OUTPUT0}, id="server-id"), call
    )
    assert header_length is None
    answer = json.loads(body)
    conforms(answer, "inference_response")
    assert answer["id"] == SPEC_RESPONSE["id"]  # the body's id is echoed, as the spec requires
    assert answer["model_name"] == "mymodel" and answer["model_version"] == "1"
    (output,) = answer["outputs"]
    (expected,) = SPEC_RESPONSE["outputs"]
    assert {k: output[k] for k in ("name", "shape", "datatype")} == {
        k: expected[k] for k in ("name", "shape", "datatype")
    }
    # JSON numbers are the float32 values, written as their shortest decimal text.
    assert (
        np.array(output["data"], dtype=np.float32).tolist()
        == np.array(expected["data"], dtype=np.float32).tolist()
    )


@pytest.mark.parametrize("data", [[[1, 2], [4, 5]], [1, 2, 4, 5]], ids=["natural", "flattened"])
def test_tensor_data_natural_or_flattened(data: list[Any]) -> None:
    # required_api.md, "Tensor Data": the matrix [1 2; 4 5] in either form.
    call = decode({"inputs": [{"name": "m", "shape": [2, 2], "datatype": "INT32", "data": data}]})
    assert call.request.inputs["m"].tolist() == [[1, 2], [4, 5]]


def test_parameters_are_strings_numbers_or_booleans_and_pass_through() -> None:
    # required_api.md, "Parameters": $parameter = $string : $string | $number | $boolean.
    parameters = {"a_string": "s", "a_number": 1.5, "a_boolean": True}
    call = decode(
        {
            "parameters": parameters,
            "inputs": [
                {"name": "x", "shape": [1], "datatype": "FP32", "data": [0.5], "parameters": {"p": 1}}
            ],
        }
    )
    assert call.request.parameters == parameters


def test_the_error_object() -> None:
    # required_api.md: a failed request has an HTTP error status and {"error": <message>}.
    response = error_response('input "x": shape [3] needs 3 elements but data has 1', 400)
    assert response.status_code == 400
    conforms(json.loads(response.body), "inference_error_response")
    assert set(json.loads(response.body)) == {"error"}


def test_model_and_server_metadata_conform() -> None:
    metadata = ModelMetadata(
        name="mymodel",
        version=3,
        platform="onnxruntime_onnx",
        inputs=(
            TensorSpec("input0", np.dtype("uint32"), (-1, 2)),
            TensorSpec("input1", np.dtype("bool"), (3,)),
        ),
        outputs=(TensorSpec("output0", np.dtype("float32"), (-1, 2)),),
    )
    answer = json.loads(v2_json.encode_model_metadata(metadata, [1, 3]))
    conforms(answer, "metadata_model_response")
    assert answer["versions"] == ["1", "3"]
    assert answer["inputs"][0] == {"name": "input0", "datatype": "UINT32", "shape": [-1, 2]}
    server = json.loads(
        v2_json.encode_server_metadata({"name": "modelloop", "version": "0.1.0", "extensions": []})
    )
    conforms(server, "metadata_server_response")


# extension_binary_data.md, "Examples": both inputs as binary data (19 bytes), output0 asked for
# as binary data; the answer is the JSON header and 24 bytes of FP32.
def test_the_binary_extension_example() -> None:
    header = json.dumps(
        {
            "model_name": "mymodel",
            "inputs": [
                {
                    "name": "input0",
                    "shape": [2, 2],
                    "datatype": "UINT32",
                    "parameters": {"binary_data_size": 16},
                },
                {"name": "input1", "shape": [3], "datatype": "BOOL", "parameters": {"binary_data_size": 3}},
            ],
            "outputs": [{"name": "output0", "parameters": {"binary_data": True}}],
        }
    ).encode()
    tensors = struct.pack("<4I", 1, 2, 3, 4) + bytes([1, 0, 1])
    assert len(tensors) == 19
    call = decode(header + tensors, header_length=len(header))
    assert call.request.inputs["input0"].tolist() == [[1, 2], [3, 4]]
    assert call.request.inputs["input1"].tolist() == [True, False, True]
    assert call.wants_binary("output0")

    body, header_length = v2_json.encode_infer_response(
        InferResponse(model="mymodel", version=1, outputs={"output0": OUTPUT0}), call
    )
    assert header_length is not None and len(body) == header_length + 24
    answer = json.loads(body[:header_length])
    (output,) = answer["outputs"]
    assert output == {
        "name": "output0",
        "shape": [3, 2],
        "datatype": "FP32",
        "parameters": {"binary_data_size": 24},
    }
    assert np.frombuffer(body[header_length:], dtype="<f4").reshape(3, 2).tolist() == OUTPUT0.tolist()


def test_binary_sizes_that_disagree_with_the_body_are_refused() -> None:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input0",
                    "shape": [2, 2],
                    "datatype": "UINT32",
                    "parameters": {"binary_data_size": 16},
                }
            ]
        }
    ).encode()
    with pytest.raises(InvalidInput, match="binary_data_size 16 but only 12 bytes"):
        decode(header + b"\x00" * 12, header_length=len(header))
    with pytest.raises(InvalidInput, match="binary_data_size add up to 16"):
        decode(header + b"\x00" * 20, header_length=len(header))
