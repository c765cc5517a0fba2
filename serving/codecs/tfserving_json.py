"""TF Serving REST JSON (``/v1``): predict requests and responses, status and metadata.

Follows ``tensorflow_serving/g3doc/api_rest.md`` and ``util/json_tensor.cc``: the row
(``instances``) and columnar (``inputs``) request formats, ``signature_name``,
``{"b64": ...}`` for bytes and the ``NaN``/``Infinity`` tokens.

Example:

>>> call = decode_predict_request(b'{"instances": [[0.0, 1.0]]}', metadata, model="m")
>>> response = await dataplane.infer(call.request)
>>> body = encode_predict_response(response, call.row_format)
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import numpy as np

from modelloop.serving.codecs.json_tensor import (
    array_to_json,
    describe_value,
    dumps_json,
    exact_float_array,
    flatten_nested,
    has_no_booleans,
    is_b64,
    leaves_to_array,
    loads_json,
)
from modelloop.serving.datatypes import TF_ENUM_NAME, to_tf_dtype
from modelloop.serving.errors import InvalidInput, ModelNotFound
from modelloop.serving.types import (
    InferRequest,
    InferResponse,
    ModelMetadata,
    ModelState,
    Protocol,
    TensorSpec,
    VersionStatus,
)

DEFAULT_SIGNATURE = "serving_default"
PREDICT_METHOD = "tensorflow/serving/predict"
# TF Serving emits outputs whose alias ends with this as {"b64": ...} (kBytesTensorNameSuffix).
_BYTES_SUFFIX = "_bytes"
# Bool, integers, floats, bytes and text: what JSON can carry.
_JSON_KINDS = frozenset("biufOSU")


@dataclass(frozen=True, slots=True)
class PredictRequest:
    """A decoded ``:predict`` call.

    Attributes:
        request: The transport-neutral request.
        row_format: True for ``instances`` (answered with ``predictions``), False for
            ``inputs`` (answered with ``outputs``).
    """

    request: InferRequest
    row_format: bool


def decode_predict_request(
    body: bytes,
    metadata: ModelMetadata,
    *,
    model: str,
    version: int | None = None,
    label: str | None = None,
    request_id: str = "",
) -> PredictRequest:
    """Decodes a ``:predict`` body against the model's inputs.

    Args:
        body: The raw request body.
        metadata: The model version's metadata; input dtypes decide how values are read.
        model: Model name from the path.
        version: Version from the path, if any. Defaults to None.
        label: Version label from the path, if any. Defaults to None.
        request_id: The request id the edge assigned. Defaults to ``""``.

    Returns:
        The decoded request and which format it used.

    Raises:
        InvalidInput: The body is malformed or does not fit the model's inputs.
        ModelNotFound: ``signature_name`` names a signature the model lacks.
    """
    document = loads_json(body)
    if not isinstance(document, dict):
        raise InvalidInput(
            f'request body must be a JSON object with "instances" or "inputs", got {describe_value(document)}'
        )
    signature = document.get("signature_name", DEFAULT_SIGNATURE)
    if not isinstance(signature, str):
        raise InvalidInput(f'"signature_name" must be a string, got {describe_value(signature)}')
    if signature not in ("", metadata.signature_name):
        raise ModelNotFound(f'Serving signature name: "{signature}" not found in signature def')
    has_instances = "instances" in document
    has_inputs = "inputs" in document
    if has_instances and has_inputs:
        raise InvalidInput(
            'request has both "instances" (row format) and "inputs" (columnar format); send one'
        )
    if has_instances:
        inputs = _decode_rows(document["instances"], metadata.inputs, has_no_booleans(body))
    elif has_inputs:
        inputs = _decode_columns(document["inputs"], metadata.inputs, has_no_booleans(body))
    else:
        raise InvalidInput('request body must have "instances" (row format) or "inputs" (columnar format)')
    request = InferRequest(
        model=model,
        inputs=inputs,
        protocol=Protocol.TFSERVING_REST,
        version=version,
        label=label,
        id=request_id,
        signature_name=signature or DEFAULT_SIGNATURE,
    )
    return PredictRequest(request=request, row_format=has_instances)


def _spec_map(specs: tuple[TensorSpec, ...]) -> dict[str, TensorSpec]:
    return {spec.name: spec for spec in specs}


def _unknown_input(name: str, specs: dict[str, TensorSpec]) -> InvalidInput:
    return InvalidInput(f'unknown input "{name}"; the model\'s inputs are {", ".join(specs)}')


def _to_array(value: Any, spec: TensorSpec, where: str, numbers_only: bool = False) -> np.ndarray:
    # numbers_only: the body holds no JSON booleans, so NumPy may build a float array at once.
    if numbers_only:
        array = exact_float_array(value, spec.dtype)
        if array is not None:
            return array
    shape, leaves = flatten_nested(value, where)
    return leaves_to_array(leaves, shape, spec.dtype, where, allow_b64=True)


def _is_named_row(value: Any) -> bool:
    return isinstance(value, dict) and not is_b64(value)


def _decode_rows(instances: Any, specs: tuple[TensorSpec, ...], numbers_only: bool) -> dict[str, np.ndarray]:
    if not isinstance(instances, list):
        raise InvalidInput(f'"instances" must be a list of rows, got {describe_value(instances)}')
    if not instances:
        raise InvalidInput('empty batch: "instances" is an empty list')
    by_name = _spec_map(specs)
    named = [_is_named_row(row) for row in instances]
    if not any(named):
        if len(specs) != 1:
            raise InvalidInput(
                f"the model has {len(specs)} inputs ({', '.join(by_name)}); each instance must be an "
                "object keyed by input name"
            )
        spec = specs[0]
        return {spec.name: _to_array(instances, spec, f'input "{spec.name}" ("instances")', numbers_only)}
    if not all(named):
        # As in TF Serving, the first instance sets the form the others must have.
        index = named.index(not named[0])
        raise InvalidInput(
            f"instances[{index}] is {describe_value(instances[index])}, but instances[0] is "
            f"{describe_value(instances[0])}; all rows must have the same form (objects keyed by "
            "input name, or the one input's values)"
        )
    names = list(instances[0])
    for name in names:
        if name not in by_name:
            raise _unknown_input(name, by_name)
    expected = set(names)
    for index, row in enumerate(instances):
        if row.keys() != expected:
            missing = sorted(expected - row.keys())
            extra = sorted(row.keys() - expected)
            detail = f"lacks {', '.join(missing)}" if missing else f"adds {', '.join(extra)}"
            raise InvalidInput(
                f"instances[{index}] {detail}; every instance must name the same inputs "
                "(all named inputs share the 0-th dimension in the row format)"
            )
    return {
        name: _to_array(
            [row[name] for row in instances], by_name[name], f'input "{name}" ("instances")', numbers_only
        )
        for name in names
    }


def _decode_columns(inputs: Any, specs: tuple[TensorSpec, ...], numbers_only: bool) -> dict[str, np.ndarray]:
    by_name = _spec_map(specs)
    if _is_named_row(inputs):
        if not inputs:
            raise InvalidInput('"inputs" is an empty object; name at least one input')
        arrays = {}
        for name, value in inputs.items():
            if name not in by_name:
                raise _unknown_input(name, by_name)
            arrays[name] = _to_array(value, by_name[name], f'input "{name}" ("inputs")', numbers_only)
            _check_batch(arrays[name], name)
        return arrays
    if len(specs) != 1:
        raise InvalidInput(
            f'the model has {len(specs)} inputs ({", ".join(by_name)}); "inputs" must be an object '
            "keyed by input name"
        )
    spec = specs[0]
    array = _to_array(inputs, spec, f'input "{spec.name}" ("inputs")', numbers_only)
    _check_batch(array, spec.name)
    return {spec.name: array}


def _check_batch(array: np.ndarray, name: str) -> None:
    if array.ndim > 0 and array.shape[0] == 0:
        raise InvalidInput(f'empty batch: input "{name}" has no rows')


def _output_json(name: str, array: np.ndarray) -> tuple[Any, bool]:
    if array.dtype.kind not in _JSON_KINDS:
        # TF Serving answers these InvalidArgument too ("tensor type: complex64").
        raise InvalidInput(
            f"output {name!r} has tensor type {array.dtype.name}, which the JSON API cannot express; "
            "use the gRPC API"
        )
    if array.dtype.kind == "O" and name.endswith(_BYTES_SUFFIX):
        flat = [
            {"b64": base64.b64encode(v if isinstance(v, bytes) else str(v).encode()).decode()}
            for v in array.ravel().tolist()
        ]
        if array.ndim == 0:
            return flat[0], False
        return np.array(flat, dtype=object).reshape(array.shape).tolist(), False
    return array_to_json(array)


def encode_predict_response(response: InferResponse, row_format: bool) -> bytes:
    """Encodes a predict result as TF Serving does.

    A row request gets ``{"predictions": ...}``: a plain list for one output, else one
    object per row. A columnar request gets ``{"outputs": ...}``: the tensor for one
    output, else an object keyed by output name.

    Args:
        response: The data plane's response.
        row_format: Whether the request used ``instances``.

    Returns:
        UTF-8 JSON.

    Raises:
        InvalidInput: Row format with outputs whose 0-th dimensions differ.
    """
    outputs = response.outputs
    non_finite = False
    if len(outputs) == 1:
        ((name, array),) = outputs.items()
        value, non_finite = _output_json(name, array)
        document = {"predictions" if row_format else "outputs": value}
        return dumps_json(document, non_finite=non_finite)
    if not row_format:
        columns: dict[str, Any] = {}
        for name, array in outputs.items():
            columns[name], flag = _output_json(name, array)
            non_finite = non_finite or flag
        return dumps_json({"outputs": columns}, non_finite=non_finite)
    batch_sizes = {array.shape[0] if array.ndim else None for array in outputs.values()}
    if len(batch_sizes) != 1 or None in batch_sizes:
        raise InvalidInput(
            "the outputs have different 0-th dimensions, which the row format cannot express; "
            'send the request in the columnar format ("inputs")'
        )
    lists: dict[str, list[Any]] = {}
    for name, array in outputs.items():
        value, flag = _output_json(name, array)
        lists[name] = value.tolist() if isinstance(value, np.ndarray) else value
        non_finite = non_finite or flag
    batch = batch_sizes.pop() or 0
    rows = [{name: column[i] for name, column in lists.items()} for i in range(batch)]
    return dumps_json({"predictions": rows}, non_finite=non_finite)


def encode_model_status(statuses: list[VersionStatus]) -> bytes:
    """Encodes ``GetModelStatusResponse`` as TF Serving's REST API does.

    FAILED is not a TF Serving state: TF Serving reports a failed load as END with an
    error status, and so does this.

    Args:
        statuses: One entry per version.

    Returns:
        UTF-8 JSON ``{"model_version_status": [...]}``.
    """
    entries = []
    for status in statuses:
        failed = status.state is ModelState.FAILED
        entries.append(
            {
                "version": str(status.version),
                "state": ModelState.END.value
                if failed
                else ModelState.START.value
                if status.state is ModelState.UNLOADED
                else status.state.value,
                "status": {
                    "error_code": "UNKNOWN" if failed else "OK",
                    "error_message": status.error_message,
                },
            }
        )
    return dumps_json({"model_version_status": entries})


def _tensor_info(spec: TensorSpec, tensor_name: str) -> dict[str, Any]:
    return {
        "dtype": TF_ENUM_NAME[to_tf_dtype(spec.dtype)],
        "tensor_shape": {
            "dim": [{"size": str(size), "name": ""} for size in spec.shape],
            "unknown_rank": False,
        },
        "name": tensor_name,
    }


def encode_model_metadata(metadata: ModelMetadata) -> bytes:
    """Encodes ``GetModelMetadataResponse`` with a ``signature_def`` like TF Serving's.

    Tensor names follow what a Keras SavedModel reports (``serving_default_<input>:0``,
    ``StatefulPartitionedCall:<i>``); clients read the aliases, not these names.

    Args:
        metadata: The model version's metadata.

    Returns:
        UTF-8 JSON.
    """
    signature = {
        "inputs": {
            spec.name: _tensor_info(spec, f"serving_default_{spec.name}:0") for spec in metadata.inputs
        },
        "outputs": {
            spec.name: _tensor_info(spec, f"StatefulPartitionedCall:{index}")
            for index, spec in enumerate(metadata.outputs)
        },
        "method_name": PREDICT_METHOD,
    }
    document = {
        "model_spec": {"name": metadata.name, "signature_name": "", "version": str(metadata.version)},
        "metadata": {"signature_def": {"signature_def": {metadata.signature_name: signature}}},
    }
    return dumps_json(document)
