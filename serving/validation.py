"""The checks a request passes before it is batched: input names, dtypes, shapes, values; output names.

Every refusal is an :class:`~modelloop.serving.errors.InvalidInput` that names the model, the
input and what was expected, so both transports answer it as a 400 / INVALID_ARGUMENT.
The data plane calls these on every request (ARCHITECTURE.md, "One request, REST").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from modelloop.serving.errors import InvalidInput
from modelloop.serving.types import InferRequest, ModelMetadata, TensorSpec


def _names(items: Sequence[str]) -> str:
    return ", ".join(repr(i) for i in items)


def _describe_shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def cast_input(value: np.ndarray, spec: TensorSpec, model: str) -> np.ndarray:
    """Casts one input to the model's dtype where that loses nothing that matters.

    Ints to floats, float64 to float32 (what JSON numbers decode to) and integers into a
    narrower integer type whose range holds them are accepted. Strings, objects (nulls),
    booleans into numbers, floats into integers and signedness changes with out-of-range
    values are rejected.

    Args:
        value: The decoded input.
        spec: The model's input spec.
        model: Model name, for the message.

    Returns:
        ``value`` with ``spec.dtype``.

    Raises:
        InvalidInput: The cast would change the values' meaning.
    """
    src, dst = value.dtype, spec.dtype
    if src == dst:
        return value
    problem = f"input {spec.name!r} of model {model!r} has dtype {src.name}; the model expects {dst.name}"
    if dst.kind == "O" or dst.kind in "SU":
        if src.kind in "OSU":
            return value.astype(dst)
        raise InvalidInput(problem)
    if src.kind in "OSUV" or (src.kind == "b") != (dst.kind == "b"):
        raise InvalidInput(problem + " (strings, nulls and booleans are not numbers)")
    if dst.kind == "f":
        if src.kind in "iuf":
            return value.astype(dst)
        raise InvalidInput(problem)
    if dst.kind in "iu" and src.kind in "iu":
        if value.size:
            info = np.iinfo(dst)
            low, high = value.min(), value.max()
            if low < info.min or high > info.max:
                raise InvalidInput(problem + f" and values {low}..{high} do not fit in {dst.name}")
        return value.astype(dst)
    raise InvalidInput(problem + " and the values cannot be cast without loss")


def validate_inputs(
    inputs: dict[str, np.ndarray], metadata: ModelMetadata, max_batch_size: int
) -> dict[str, np.ndarray]:
    """Checks a request's inputs against a model's metadata.

    Args:
        inputs: Decoded tensors by name.
        metadata: The resolved version's metadata.
        max_batch_size: The most rows one request may carry.

    Returns:
        The inputs in the model's input order, cast to its dtypes.

    Raises:
        InvalidInput: A missing or unknown name, a bad dtype, rank or dim, an empty batch,
            a batch over ``max_batch_size``, or inputs whose batch sizes differ.
    """
    model = metadata.name
    if len(inputs) != len(metadata.inputs) or any(spec.name not in inputs for spec in metadata.inputs):
        expected = [spec.name for spec in metadata.inputs]
        if not inputs:
            raise InvalidInput(f"the request has no inputs; model {model!r} expects {_names(expected)}")
        unknown = [name for name in inputs if name not in expected]
        if unknown:
            raise InvalidInput(
                f"unknown input {_names(unknown)} for model {model!r}; its inputs are {_names(expected)}"
            )
        missing = [name for name in expected if name not in inputs]
        raise InvalidInput(
            f"missing input {_names(missing)} for model {model!r}; its inputs are {_names(expected)}"
        )
    validated: dict[str, np.ndarray] = {}
    rows: int | None = None
    for spec in metadata.inputs:
        value = np.asarray(inputs[spec.name])
        if value.ndim != len(spec.shape):
            raise InvalidInput(
                f"input {spec.name!r} has shape {_describe_shape(value.shape)} (rank {value.ndim}); "
                f"model {model!r} expects rank {len(spec.shape)}, shape {_describe_shape(spec.shape)}"
            )
        for axis, (got, dim) in enumerate(zip(value.shape, spec.shape, strict=True)):
            if dim != -1 and got != dim:
                what = (
                    "features" if axis == len(spec.shape) - 1 and axis > 0 else f"entries in dimension {axis}"
                )
                raise InvalidInput(
                    f"input {spec.name!r} has {got} {what} (shape {_describe_shape(value.shape)}); "
                    f"model {model!r} expects {dim} (shape {_describe_shape(spec.shape)})"
                )
        n = value.shape[0]
        if n == 0:
            raise InvalidInput(f"input {spec.name!r} is an empty batch (0 rows); send at least one row")
        if n > max_batch_size:
            raise InvalidInput(
                f"input {spec.name!r} has a batch of {n} rows; model {model!r} takes at most "
                f"{max_batch_size} rows per request (max_batch_size)"
            )
        if rows is not None and n != rows:
            raise InvalidInput(
                f"inputs of model {model!r} must share their batch size; got {rows} and {n} rows"
            )
        rows = n
        validated[spec.name] = cast_input(value, spec, model)
    return validated


def check_finite(inputs: dict[str, np.ndarray], model: str) -> None:
    """Refuses float inputs that hold NaN or ±Inf (for models whose config asks for it).

    Args:
        inputs: Validated inputs.
        model: Model name, for the message.

    Raises:
        InvalidInput: An input holds a non-finite value; the message names the input, how
            many values and where the first one is.
    """
    for name, value in inputs.items():
        if value.dtype.kind != "f":
            continue
        bad = ~np.isfinite(value)
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise InvalidInput(
                f"input {name!r} has {int(bad.sum())} NaN or infinite value(s), the first at index "
                f"{list(first)}; model {model!r} refuses them (refuse_nan in its config.json)"
            )


def wanted_outputs(request: InferRequest, metadata: ModelMetadata) -> list[str]:
    """The outputs a request asks for, in its order without repeats; all of them when it names none.

    Raises:
        InvalidInput: It names an output the model does not have.
    """
    names = [spec.name for spec in metadata.outputs]
    if not request.outputs:
        return names
    unknown = [name for name in request.outputs if name not in names]
    if unknown:
        raise InvalidInput(
            f"unknown output {_names(unknown)} for model {request.model!r}; its outputs are {_names(names)}"
        )
    return list(dict.fromkeys(request.outputs))
