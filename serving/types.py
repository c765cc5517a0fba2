"""Transport-neutral request, response and model description types.

Both REST dialects and both gRPC services decode into :class:`InferRequest` and encode
from :class:`InferResponse`; the data plane and runtimes see nothing else. The rules every
transport shares for what a client sends outside the tensors live here too: what a
request id may be (:func:`valid_request_id`) and what a version is (:func:`parse_version`).
:class:`ModelCatalog` is what a package outside serving (monitoring) may know of the
served models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from typing import Protocol as TypingProtocol

import numpy as np

from modelloop.serving.errors import InvalidInput

MAX_REQUEST_ID_LENGTH = 128


class Protocol(StrEnum):
    """Where a request came from; a label value of the request metrics."""

    TFSERVING_REST = "tfserving_rest"
    TFSERVING_GRPC = "tfserving_grpc"
    V2_REST = "v2_rest"
    V2_GRPC = "v2_grpc"


class ModelState(StrEnum):
    """Lifecycle of one model version (TF Serving's states, plus FAILED)."""

    START = "START"
    LOADING = "LOADING"
    AVAILABLE = "AVAILABLE"
    UNLOADING = "UNLOADING"
    END = "END"
    FAILED = "FAILED"


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Name, NumPy dtype and shape of one model input or output; -1 is a free dim."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    """What clients may learn about one loaded model version.

    Attributes:
        name: Model name.
        version: Integer version.
        platform: Runtime platform (``onnxruntime_onnx`` or ``tensorflow_savedmodel``).
        inputs: Input tensors; the first dimension is the batch.
        outputs: Output tensors.
        signature_name: The one signature served (``serving_default``).
        labels: Class labels in output order; empty for regression.
        task: ``multiclass``, ``binary`` or ``regression``.
        extra: The rest of ``model.json``.
    """

    name: str
    version: int
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    signature_name: str = "serving_default"
    labels: tuple[str, ...] = ()
    task: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class InferRequest:
    """One inference call, whatever the protocol.

    Attributes:
        model: Model name.
        inputs: Input tensors by name, each with the batch as its first dimension.
        protocol: The front end that decoded it.
        version: A pinned version, or None for the label's or the latest.
        label: A version label (``stable``), or None.
        outputs: Names of the outputs wanted; None means all.
        id: The request id (``x-request-id``, OIP ``id``); set by the edge.
        parameters: OIP request parameters.
        signature_name: TF Serving signature name; None means ``serving_default``.
        trace: The request span's OpenTelemetry ``SpanContext`` when tracing is on (set
            by the data plane; the monitoring writer links its span to it), else None.
    """

    model: str
    inputs: dict[str, np.ndarray]
    protocol: Protocol
    version: int | None = None
    label: str | None = None
    outputs: list[str] | None = None
    id: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    signature_name: str | None = None
    trace: Any = None


@dataclass(slots=True)
class InferResponse:
    """The result of one inference call.

    Attributes:
        model: Model name.
        version: The version that answered.
        outputs: Output tensors by name, in the model's output order.
        id: The request id.
        parameters: OIP response parameters.
    """

    model: str
    version: int
    outputs: dict[str, np.ndarray]
    id: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class VersionStatus:
    """State of one version as GetModelStatus and the status routes report it."""

    version: int
    state: ModelState
    error_message: str = ""


@dataclass(frozen=True, slots=True)
class VersionConfig:
    """How one loaded version is served: its metadata and the choices the server made.

    What Triton's model configuration reports (``GET /v2/models/<m>/config`` and the
    ``ModelConfig`` RPC).

    Attributes:
        metadata: The version's metadata.
        parameters: The runtime's set-up (providers, thread pools, spinning) and the
            batching knobs, as text.
    """

    metadata: ModelMetadata
    parameters: dict[str, str] = field(default_factory=dict)


def valid_request_id(value: str) -> bool:
    """Whether a client's request id may be kept: 1..128 printable ASCII characters.

    The same rule holds on every transport, and for the feedback that later names the id.

    Example:

    >>> valid_request_id("order-17"), valid_request_id(""), valid_request_id("tab\\t")
    (True, False, False)
    """
    return 0 < len(value) <= MAX_REQUEST_ID_LENGTH and value.isascii() and value.isprintable()


def parse_version(text: str | None) -> int | None:
    """Parses a model version as a client wrote it: a path segment, a field or a label-free spec.

    TF Serving and Triton accept only ASCII digits (``\\d+``). ``"²"`` passes
    ``str.isdigit`` but is no version, so ASCII is checked first.

    Args:
        text: The version as sent; None or ``""`` means "not pinned".

    Returns:
        The version, or None when none was given.

    Raises:
        InvalidInput: ``text`` is not a non-negative decimal integer.

    Example:

    >>> parse_version("3"), parse_version(""), parse_version(None)
    (3, None, None)
    """
    if not text:
        return None
    if not (text.isascii() and text.isdigit()):
        raise InvalidInput(f'model version must be a non-negative integer, got "{text}"')
    return int(text)


class ModelCatalog(TypingProtocol):
    """What code outside serving may ask about the served models (the registry implements it).

    Every method raises a :class:`~modelloop.errors.ServiceError` with code NOT_FOUND for
    a model the repository does not hold.
    """

    def model_names(self) -> list[str]:
        """Every model in the repository, sorted."""
        ...

    def has_model(self, name: str) -> bool:
        """Whether the repository holds the model."""
        ...

    def statuses(self, name: str) -> list[VersionStatus]:
        """Every known version of a model with its state."""
        ...

    def model_options(self, name: str, key: str) -> dict[str, Any]:
        """One free-form section of the model's ``config.json`` (``"drift"``), or ``{}``."""
        ...
