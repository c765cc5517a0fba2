"""Spans of the request path (OpenTelemetry), and nothing at all while tracing is off.

Tracing is off unless the composition root calls :func:`enable` with a tracer (it does
when ``OTEL_TRACES_EXPORTER`` names an exporter; see :mod:`modelloop.telemetry`). Every
call site on the request path checks the module attribute :data:`TRACER` once and does
nothing else when it is None: no span objects, no context attached, and this module does
not even import OpenTelemetry until :func:`enable` runs, so a server without tracing
neither loads nor pays for it.

Which span each step of a request opens, and how a batch links to the requests it served,
is told once, in ARCHITECTURE.md ("Tracing"); the span names and attributes users see are
in docs/operations.md. What holds here: a request span is the current span for the rest of
its call, a batch span links to every request span in it, and no span is made while
:data:`TRACER` is None.

Example:

```python
tracing.enable(provider.get_tracer("modelloop"))
with tracing.request_span("POST /v2/models/{model}/infer", Protocol.V2_REST, traceparent, None):
    response = await dataplane.handle(decoder)
```
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from modelloop.errors import ErrorCode, ServiceError

if TYPE_CHECKING:
    from opentelemetry.trace import Span, SpanContext, Tracer

    from modelloop.serving.types import Protocol

TRACER: Tracer | None = None
"""The tracer of the request path, or None while tracing is off (the one check)."""

MODEL = "modelloop.model"
VERSION = "modelloop.version"
PROTOCOL = "modelloop.protocol"
BATCH_SIZE = "modelloop.batch.size"
BATCH_REQUESTS = "modelloop.batch.requests"
REQUEST_ID = "modelloop.request_id"
CODE = "modelloop.code"

DECODE = "modelloop.decode"
QUEUE = "modelloop.queue"
BATCH = "modelloop.batch"
ENCODE = "modelloop.encode"

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"

# Codes that are the server's fault: the request span's status is ERROR for these only
# (a client's bad input is a 4xx / INVALID_ARGUMENT, not a failure of the server).
SERVER_FAULTS = frozenset(
    {ErrorCode.INTERNAL, ErrorCode.UNAVAILABLE, ErrorCode.DEADLINE_EXCEEDED, ErrorCode.UNIMPLEMENTED}
)

# OpenTelemetry's modules, imported by enable() only.
_trace: Any = None
_context: Any = None
_propagator: Any = None

Mark = tuple["SpanContext", int]
"""A request waiting for its batch: its span's context and when it started waiting (ns)."""


def enable(tracer: Tracer) -> None:
    """Turns tracing on for this process: the request path makes spans with ``tracer``.

    Args:
        tracer: A tracer of the SDK's provider (or any OpenTelemetry tracer).
    """
    global TRACER, _trace, _context, _propagator
    from opentelemetry import context, trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    _trace, _context, _propagator = trace, context, TraceContextTextMapPropagator()
    TRACER = tracer


def disable() -> None:
    """Turns tracing off again (tests; a server keeps what it started with)."""
    global TRACER
    TRACER = None


def _tracer() -> Tracer:
    tracer = TRACER
    if tracer is None:
        raise RuntimeError("tracing is off; check serving.tracing.TRACER before making spans")
    return tracer


# -- the request span (the edges) --------------------------------------------------------------


@contextlib.contextmanager
def request_span(
    name: str,
    protocol: Protocol,
    traceparent: str | None,
    tracestate: str | None,
    attributes: Mapping[str, str | int] | None = None,
) -> Iterator[Span]:
    """Opens a request's server span, current for the code inside the ``with`` block.

    Only for tracing on (:data:`TRACER` set). An exception that leaves the block is
    recorded; a :class:`~modelloop.errors.ServiceError` sets the span's code, and its
    status to ERROR when the code is the server's fault.

    Args:
        name: The span name (the route or the gRPC method).
        protocol: The front end.
        traceparent: The client's W3C ``traceparent``, or None.
        tracestate: The client's W3C ``tracestate``, or None.
        attributes: More attributes (HTTP or RPC). Defaults to none.

    Yields:
        The span.
    """
    tracer = _tracer()
    parent = None
    if traceparent:
        carrier = {TRACEPARENT: traceparent}
        if tracestate:
            carrier[TRACESTATE] = tracestate
        parent = _propagator.extract(carrier)
    attrs: dict[str, str | int] = {PROTOCOL: protocol.value}
    if attributes:
        attrs.update(attributes)
    span = tracer.start_span(name, context=parent, kind=_trace.SpanKind.SERVER, attributes=attrs)
    token = _context.attach(_trace.set_span_in_context(span))
    try:
        yield span
    except ServiceError as exc:
        span.set_attribute(CODE, exc.code.value)
        if exc.code in SERVER_FAULTS:
            span.set_status(_trace.StatusCode.ERROR, exc.message)
        raise
    except BaseException as exc:
        span.record_exception(exc)
        span.set_status(_trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}")
        raise
    finally:
        _context.detach(token)
        span.end()


def set_error(span: Span, description: str) -> None:
    """Sets a span's status to ERROR."""
    span.set_status(_trace.StatusCode.ERROR, description)


def metadata_value(metadata: Sequence[tuple[str, Any]] | None, key: str) -> str | None:
    """One key of gRPC invocation metadata (lower-case keys), or None."""
    for name, value in metadata or ():
        if name == key and isinstance(value, str):
            return value
    return None


# -- the data plane ------------------------------------------------------------------------------


def start_decode(protocol: Protocol) -> Span:
    """Starts the decode span, a child of the current request span."""
    return _tracer().start_span(DECODE, attributes={PROTOCOL: protocol.value})


