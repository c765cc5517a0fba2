"""Open Inference Protocol V2 REST JSON, with Triton's binary tensor data extension.

Follows KServe's ``required_api.md`` / OIP ``inference_rest.md`` for the JSON forms and
Triton's ``extension_binary_data.md`` for binary tensors: the JSON header is followed in
the same body by raw little-endian row-major tensors, its length given by the
``Inference-Header-Content-Length`` header and each tensor's by ``binary_data_size``.
The tensors themselves are decoded and encoded by :mod:`.binary_tensor`, the same code
as gRPC's ``raw_input_contents``/``raw_output_contents``.

Example:

>>> call = decode_infer_request(body, model="digits", header_length=None)
>>> response = await dataplane.infer(call.request)
>>> payload, json_length = encode_infer_response(response, call)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from modelloop.serving.codecs.binary_tensor import decode_binary_tensor, encode_binary_tensor
from modelloop.serving.codecs.json_tensor import (
    array_to_json,
    describe_value,
    dumps_json,
    exact_float_array,
    flatten_nested,
    has_no_booleans,
    leaves_to_array,
    loads_json,
)
from modelloop.serving.datatypes import OIP_TO_NUMPY, to_numpy_dtype, to_oip_datatype
from modelloop.serving.errors import InvalidInput
from modelloop.serving.shared_memory import (
    SharedMemoryRef,
    SystemSharedMemory,
    read_shared_tensor,
    shared_memory_ref,
    write_shared_tensor,
)
from modelloop.serving.types import (
    InferRequest,
    InferResponse,
    ModelMetadata,
    Protocol,
    TensorSpec,
    VersionConfig,
)

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_CONTENT_TYPE = "application/octet-stream"
JSON_CONTENT_TYPE = "application/json"


@dataclass(frozen=True, slots=True)
class InferCall:
    """A decoded ``/infer`` call and how its outputs are to be sent back.

    Attributes:
        request: The transport-neutral request; its ``id`` is the body's ``id`` or ``""``.
        body_id: The body's ``id``, echoed in the response as the protocol requires.
        binary_default: The request-level ``binary_data_output`` parameter.
        binary_outputs: Per requested output, its ``binary_data`` parameter when given.
        shared_memory_outputs: Per requested output, the shared memory region it goes to.
    """

    request: InferRequest
    body_id: str | None = None
    binary_default: bool = False
    binary_outputs: dict[str, bool] = field(default_factory=dict)
    shared_memory_outputs: dict[str, SharedMemoryRef] = field(default_factory=dict)
    """Requested outputs to write to a system shared memory region instead of the body."""

    def wants_binary(self, name: str) -> bool:
        """Whether output ``name`` is sent as binary data."""
        return self.binary_outputs.get(name, self.binary_default)


def decode_infer_request(
    body: bytes,
    *,
    model: str,
    version: int | None = None,
    header_length: int | None = None,
    shared_memory: SystemSharedMemory | None = None,
) -> InferCall:
    """Decodes an OIP infer request, JSON or JSON followed by binary tensors.

    Args:
        body: The raw request body.
        model: Model name from the path.
        version: Version from the path, if any. Defaults to None.
        header_length: The ``Inference-Header-Content-Length`` header: the length of the
            JSON part, the rest being binary tensors. None means all JSON. Defaults to None.
        shared_memory: The registered system shared memory regions that inputs may name
            (``shared_memory_region``); None refuses such inputs. Defaults to None.

    Returns:
        The decoded call.

    Raises:
        InvalidInput: The body is malformed; the message names the problem.
    """
    # A memoryview slices the binary part without copying it.
    binary = memoryview(b"")
    header = body
    if header_length is not None:
        if header_length < 0 or header_length > len(body):
            raise InvalidInput(f"{HEADER_LENGTH} is {header_length} but the body has only {len(body)} bytes")
        header, binary = body[:header_length], memoryview(body)[header_length:]
    document = loads_json(header, "inference request header" if header_length is not None else "request body")
    if not isinstance(document, dict):
        raise InvalidInput(f"inference request must be a JSON object, got {describe_value(document)}")

    body_id = document.get("id")
    if body_id is not None and not isinstance(body_id, str):
        raise InvalidInput(f'"id" must be a string, got {describe_value(body_id)}')
    parameters = _parameters(document.get("parameters"), "request")
    binary_default = parameters.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise InvalidInput('request parameter "binary_data_output" must be a boolean')

    raw_inputs = document.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput('inference request must have "inputs": a non-empty list of input tensors')
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    numbers_only = has_no_booleans(header)
    for index, raw in enumerate(raw_inputs):
        name, array, used = _decode_input(raw, index, binary, offset, shared_memory, numbers_only)
        if name in inputs:
            raise InvalidInput(f'input "{name}" appears twice in "inputs"')
        inputs[name] = array
        offset += used
    if offset != len(binary):
        raise InvalidInput(
            f"the body has {len(binary)} bytes of binary tensor data but the inputs' binary_data_size "
            f"add up to {offset}"
        )

    outputs, binary_outputs, shm_outputs = _decode_outputs(document.get("outputs"))
    request = InferRequest(
        model=model,
        inputs=inputs,
        protocol=Protocol.V2_REST,
        version=version,
        outputs=outputs,
        id=body_id or "",
        parameters=parameters,
    )
    return InferCall(
        request=request,
        body_id=body_id,
        binary_default=binary_default,
        binary_outputs=binary_outputs,
        shared_memory_outputs=shm_outputs,
    )


def _parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f'{where} "parameters" must be an object, got {describe_value(value)}')
    return value


def _decode_input(
    raw: Any,
    index: int,
    binary: memoryview,
    offset: int,
    shared_memory: SystemSharedMemory | None,
    numbers_only: bool = False,
) -> tuple[str, np.ndarray, int]:
    if not isinstance(raw, dict):
        raise InvalidInput(f"inputs[{index}] must be an object, got {describe_value(raw)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInput(f'inputs[{index}] needs a "name" string')
    where = f'input "{name}"'
    datatype = raw.get("datatype")
    if not isinstance(datatype, str):
        raise InvalidInput(f'{where} needs a "datatype" string (one of {", ".join(OIP_TO_NUMPY)})')
    try:
        dtype = to_numpy_dtype(datatype)
    except InvalidInput as error:
        raise InvalidInput(f"{where}: {error}") from None
    shape = raw.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int for d in shape) or any(d < 0 for d in shape):
        raise InvalidInput(f'{where} needs a "shape": a list of non-negative integers, got {shape!r}')
    count = math.prod(shape)
    parameters = _parameters(raw.get("parameters"), where)
    ref = shared_memory_ref(parameters, where)
    if ref is not None:
        if "data" in raw or "binary_data_size" in parameters:
            raise InvalidInput(f"{where} names a shared memory region and also sends data; send one")
        return name, read_shared_tensor(shared_memory, ref, datatype, shape, name), 0
    size = parameters.get("binary_data_size")
    if size is not None:
        if type(size) is not int or size < 0:
            raise InvalidInput(f'{where}: "binary_data_size" must be a non-negative integer')
        if "data" in raw:
            raise InvalidInput(f'{where} has both "data" and "binary_data_size"; send one')
        if offset + size > len(binary):
            raise InvalidInput(
                f"{where} has binary_data_size {size} but only {len(binary) - offset} bytes of binary "
                f"data are left (is {HEADER_LENGTH} right?)"
            )
        # A view of the body: numeric tensors stay zero-copy all the way to the runtime.
        return name, decode_binary_tensor(binary[offset : offset + size], datatype, shape, name), size
    if "data" not in raw:
        raise InvalidInput(f'{where} has no "data" (and no "binary_data_size" parameter)')
    if numbers_only:
        # No JSON booleans in the header: a float tensor of plain numbers is built at once.
        array = exact_float_array(raw["data"], dtype)
        if array is not None and array.size == count:
            return name, array.reshape(shape), 0
    data_shape, leaves = flatten_nested(raw["data"], where)
    if len(leaves) != count:
        raise InvalidInput(
            f"{where}: shape {shape} needs {count} elements but data has {len(leaves)}"
            + (f" (data shape {list(data_shape)})" if len(data_shape) > 1 else "")
        )
    return name, leaves_to_array(leaves, tuple(shape), dtype, where), 0


def _decode_outputs(raw: Any) -> tuple[list[str] | None, dict[str, bool], dict[str, SharedMemoryRef]]:
    if raw is None:
        return None, {}, {}
    if not isinstance(raw, list):
        raise InvalidInput(f'"outputs" must be a list of requested outputs, got {describe_value(raw)}')
    names: list[str] = []
    binary: dict[str, bool] = {}
    shared: dict[str, SharedMemoryRef] = {}
    for index, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidInput(f'outputs[{index}] must be an object with a "name" string')
        name = item["name"]
        if name in names:
            raise InvalidInput(f'output "{name}" is requested twice')
        names.append(name)
        parameters = _parameters(item.get("parameters"), f'output "{name}"')
        if "binary_data" in parameters:
            if not isinstance(parameters["binary_data"], bool):
                raise InvalidInput(f'output "{name}": "binary_data" must be a boolean')
            binary[name] = parameters["binary_data"]
        ref = shared_memory_ref(parameters, f'output "{name}"')
        if ref is not None:
            shared[name] = ref
    return (names or None), binary, shared


def encode_infer_response(
    response: InferResponse, call: InferCall, shared_memory: SystemSharedMemory | None = None
) -> tuple[bytes, int | None]:
    """Encodes an OIP infer response, with binary outputs where the request asked for them.

    Args:
        response: The data plane's response.
        call: The decoded request (its ``id``, binary and shared memory output choices).
        shared_memory: The regions outputs may be written to. Defaults to None.

    Raises:
        InvalidInput: An output does not fit its shared memory region, or the region is
            gone.

    Returns:
        The body and, when binary outputs follow the JSON, the JSON length for the
        ``Inference-Header-Content-Length`` header (else None).
    """
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    non_finite = False
    for name, array in response.outputs.items():
        datatype = to_oip_datatype(array.dtype)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        ref = call.shared_memory_outputs.get(name)
        if ref is not None:
            entry["parameters"] = write_shared_tensor(shared_memory, ref, array, datatype, name)
        elif call.wants_binary(name):
            blob = encode_binary_tensor(array, datatype)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            # The spec allows nested or flat data; Triton and its clients use flat.
            entry["data"], flag = array_to_json(array.reshape(-1))
            non_finite = non_finite or flag
        outputs.append(entry)
    document: dict[str, Any] = {
        "model_name": response.model,
        "model_version": str(response.version),
        "id": call.body_id if call.body_id is not None else response.id,
    }
    if response.parameters:
        document["parameters"] = response.parameters
    document["outputs"] = outputs
    header = dumps_json(document, non_finite=non_finite)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def _metadata_tensor(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": to_oip_datatype(spec.dtype), "shape": list(spec.shape)}


def encode_model_metadata(metadata: ModelMetadata, versions: list[int]) -> bytes:
    """Encodes OIP model metadata.

    Args:
        metadata: The model version's metadata.
        versions: The versions of the model that can serve, as the ``versions`` field.

    Returns:
        UTF-8 JSON ``{"name", "versions", "platform", "inputs", "outputs"}``.
    """
    document = {
        "name": metadata.name,
        "versions": [str(v) for v in versions],
        "platform": metadata.platform,
        "inputs": [_metadata_tensor(spec) for spec in metadata.inputs],
        "outputs": [_metadata_tensor(spec) for spec in metadata.outputs],
    }
    return dumps_json(document)


def _config_tensor(spec: TensorSpec) -> dict[str, Any]:
    datatype = to_oip_datatype(spec.dtype)
    return {
        "name": spec.name,
        "data_type": "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}",
        "dims": list(spec.shape),
    }


def encode_model_config(served: VersionConfig) -> bytes:
    """Encodes a version's configuration as Triton's ``GET /v2/models/<m>/config`` JSON.

    ``max_batch_size`` is 0 and ``dims`` keep the batch dimension, as in the gRPC
    ``ModelConfig``; ``parameters`` holds the runtime's set-up and the batching knobs.

    Args:
        served: The resolved version's configuration.

    Returns:
        UTF-8 JSON ``{"name", "platform", "backend", "max_batch_size", "input", "output",
        "parameters"}``.
    """
    metadata = served.metadata
    document = {
        "name": metadata.name,
        "platform": metadata.platform,
        "backend": "onnxruntime" if metadata.platform.startswith("onnx") else "tensorflow",
        "max_batch_size": 0,
        "input": [_config_tensor(spec) for spec in metadata.inputs],
        "output": [_config_tensor(spec) for spec in metadata.outputs],
        "parameters": {key: {"string_value": value} for key, value in served.parameters.items()},
    }
    return dumps_json(document)


def encode_server_metadata(metadata: dict[str, Any]) -> bytes:
    """Encodes OIP server metadata (``{"name", "version", "extensions"}``)."""
    return dumps_json(metadata)


def encode_model_statistics(entries: list[dict[str, Any]]) -> bytes:
    """Encodes the statistics extension's answer: ``{"model_stats": [...]}``.

    Args:
        entries: One dict per version in Triton's schema (``VersionStatistics.as_dict()``).
    """
    return dumps_json({"model_stats": entries})


def encode_repository_index(entries: list[dict[str, Any]], ready_only: bool = False) -> bytes:
    """Encodes the repository index, optionally only its ready entries.

    Args:
        entries: ``[{"name", "version", "state", "reason"}]`` from the data plane.
        ready_only: Keep only ready versions (the request's ``{"ready": true}``). Defaults to False.

    Returns:
        UTF-8 JSON list.
    """
    if ready_only:
        entries = [e for e in entries if str(e.get("state", "")).upper() in ("READY", "AVAILABLE")]
    return dumps_json(entries)


def decode_repository_index_request(body: bytes) -> bool:
    """Reads ``{"ready": bool}`` from a repository index request (empty body: False).

    Raises:
        InvalidInput: The body is not such an object.
    """
    if not body.strip():
        return False
    document = loads_json(body)
    if not isinstance(document, dict):
        raise InvalidInput(f"repository index request must be a JSON object, got {describe_value(document)}")
    ready = document.get("ready", False)
    if not isinstance(ready, bool):
        raise InvalidInput('"ready" must be a boolean')
    return ready


def decode_repository_load_request(body: bytes) -> list[str]:
    """The parameter names of a repository load request (empty body: none).

    Raises:
        InvalidInput: The body is not a JSON object, or its ``parameters`` is not one.
    """
    if not body.strip():
        return []
    document = loads_json(body)
    if not isinstance(document, dict):
        raise InvalidInput(f"repository load request must be a JSON object, got {describe_value(document)}")
    parameters = document.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidInput('"parameters" must be an object')
    return [str(name) for name in parameters]
