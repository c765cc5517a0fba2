"""The REST edge's request spans: the W3C ``traceparent`` header in, HTTP attributes on.

Used by the predict and infer handlers only while tracing is on
(:data:`modelloop.serving.tracing.TRACER` set); see :mod:`modelloop.serving.tracing`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from modelloop.serving import tracing

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from modelloop.serving.types import Protocol
    from modelloop.web import HttpRequest

PREDICT_SPAN = "POST /v1/models/{model}:predict"
INFER_SPAN = "POST /v2/models/{model}/infer"
HTTP_STATUS = "http.response.status_code"


@contextlib.contextmanager
def traced_http(name: str, protocol: Protocol, request: HttpRequest) -> Iterator[Span]:
    """The request span of a predict or infer call, its parent the request's ``traceparent``.

    Args:
        name: The span name (the method and route template).
        protocol: The front end.
        request: The HTTP request.

    Yields:
        The span, current inside the block; pass it to :func:`answered` with the status.
    """
    headers = request.headers
    attributes = {"http.request.method": "POST", "http.route": name.partition(" ")[2]}
    with tracing.request_span(
        name, protocol, headers.get(tracing.TRACEPARENT), headers.get(tracing.TRACESTATE), attributes
    ) as span:
        yield span


def answered(span: Span, status: int) -> None:
    """Records the response's HTTP status; 500 or more sets the span's status to ERROR."""
    span.set_attribute(HTTP_STATUS, status)
    if status >= 500:
        tracing.set_error(span, f"HTTP {status}")
