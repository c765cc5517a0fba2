"""Transport-neutral request, response and model description types.

Both REST dialects and both gRPC services decode into :class:`InferRequest` and encode
from :class:`InferResponse`; the data plane and runtimes see nothing else. The rules every
transport shares for what a client sends outside the tensors live here too: what a
request id may be (:func:`valid_request_id`) and what a version is (:func:`parse_version`).
:class:`ModelCatalog` is what a package outside serving (monitoring) may know of the
served models, and :class:`RolloutRouter` (with :class:`RolloutPolicy` and
:class:`RolloutAssignment`) what serving reads of a rollout's state, which monitoring keeps.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal
from typing import Protocol as TypingProtocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

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
    UNLOADED = "UNLOADED"
    """In the repository and wanted, not in memory (``--max-loaded-models``): the next
    request for it loads it."""


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
        seconds: How long the data plane took, from the decoded request to the answer.
    """

    model: str
    version: int
    outputs: dict[str, np.ndarray]
    id: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


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


# -- rollout: the policy, and what serving reads of a rollout's state ------------------
# (serving/rollout.py routes with them; control/rollout/controller.py implements RolloutRouter)

RolloutMode = Literal["off", "canary", "shadow"]


class RolloutPolicy(BaseModel):
    """How a new version of one model is rolled out (the ``"rollout"`` section of ``config.json``).

    Example:

    ```json
    {"rollout": {"mode": "canary", "steps": [10, 50, 100], "step_min_requests": 200,
                 "min_labels": 100, "max_error_rate": 0.01, "max_accuracy_drop": 0.02,
                 "max_latency_ratio": 2.0}}
    ```
    """

    model_config = ConfigDict(extra="forbid")

    mode: RolloutMode = "off"
    """``off`` (a new version takes all traffic once AVAILABLE), ``canary`` (a share of the
    traffic goes to the candidate) or ``shadow`` (the candidate answers a copy of each
    request off the request path; its answers are compared, never returned)."""
    steps: list[float] = Field(default_factory=lambda: [10.0, 50.0, 100.0])
    """The candidate's share of unpinned traffic at each step, in percent; strictly
    increasing, ending at 100."""
    step_min_requests: int = Field(default=200, ge=1)
    """Requests the candidate must answer at a step before the step can be promoted."""
    min_labels: int = Field(default=100, ge=0)
    """Labelled rows the candidate needs before a promotion, where labels arrive."""
    max_error_rate: float = Field(default=0.01, ge=0.0, le=1.0)
    """Highest error rate (failed model calls) the candidate may have."""
    max_accuracy_drop: float = Field(default=0.02, ge=0.0, le=1.0)
    """Largest drop of accuracy from the champion's (classifiers), in absolute terms."""
    max_mae_increase: float = Field(default=0.1, ge=0.0)
    """Largest rise of MAE over the champion's (regressors), relative: 0.1 = 10 % worse."""
    max_latency_ratio: float = Field(default=2.0, ge=1.0)
    """Highest ratio of the candidate's model latency to the champion's, at the p99 and at the
    median (judged as the guardrails' module describes)."""
    min_latency_difference_ms: float = Field(default=2.0, ge=0.0)
    """A call is slow only if it is also this much slower than the champion's p99: a few
    milliseconds of scheduling noise never roll a candidate back."""
    confidence: float = Field(default=0.95, gt=0.5, lt=1.0)
    """Confidence of the one-sided bounds the guardrails use."""

    @field_validator("steps")
    @classmethod
    def _check_steps(cls, steps: list[float]) -> list[float]:
        if not steps:
            raise ValueError("steps must not be empty; end them at 100")
        for step in steps:
            if not (0.0 < step <= 100.0):
                raise ValueError(f"step {step:g} is outside (0, 100]; steps are percentages of traffic")
        for low, high in itertools.pairwise(steps):
            if high <= low:
                raise ValueError(f"steps must increase; {high:g} follows {low:g}")
        if steps[-1] != 100.0:
            raise ValueError(f"steps must end at 100, not {steps[-1]:g}")
        return steps


def resolve_policy(defaults: RolloutPolicy, raw: dict[str, Any]) -> tuple[RolloutPolicy | None, str]:
    """A model's rollout policy: its ``config.json`` section over the server's defaults.

    Args:
        defaults: The server-wide defaults.
        raw: The model's ``"rollout"`` section (``{}`` when it has none).

    Returns:
        ``(policy, "")``, or ``(None, reason)`` when the section is invalid; the reason
        names each bad field.
    """
    if not raw:
        return defaults, ""
    if not isinstance(raw, dict):
        return None, "rollout must be an object"
    try:
        return RolloutPolicy.model_validate({**defaults.model_dump(), **raw}), ""
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'rollout'}: {err['msg']}" for err in exc.errors()
        )
        return None, f"invalid rollout config ({problems})"


@dataclass(frozen=True, slots=True)
class RolloutAssignment:
    """What serving needs of one model's rollout state.

    Attributes:
        champion: The version that serves by default.
        candidate: The version on trial, or None (promoted, or none yet).
        mode: ``canary`` or ``shadow``.
        share: The candidate's share of unpinned traffic, in percent (0 in shadow mode
            and once the rollout ended).
        state: ``canary``, ``shadow``, ``promoted`` or ``rolled_back``.
        retired: Versions that were rolled back and are not loaded again.
        retired_why: Version -> why it is RETIRED, in words (which rollout, when, why).
    """

    champion: int
    candidate: int | None
    mode: str
    share: float
    state: str
    retired: frozenset[int] = frozenset()
    retired_why: Mapping[int, str] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        """Whether the candidate is on trial (canary or shadow)."""
        return self.candidate is not None and self.state in ("canary", "shadow")


class RolloutRouter(TypingProtocol):
    """Serving's view of the rollout state (monitoring's controller implements it).

    Every method is called on the event loop: it reads a snapshot in memory and never
    blocks or raises.
    """

    def assignment(self, model: str) -> RolloutAssignment | None:
        """The model's rollout state, or None when it never had one."""
        ...

    def record(self, model: str, version: int, *, ok: bool, seconds: float) -> None:
        """Notes one model call of a version in a running rollout (champion or candidate).

        Args:
            model: Model name.
            version: The version that ran the call.
            ok: False when the model failed.
            seconds: How long the model call took.
        """
        ...

    def record_shadow(
        self, model: str, version: int, *, ok: bool, seconds: float, rows: int, agreed: int
    ) -> None:
        """Notes one shadow call of the candidate, and how many of its rows agreed with the champion."""
        ...
