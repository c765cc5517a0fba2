"""OpenAPI documentation of the REST bodies: pydantic models that describe, never decode.

The predict and infer handlers read their bodies with the fast codecs
(:mod:`~modelloop.serving.codecs.tfserving_json`, :mod:`~modelloop.serving.codecs.v2_json`);
a pydantic body parameter would parse every request twice. So these models are attached to
the route declarations as documentation only (``openapi_extra`` for the request body,
``responses`` for the answers): ``/docs`` and ``/openapi.json`` show what to send, with
examples a user can run against the built-in ``digits`` model, and the schema tests
generate bodies from them and check every answer against them.

Example:

```python
@router.post("/v2/models/{model}/infer", openapi_extra=INFER_BODY, responses=INFER_RESPONSES)
async def infer_latest(request: Request, model: str) -> Response: ...
```
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from modelloop.serving.datatypes import OIP_TO_NUMPY
from modelloop.web import error_responses, openapi_body, schema_ref

# One row of the built-in digits task (a "0"), as in the README's curl examples.
DIGIT_ROW: list[float] = [
    0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0, 0, 3, 15, 2, 0, 11, 8, 0, 0, 4, 12, 0, 0, 8, 8, 0,
    0, 5, 8, 0, 0, 9, 8, 0, 0, 4, 11, 0, 1, 12, 7, 0, 0, 2, 14, 5, 10, 12, 0, 0, 0, 0, 6, 13, 10, 0, 0, 0,
]  # fmt: skip
_OIP_DATATYPES = ", ".join(OIP_TO_NUMPY)


class ErrorBody(BaseModel):
    """Every error of both protocols: TF Serving's and the OIP's ``{"error": ...}``."""

    error: str = Field(description="What went wrong, naming the field or value at fault.")


class Base64Bytes(BaseModel):
    """TF Serving's wrapper for bytes in JSON (DT_STRING tensors)."""

    model_config = ConfigDict(extra="forbid")

    b64: str = Field(description="The bytes, base64-encoded (RFC 4648).", examples=["aGVsbG8="])


# A tensor in TF Serving's JSON: a scalar, a {"b64": ...} wrapper, or a (nested) list of those.
TFTensor = float | str | bool | Base64Bytes | list[Any]


class PredictRowRequest(BaseModel):
    """A ``:predict`` request in the row format: one entry per example.

    Each instance is the one input's value, or an object keyed by input name when the
    signature has several inputs. All instances share the 0-th (batch) dimension. The
    answer is ``{"predictions": [...]}``.
    """

    signature_name: str = Field(
        "serving_default", description='The signature to run; "" means serving_default.'
    )
    instances: list[TFTensor | dict[str, TFTensor]] = Field(
        min_length=1, description="The rows of the batch."
    )


class PredictColumnarRequest(BaseModel):
    """A ``:predict`` request in the columnar format: one whole tensor per input.

    ``inputs`` is the single input's tensor, or an object keyed by input name; each tensor
    carries its own batch dimension. The answer is ``{"outputs": ...}``.
    """

    signature_name: str = Field(
        "serving_default", description='The signature to run; "" means serving_default.'
    )
    inputs: TFTensor | dict[str, TFTensor] = Field(description="The input tensor(s).")


class PredictRowResponse(BaseModel):
    """The answer to a row-format request: one entry per row (an object per row when the
    signature has several outputs). Non-finite floats are written ``NaN``/``Infinity``."""

    predictions: list[Any]


class PredictColumnarResponse(BaseModel):
    """The answer to a columnar request: the output tensor, or an object keyed by output name."""

    outputs: Any


class V2RequestInput(BaseModel):
    """One input tensor of an OIP infer request."""

    name: str = Field(description="The input's name, as in the model metadata.")
    shape: list[int] = Field(description="The full shape, batch dimension included.")
    datatype: str = Field(description=f"One of {_OIP_DATATYPES}.", examples=["FP32"])
    parameters: dict[str, Any] | None = Field(
        None,
        description='With the binary extension, {"binary_data_size": N}: the tensor is N raw '
        "little-endian bytes after the JSON header, and `data` is absent.",
    )
    data: list[Any] | None = Field(
        None, description="The elements in row-major order, flat or nested as the shape."
    )