def decoded(span: Span, model: str, version: int, request_id: str) -> SpanContext | None:
    """Ends the decode span and names the request on the request span.

    Returns:
        The request span's context, for the batcher and the monitoring writer; None when
        the request has no valid span.
    """
    span.set_attribute(MODEL, model)
    span.set_attribute(VERSION, version)
    span.end()
    current = _trace.get_current_span()
    current.set_attribute(MODEL, model)
    current.set_attribute(VERSION, version)
    current.set_attribute(REQUEST_ID, request_id)
    context: SpanContext = current.get_span_context()
    return context if context.is_valid else None


def finished(decode: Span | None, code: str) -> None:
    """Records the outcome of :meth:`DataPlane.handle` on the request span.

    Ends the decode span if the request failed before it ended, and sets the request
    span's status to ERROR when the code is the server's fault.

    Args:
        decode: The decode span if it is still open, else None.
        code: ``OK``, an :class:`~modelloop.errors.ErrorCode` value or ``CANCELLED``.
    """
    current = _trace.get_current_span()
    current.set_attribute(CODE, code)
    failed = code not in ("OK", "CANCELLED") and ErrorCode(code) in SERVER_FAULTS
    if failed:
        current.set_status(_trace.StatusCode.ERROR, code)
    if decode is not None:
        decode.set_attribute(CODE, code)
        if failed:
            decode.set_status(_trace.StatusCode.ERROR, code)
        decode.end()


@contextlib.contextmanager
def encode_span(protocol: Protocol, model: str, version: int) -> Iterator[None]:
    """The encode span around the edge's encoding (a child of the request span)."""
    span = _tracer().start_span(ENCODE, attributes={PROTOCOL: protocol.value, MODEL: model, VERSION: version})
    try:
        yield
    except BaseException as exc:
        span.record_exception(exc)
        span.set_status(_trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}")
        raise
    finally:
        span.end()


# -- the batcher ---------------------------------------------------------------------------------


def mark(context: SpanContext | None = None) -> Mark | None:
    """A request that starts waiting for its batch now, or None without a request span.

    Args:
        context: The request span's context. Defaults to the current span's.
    """
    if context is None:
        context = _trace.get_current_span().get_span_context()
    if context is None or not context.is_valid:
        return None
    return context, time.time_ns()


def start_batch(marks: Sequence[Mark], model: str, version: int, rows: int, inline: bool) -> Span:
    """Starts a batch span and ends the queue span of each of its requests.

    The batch span's parent is the first (sampled) request's span and it links to every
    request's span; each request's queue span (its parent the request span, from the request's
    mark to now) links back to the batch.

    Args:
        marks: The batch's requests that carry a span, in order.
        model: Model name.
        version: Model version.
        rows: Rows in the batch.
        inline: Whether the call runs on the event loop (a tiny model).

    Returns:
        The batch span; end it with :func:`end_batch`.
    """
    tracer = _tracer()
    trace = _trace
    now = time.time_ns()
    parent = (
        trace.set_span_in_context(trace.NonRecordingSpan(first_sampled(m[0] for m in marks)))
        if marks
        else None
    )
    attrs: dict[str, str | int | bool] = {
        MODEL: model,
        VERSION: version,
        BATCH_SIZE: rows,
        BATCH_REQUESTS: len(marks),
        "modelloop.batch.inline": inline,
    }
    batch = tracer.start_span(
        BATCH, context=parent, links=[trace.Link(m[0]) for m in marks], attributes=attrs, start_time=now
    )
    link = [trace.Link(batch.get_span_context())]
    queue_attrs: dict[str, str | int] = {
        MODEL: model,
        VERSION: version,
        BATCH_SIZE: rows,
        BATCH_REQUESTS: len(marks),
    }
    for context, since in marks:
        queue = tracer.start_span(
            QUEUE,
            context=trace.set_span_in_context(trace.NonRecordingSpan(context)),
            links=link,
            attributes=queue_attrs,
            start_time=min(since, now),
        )
        queue.end(end_time=now)
    return batch


def first_sampled(contexts: Iterable[SpanContext]) -> SpanContext:
    """The first sampled span context of several (else the first): the parent of a shared span.

    With a ratio sampler a batch may mix sampled and unsampled requests; its span follows
    the sampling decision of its parent, so a sampled parent keeps it for the sampled ones.
    """
    found = list(contexts)
    return next((c for c in found if c.trace_flags.sampled), found[0])


LOG_WRITE = "modelloop.monitoring.write"
"""The span of one prediction-log segment written, linked to every request it logs."""


def start_log_write(
    contexts: Sequence[SpanContext], requests: int, models: Sequence[tuple[str, int]]
) -> Span:
    """Starts the span of one segment the prediction logger writes.

    Its parent is the first sampled request's span (so a lone request's trace shows its
    write) and it links to every traced request in the segment. It uses the provider of the
    request spans (the one :func:`enable` was given), so it is only called when tracing is on.

    Args:
        contexts: The span contexts of the segment's traced requests (not empty).
        requests: Requests in the segment.
        models: The ``(model, version)`` pairs it holds.

    Returns:
        The span; the caller ends it.
    """
    trace = _trace
    attributes: dict[str, str | int] = {"modelloop.monitoring.requests": requests}
    if len(models) == 1:
        attributes[MODEL], attributes[VERSION] = models[0]
    return _tracer().start_span(
        LOG_WRITE,
        context=trace.set_span_in_context(trace.NonRecordingSpan(first_sampled(contexts))),
        links=[trace.Link(context) for context in contexts],
        attributes=attributes,
    )


def end_batch(span: Span, error: BaseException | None = None) -> None:
    """Ends a batch span, recording the runtime's error if it failed."""
    if error is not None:
        span.record_exception(error)
        span.set_status(_trace.StatusCode.ERROR, f"{type(error).__name__}: {error}")
    span.end()
