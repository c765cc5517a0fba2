"""The Open Inference Protocol gRPC codec (``inference.GRPCInferenceService`` messages).

Pure functions between our generated ``grpc_service_pb2`` messages and the
transport-neutral types of :mod:`modelloop.serving.types`.

Input tensors arrive in one of two forms, never mixed in one request:

* typed ``contents``, one repeated field per datatype (``fp32_contents`` for FP32,
  ``int_contents`` for INT8/16/32, ``uint_contents`` for UINT8/16/32, ...); FP16 has no
  typed field and must be sent raw;
* ``raw_input_contents``, one ``bytes`` per input in ``inputs`` order, in Triton's
  binary tensor format (:mod:`.binary_tensor`, shared with the REST binary extension).

Responses use ``raw_output_contents``, which ``tritonclient.grpc`` reads by default and
which costs one memcpy per output instead of a repeated field per element.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from modelloop.serving.codecs.binary_tensor import decode_binary_tensor, encode_binary_tensor
from modelloop.serving.datatypes import to_numpy_dtype, to_oip_datatype
from modelloop.serving.errors import InvalidInput
from modelloop.serving.protos import grpc_service_pb2 as pb
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
    parse_version,
)

# The typed field of InferTensorContents that carries each OIP datatype.
_CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_ALL_CONTENTS_FIELDS: tuple[str, ...] = tuple(sorted(set(_CONTENTS_FIELD.values())))
# int_contents / uint_contents are 32-bit fields; these datatypes must be range-checked.
_NARROW: frozenset[str] = frozenset({"INT8", "INT16", "UINT8", "UINT16"})

# Triton's model_config.proto DataType enum, by OIP datatype.
_TRITON_TYPE: dict[str, int] = {
    "BOOL": pb.TYPE_BOOL,
    "UINT8": pb.TYPE_UINT8,
    "UINT16": pb.TYPE_UINT16,
    "UINT32": pb.TYPE_UINT32,
    "UINT64": pb.TYPE_UINT64,
    "INT8": pb.TYPE_INT8,
    "INT16": pb.TYPE_INT16,
    "INT32": pb.TYPE_INT32,
    "INT64": pb.TYPE_INT64,
    "FP16": pb.TYPE_FP16,
    "FP32": pb.TYPE_FP32,
    "FP64": pb.TYPE_FP64,
    "BYTES": pb.TYPE_STRING,
}


def decode_parameters(parameters: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    """Turns a map of ``InferParameter`` into plain Python values.

    Args:
        parameters: The protobuf map.

    Returns:
        ``{name: bool | int | str | float}``; a parameter with no value set is left out.
    """
    result: dict[str, Any] = {}
    for key, value in parameters.items():
        choice = value.WhichOneof("parameter_choice")
        if choice is not None:
            result[key] = getattr(value, choice)
    return result


def encode_parameter(value: Any) -> pb.InferParameter:
    """Wraps one Python value as an ``InferParameter``.

    Args:
        value: A bool, int, float or str; anything else is sent as its ``str``.

    Returns:
        The parameter, with the oneof member that fits the value's type.
    """
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int | np.integer):
        number = int(value)
        if number > 2**63 - 1:
            return pb.InferParameter(uint64_param=number)
        return pb.InferParameter(int64_param=number)
    if isinstance(value, float | np.floating):
        return pb.InferParameter(double_param=float(value))
    return pb.InferParameter(string_param=str(value))


def _check_shape(shape: Sequence[int], name: str) -> tuple[int, ...]:
    dims = tuple(int(d) for d in shape)
    if any(d < 0 for d in dims):
        raise InvalidInput(f"input {name!r}: shape {list(dims)} has a negative dimension")
    return dims


def _check_range(values: np.ndarray, dtype: np.dtype, name: str, field: str) -> None:
    if values.size == 0:
        return
    info = np.iinfo(dtype)
    low, high = int(values.min()), int(values.max())
    if low < info.min or high > info.max:
        bad = low if low < info.min else high
        raise InvalidInput(
            f"input {name!r}: {field} holds {bad}, out of range for {dtype.name} [{info.min}, {info.max}]"
        )


def _dtype_of(datatype: str, name: str) -> np.dtype:
    try:
        return to_numpy_dtype(datatype)
    except InvalidInput as error:
        raise InvalidInput(f"input {name!r}: {error.message}") from None


def _decode_contents(tensor: pb.ModelInferRequest.InferInputTensor) -> np.ndarray:
    name, datatype = tensor.name, tensor.datatype
    dtype = _dtype_of(datatype, name)
    dims = _check_shape(tensor.shape, name)
    count = math.prod(dims)
    field = _CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidInput(
            f"input {name!r}: {datatype} has no typed contents field; send it in raw_input_contents"
        )
    values = getattr(tensor.contents, field)
    if len(values) != count:
        others = [f for f in _ALL_CONTENTS_FIELDS if f != field and len(getattr(tensor.contents, f))]
        hint = f" (values found in {', '.join(others)} instead)" if others and not values else ""
        raise InvalidInput(
            f"input {name!r}: shape {list(dims)} needs {count} elements, but contents.{field} "
            f"has {len(values)}{hint}"
        )
    if datatype == "BYTES":
        flat = np.empty(count, dtype=object)
        flat[:] = list(values)
    elif datatype in _NARROW:
        wide = np.asarray(values, dtype=np.int64)
        _check_range(wide, dtype, name, f"contents.{field}")
        flat = wide.astype(dtype)
    else:
        flat = np.asarray(values, dtype=dtype)
    return flat.reshape(dims)


def requested_shared_memory(request: pb.ModelInferRequest) -> dict[str, SharedMemoryRef]:
    """The requested outputs that go to a system shared memory region, by name.

    Raises:
        InvalidInput: A malformed ``shared_memory_*`` parameter.
    """
    refs: dict[str, SharedMemoryRef] = {}
    for output in request.outputs:
        if output.parameters:
            ref = shared_memory_ref(decode_parameters(output.parameters), f"output {output.name!r}")
            if ref is not None:
                refs[output.name] = ref
    return refs


def decode_infer_request(
    request: pb.ModelInferRequest, request_id: str = "", shared_memory: SystemSharedMemory | None = None
) -> InferRequest:
    """Decodes a ``ModelInferRequest`` into an :class:`InferRequest`.

    Args:
        request: The gRPC request.
        request_id: The call's ``x-request-id`` metadata; when empty the OIP ``id`` is
            used, and when both are empty the data plane makes one. Defaults to ``""``.
        shared_memory: The registered system shared memory regions inputs may name
            (their ``shared_memory_region`` parameter); such inputs have no entry in
            ``raw_input_contents``. None refuses them. Defaults to None.

    Returns:
        The transport-neutral request with inputs, requested outputs, id and parameters.

    Raises:
        InvalidInput: No model name, a non-integer version, no inputs, duplicate input
            names, mixed raw and typed contents, a raw entry count that differs from the
            input count, an unknown datatype, or data that disagrees with its shape.
    """
    if not request.model_name:
        raise InvalidInput("model_name is required")
    version = parse_version(request.model_version)
    if not request.inputs:
        raise InvalidInput("ModelInferRequest has no inputs")
    # Inputs in shared memory carry no data here; the others are raw or typed.
    shared = {
        index: ref
        for index, tensor in enumerate(request.inputs)
        if tensor.parameters
        and (ref := shared_memory_ref(decode_parameters(tensor.parameters), f"input {tensor.name!r}"))
    }
    raw = request.raw_input_contents
    carried = len(request.inputs) - len(shared)
    if raw:
        typed = [t.name for t in request.inputs if t.HasField("contents")]
        if typed:
            raise InvalidInput(
                "raw_input_contents is set, so no input may set contents; "
                f"found contents on {', '.join(repr(n) for n in typed)}"
            )
        if len(raw) != carried:
            raise InvalidInput(
                f"raw_input_contents has {len(raw)} entries for {carried} inputs"
                + (f" ({len(shared)} more in shared memory)" if shared else "")
                + "; send one per input, in input order"
            )
    inputs: dict[str, np.ndarray] = {}
    next_raw = 0
    for index, tensor in enumerate(request.inputs):
        if not tensor.name:
            raise InvalidInput(f"input {index} has no name")
        if tensor.name in inputs:
            raise InvalidInput(f"input {tensor.name!r} appears more than once")
        ref = shared.get(index)
        if ref is not None:
            if tensor.HasField("contents"):
                raise InvalidInput(
                    f"input {tensor.name!r} names a shared memory region and also sends contents; send one"
                )
            inputs[tensor.name] = read_shared_tensor(
                shared_memory, ref, tensor.datatype, tensor.shape, tensor.name
            )
        elif raw:
            inputs[tensor.name] = decode_binary_tensor(
                raw[next_raw], tensor.datatype, tensor.shape, tensor.name
            )
            next_raw += 1
        else:
            inputs[tensor.name] = _decode_contents(tensor)
    return InferRequest(
        model=request.model_name,
        inputs=inputs,
        protocol=Protocol.V2_GRPC,
        version=version,
        outputs=[o.name for o in request.outputs] or None,
        id=request_id or request.id,
        parameters=decode_parameters(request.parameters),
    )


def encode_infer_response(
    response: InferResponse,
    request_id: str | None = None,
    *,
    shared_memory: SystemSharedMemory | None = None,
    shared_memory_outputs: Mapping[str, SharedMemoryRef] | None = None,
) -> pb.ModelInferResponse:
    """Encodes an :class:`InferResponse` as a ``ModelInferResponse``.

    Args:
        response: The data plane's result.
        request_id: The ``id`` to echo; the OIP says a response carries the request's
            own ``id``. None uses ``response.id``. Defaults to None.
        shared_memory: The regions outputs may be written to. Defaults to None.
        shared_memory_outputs: The outputs to write there (:func:`requested_shared_memory`).
            Defaults to none.

    Returns:
        The response, every output's data in ``raw_output_contents`` in output order (an
        empty entry for an output written to shared memory, which keeps the order).

    Raises:
        InvalidInput: An output does not fit its shared memory region, or it is gone.
    """
    out = pb.ModelInferResponse(
        model_name=response.model,
        model_version=str(response.version),
        id=response.id if request_id is None else request_id,
    )
    for key, value in response.parameters.items():
        out.parameters[key].CopyFrom(encode_parameter(value))
    for key, array in response.outputs.items():
        array = np.asarray(array)
        datatype = to_oip_datatype(array.dtype)
        tensor = out.outputs.add(name=key, datatype=datatype, shape=array.shape)
        ref = shared_memory_outputs.get(key) if shared_memory_outputs else None
        if ref is not None:
            written = write_shared_tensor(shared_memory, ref, array, datatype, key)
            for name, value in written.items():
                tensor.parameters[name].CopyFrom(encode_parameter(value))
            out.raw_output_contents.append(b"")
        else:
            out.raw_output_contents.append(encode_binary_tensor(array, datatype))
    return out


def _tensor_metadata(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(
        name=spec.name, datatype=to_oip_datatype(spec.dtype), shape=spec.shape
    )


def encode_model_metadata(metadata: ModelMetadata, versions: Iterable[int] = ()) -> pb.ModelMetadataResponse:
    """Encodes model metadata as a ``ModelMetadataResponse``.

    Args:
        metadata: The resolved version's metadata.
        versions: The model's available versions; the resolved one when empty.
            Defaults to ``()``.

    Returns:
        The response; -1 marks a variable dimension.
    """
    listed = sorted(set(versions)) or [metadata.version]
    return pb.ModelMetadataResponse(
        name=metadata.name,
        versions=[str(v) for v in listed],
        platform=metadata.platform,
        inputs=[_tensor_metadata(s) for s in metadata.inputs],
        outputs=[_tensor_metadata(s) for s in metadata.outputs],
    )


def encode_model_config(served: VersionConfig) -> pb.ModelConfigResponse:
    """Describes a model as Triton's ``ModelConfig`` (the fields we can fill).

    ``max_batch_size`` is 0 and ``dims`` keep the batch dimension (-1), which is how
    Triton describes a model whose shapes already include the batch. ``parameters``
    holds the runtime's set-up and the batching knobs.

    Args:
        served: The resolved version's configuration.

    Returns:
        The response.
    """
    metadata = served.metadata
    backend = "onnxruntime" if metadata.platform.startswith("onnx") else "tensorflow"
    config = pb.ModelConfig(name=metadata.name, platform=metadata.platform, backend=backend, max_batch_size=0)
    for spec in metadata.inputs:
        config.input.add(name=spec.name, data_type=_TRITON_TYPE[to_oip_datatype(spec.dtype)], dims=spec.shape)
    for spec in metadata.outputs:
        config.output.add(
            name=spec.name, data_type=_TRITON_TYPE[to_oip_datatype(spec.dtype)], dims=spec.shape
        )
    for key, value in served.parameters.items():
        config.parameters[key].string_value = value
    return pb.ModelConfigResponse(config=config)


def encode_server_metadata(metadata: Mapping[str, Any]) -> pb.ServerMetadataResponse:
    """Encodes the data plane's ``server_metadata()`` dict.

    Args:
        metadata: ``{"name", "version", "extensions"}``.

    Returns:
        The response.
    """
    return pb.ServerMetadataResponse(
        name=str(metadata.get("name", "")),
        version=str(metadata.get("version", "")),
        extensions=[str(e) for e in metadata.get("extensions", [])],
    )


def encode_repository_index(
    entries: Iterable[Mapping[str, Any]], ready_only: bool = False
) -> pb.RepositoryIndexResponse:
    """Encodes the data plane's ``repository_index()`` list.

    Args:
        entries: ``[{"name", "version", "state", "reason"}]``.
        ready_only: Keep only entries in state ``READY`` or ``AVAILABLE``. Defaults to False.

    Returns:
        The response.
    """
    response = pb.RepositoryIndexResponse()
    for entry in entries:
        state = str(entry.get("state", ""))
        if ready_only and state not in ("READY", "AVAILABLE"):
            continue
        version = entry.get("version")
        response.models.add(
            name=str(entry.get("name", "")),
            version="" if version is None else str(version),
            state=state,
            reason=str(entry.get("reason", "") or ""),
        )
    return response


def encode_model_statistics(entries: Iterable[Mapping[str, Any]]) -> pb.ModelStatisticsResponse:
    """Encodes the statistics extension's entries (``VersionStatistics.as_dict()``).

    Args:
        entries: One dict per version, in Triton's schema.

    Returns:
        The ``ModelStatisticsResponse``.
    """
    response = pb.ModelStatisticsResponse()
    for entry in entries:
        stats = response.model_stats.add(
            name=entry["name"],
            version=entry["version"],
            last_inference=entry["last_inference"],
            inference_count=entry["inference_count"],
            execution_count=entry["execution_count"],
        )
        for key, duration in entry["inference_stats"].items():
            getattr(stats.inference_stats, key).CopyFrom(pb.StatisticDuration(**duration))
        for batch in entry["batch_stats"]:
            stats.batch_stats.add(
                batch_size=batch["batch_size"],
                compute_input=pb.StatisticDuration(**batch["compute_input"]),
                compute_infer=pb.StatisticDuration(**batch["compute_infer"]),
                compute_output=pb.StatisticDuration(**batch["compute_output"]),
            )
    return response