class V2RequestOutput(BaseModel):
    """An output the client asks for (all outputs when the request lists none)."""

    name: str
    parameters: dict[str, Any] | None = Field(
        None, description='{"binary_data": true} asks for this output as raw bytes after the JSON.'
    )


class V2InferRequest(BaseModel):
    """An Open Inference Protocol V2 infer request (JSON).

    With Triton's binary tensor extension the body is this JSON header followed by the raw
    tensors: send ``Content-Type: application/octet-stream`` and the header's length in
    ``Inference-Header-Content-Length``, and give each binary input
    ``"parameters": {"binary_data_size": N}`` instead of ``data``.
    """

    id: str | None = Field(None, description="Echoed in the answer.")
    parameters: dict[str, Any] | None = Field(
        None, description='{"binary_data_output": true} asks for every output as raw bytes.'
    )
    inputs: list[V2RequestInput] = Field(min_length=1)
    outputs: list[V2RequestOutput] | None = None


class V2ResponseOutput(BaseModel):
    """One output tensor of an infer answer."""

    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = Field(
        None, description='{"binary_data_size": N} when the tensor follows the JSON as raw bytes.'
    )
    data: list[Any] | None = Field(None, description="The elements, flat, in row-major order.")


class V2InferResponse(BaseModel):
    """An Open Inference Protocol V2 infer answer (the JSON part, with the binary extension)."""

    model_name: str
    model_version: str
    id: str = Field(description="The request's id: the body's, else the x-request-id.")
    parameters: dict[str, Any] | None = None
    outputs: list[V2ResponseOutput]


PREDICT_BODY = openapi_body(
    [PredictRowRequest, PredictColumnarRequest],
    description="The row format (`instances`) or the columnar format (`inputs`), as TF Serving "
    "takes them. `curl -d` bodies (form content type) are accepted too.",
    examples={
        "row": {
            "summary": "Row format: one digit",
            "value": {"instances": [DIGIT_ROW]},
        },
        "row_named": {
            "summary": "Row format, inputs named",
            "value": {"signature_name": "serving_default", "instances": [{"pixels": DIGIT_ROW}]},
        },
        "columnar": {
            "summary": "Columnar format",
            "value": {"inputs": {"pixels": [DIGIT_ROW]}},
        },
    },
    components=[PredictRowResponse, PredictColumnarResponse],
    path_examples={
        "model_method": "digits:predict",
        "model": "digits",
        "version_method": "1:predict",
        "label_method": "stable:predict",
    },
)
PREDICT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "`predictions` for a row request, `outputs` for a columnar one. The "
        "`x-request-id` header names the prediction (send it back with feedback).",
        "content": {
            "application/json": {
                "schema": {
                    "anyOf": [
                        schema_ref(PredictRowResponse),
                        schema_ref(PredictColumnarResponse),
                    ]
                }
            }
        },
    },
    **error_responses(ErrorBody, 400, 404, 413, 415, 429, 501, 503),
}

INFER_BODY = openapi_body(
    [V2InferRequest],
    description="JSON, or with Triton's binary tensor extension the JSON header followed by raw "
    "tensors (`application/octet-stream`, header length in `Inference-Header-Content-Length`).",
    examples={
        "json": {
            "summary": "One digit, JSON data",
            "value": {
                "id": "example-1",
                "inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": DIGIT_ROW}],
            },
        },
        "nested": {
            "summary": "Nested data, one output asked for",
            "value": {
                "inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": [DIGIT_ROW]}],
                "outputs": [{"name": "probabilities"}],
            },
        },
    },
    binary_description="The JSON header (an infer request whose binary inputs carry "
    '`"parameters": {"binary_data_size": N}` instead of `data`) followed by those tensors\' '
    "raw little-endian bytes, in input order.",
    headers={
        "Inference-Header-Content-Length": "The length in bytes of the JSON header at the start of a "
        "binary body; absent for an all-JSON body."
    },
    path_examples={"model": "digits", "version": "1"},
)
INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The outputs. When binary outputs were asked for, the body is the JSON "
        "header followed by their bytes (`application/octet-stream`, header length in "
        "`Inference-Header-Content-Length`).",
        "model": V2InferResponse,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    },
    **error_responses(ErrorBody, 400, 404, 413, 415, 429, 503),
}


class VersionStatusEntry(BaseModel):
    """One version's state, as TF Serving's ``GetModelStatus`` reports it."""

    version: str
    state: str = Field(description="START, LOADING, AVAILABLE, UNLOADING or END (END with an error: failed).")
    status: dict[str, str] = Field(description="`error_code` (OK or UNKNOWN) and `error_message`.")


class ModelStatusResponse(BaseModel):
    """TF Serving's model status answer."""

    model_version_status: list[VersionStatusEntry]


class ModelMetadataResponse(BaseModel):
    """TF Serving's metadata answer: the ``serving_default`` signature of the version."""

    model_spec: dict[str, str] = Field(description="`name`, `signature_name` and `version`.")
    metadata: dict[str, Any] = Field(description="`signature_def`: the inputs, outputs and method name.")


STATUS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": ModelStatusResponse, "description": "The state of each version"},
    **error_responses(ErrorBody, 400, 404),
}
METADATA_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": ModelMetadataResponse, "description": "The signature"},
    **error_responses(ErrorBody, 400, 404, 503),
}


class V2ServerMetadata(BaseModel):
    """The OIP server metadata answer."""

    name: str
    version: str
    extensions: list[str]


class V2Duration(BaseModel):
    """A count of events and their total duration in nanoseconds."""

    count: int
    ns: int


class V2InferStatistics(BaseModel):
    """Requests (success, fail), queue waits and model runs of one version."""

    success: V2Duration
    fail: V2Duration
    queue: V2Duration
    compute_input: V2Duration
    compute_infer: V2Duration
    compute_output: V2Duration
    cache_hit: V2Duration
    cache_miss: V2Duration


class V2BatchStatistics(BaseModel):
    """Model runs of one batch size."""

    batch_size: int
    compute_input: V2Duration
    compute_infer: V2Duration
    compute_output: V2Duration


class V2VersionStatistics(BaseModel):
    """Triton's statistics of one model version."""

    name: str
    version: str
    last_inference: int = Field(description="Milliseconds since the epoch; 0 before any request.")
    inference_count: int = Field(description="Rows inferred.")
    execution_count: int = Field(description="Runtime calls (batches).")
    inference_stats: V2InferStatistics
    batch_stats: list[V2BatchStatistics]
    memory_usage: list[dict[str, Any]]


class V2ModelStatistics(BaseModel):
    """The statistics extension's answer."""

    model_stats: list[V2VersionStatistics]


class SharedMemoryRegion(BaseModel):
    """A registered system shared memory region."""

    name: str
    key: str = Field(description="The POSIX shared memory object (shm_open's name).")
    offset: int = Field(description="Where the region starts in the object, in bytes.")
    byte_size: int


class V2Live(BaseModel):
    """The OIP liveness answer."""

    live: bool


class V2Ready(BaseModel):
    """The OIP readiness answer."""

    ready: bool


class V2MetadataTensor(BaseModel):
    """An input or output of a model, as OIP metadata describes it."""

    name: str
    datatype: str
    shape: list[int] = Field(description="-1 for a variable dimension.")


class V2ModelMetadata(BaseModel):
    """The OIP model metadata answer."""

    name: str
    versions: list[str] = Field(description="The versions that can serve.")
    platform: str
    inputs: list[V2MetadataTensor]
    outputs: list[V2MetadataTensor]


class V2ModelReady(BaseModel):
    """The OIP model readiness answer."""

    name: str
    ready: bool


class RepositoryIndexEntry(BaseModel):
    """One model version of the repository index (Triton's repository extension)."""

    name: str
    version: str
    state: str
    reason: str


class RepositoryIndexRequest(BaseModel):
    """The optional body of a repository index request."""

    ready: bool = Field(False, description="Only versions that can serve.")


ADMIN_ERRORS = error_responses(
    ErrorBody,
    401,
    403,
    s401="Missing or wrong bearer token",
    s403="Admin routes are off: the server has no MODELLOOP_ADMIN_TOKEN",
)
