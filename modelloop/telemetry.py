"""Tracing set-up from the standard ``OTEL_*`` variables (each server process does its own).

Tracing is off unless ``OTEL_TRACES_EXPORTER`` names an exporter, although the
OpenTelemetry specification's default is ``otlp``: a server nobody asked to trace neither
loads the SDK nor sends anything anywhere. What is read:

* ``OTEL_SDK_DISABLED=true``: off, whatever else is set.
* ``OTEL_TRACES_EXPORTER``: a comma-separated list of ``otlp`` (OTLP over HTTP with
  protobuf), ``console`` (spans printed to standard output) and ``none``.
* ``OTEL_EXPORTER_OTLP_ENDPOINT`` (the base URL, ``/v1/traces`` appended) or
  ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (the full URL); default
  ``http://localhost:4318``. Headers, timeout, compression and certificates come from the
  exporter's own ``OTEL_EXPORTER_OTLP_*`` variables.
* ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` (the service is ``modelloop``
  when neither names it), ``OTEL_TRACES_SAMPLER`` and its argument, ``OTEL_BSP_*``.

Bad settings never stop a server: an unknown exporter, a malformed endpoint or an OTLP
protocol other than ``http/protobuf`` is a warning, and the server serves with the
exporters that work, or untraced. An exporter that cannot reach its receiver logs its
own errors and drops spans; requests do not wait for it (a bounded queue and a background
thread, the SDK's batch span processor).

With ``serve --workers N`` every worker is a process of its own that calls
:func:`setup_tracing` itself, so each has its provider, exporter thread and connection.

Example:

```python
provider = setup_tracing(os.environ, worker=None)
try:
    ...  # serve
finally:
    shutdown_tracing(provider)
```
"""

from __future__ import annotations

import logging
import threading
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

EXPORTERS = ("otlp", "console")
OTLP_PROTOCOL = "http/protobuf"
DEFAULT_SERVICE_NAME = "modelloop"
# Longest wait for the last spans at shutdown (the exporter's own timeout is 10 s).
SHUTDOWN_TIMEOUT_S = 3.0


@dataclass
class TracingPlan:
    """What the environment asks for, checked: the exporters to build and the warnings.

    Attributes:
        exporters: The exporter names that will be built (``otlp``, ``console``).
        warnings: One line per bad setting, each already naming the variable.
        reason: Why tracing is off when ``exporters`` is empty ("" when it was asked
            for and nothing worked: see ``warnings``).
    """

    exporters: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    reason: str = ""


def _true(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"


def endpoint_problem(url: str) -> str | None:
    """Why an OTLP/HTTP endpoint URL is unusable, or None when it is fine.

    Args:
        url: The value of an endpoint variable.

    Returns:
        A short reason, e.g. "it is not an http:// or https:// URL".
    """
    try:
        parts = urllib.parse.urlsplit(url.strip())
        port = parts.port  # raises ValueError on a port that is not a number in range
    except ValueError as exc:
        return f"it is not a valid URL ({exc})"
    if parts.scheme not in ("http", "https"):
        return "it is not an http:// or https:// URL"
    if not parts.hostname:
        return "it names no host"
    del port
    return None


def plan_tracing(env: Mapping[str, str]) -> TracingPlan:
    """Reads the ``OTEL_*`` variables into a :class:`TracingPlan` (no imports, no side effects).

    Args:
        env: The environment.

    Returns:
        The exporters to build and the warnings to log.
    """
    plan = TracingPlan()
    if _true(env.get("OTEL_SDK_DISABLED")):
        plan.reason = "OTEL_SDK_DISABLED is true"
        return plan
    raw = env.get("OTEL_TRACES_EXPORTER", "").strip()
    if not raw:
        plan.reason = "OTEL_TRACES_EXPORTER is not set"
        return plan
    names = [name.strip().lower() for name in raw.split(",") if name.strip()]
    if "none" in names:
        plan.reason = "OTEL_TRACES_EXPORTER is none"
        return plan
    for name in dict.fromkeys(names):
        if name not in EXPORTERS:
            plan.warnings.append(
                f"OTEL_TRACES_EXPORTER names an unknown exporter {name!r} (this server has "
                f"{', '.join(EXPORTERS)} and none); it is ignored"
            )
            continue
        if name == "otlp":
            problem = _otlp_problem(env)
            if problem is not None:
                plan.warnings.append(f"{problem}; spans are not sent over OTLP")
                continue
        plan.exporters.append(name)
    return plan


def _otlp_problem(env: Mapping[str, str]) -> str | None:
    for variable in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = env.get(variable, "").strip()
        if protocol:
            if protocol != OTLP_PROTOCOL:
                return f"{variable}={protocol!r} is not supported (this server sends {OTLP_PROTOCOL})"
            break
    for variable in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        url = env.get(variable, "").strip()
        if url:
            problem = endpoint_problem(url)
            if problem is not None:
                return f"{variable}={url!r} is malformed: {problem}"
            break
    return None


def setup_tracing(env: Mapping[str, str], worker: int | None = None) -> Any:
    """Installs the SDK's tracer provider and turns the request path's spans on, if asked for.

    Never raises: every problem is a warning and the server goes on without tracing (or
    with the exporters that work).

    Args:
        env: The environment (``os.environ``).
        worker: This process's worker index under ``serve --workers N``, recorded as the
            resource attribute ``modelloop.worker``. Defaults to None.

    Returns:
        The ``TracerProvider`` to pass to :func:`shutdown_tracing`, or None when tracing
        is off.
    """
    plan = plan_tracing(env)
    for line in plan.warnings:
        logger.warning("tracing: %s", line)
    if not plan.exporters:
        if plan.warnings:
            logger.warning("tracing is off: no exporter in OTEL_TRACES_EXPORTER can be used")
        elif env.get("OTEL_EXPORTER_OTLP_ENDPOINT") and not env.get("OTEL_TRACES_EXPORTER"):
            logger.info("tracing is off: OTEL_EXPORTER_OTLP_ENDPOINT is set, but OTEL_TRACES_EXPORTER is not")
        return None
    try:
        return _install(plan, env, worker)
    except Exception as exc:  # noqa: BLE001 - a bad setting must not stop serving
        logger.warning(
            "tracing is off: the OpenTelemetry SDK could not be set up: %s: %s", type(exc).__name__, exc
        )
        return None


def _install(plan: TracingPlan, env: Mapping[str, str], worker: int | None) -> Any:
    from opentelemetry import trace
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    from modelloop import __version__
    from modelloop.serving import tracing

    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES.
    resource = Resource.create({"service.version": __version__})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    if worker is not None:
        resource = resource.merge(Resource({"modelloop.worker": worker}))
    # Shut down by shutdown_tracing, bounded; not again at interpreter exit.
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    built: list[str] = []
    for name in plan.exporters:
        exporter: SpanExporter
        try:
            if name == "otlp":
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

                exporter = OTLPSpanExporter()
            else:
                exporter = ConsoleSpanExporter()
            provider.add_span_processor(BatchSpanProcessor(exporter))
        except Exception as exc:  # noqa: BLE001 - serve with the exporters that work
            logger.warning(
                "tracing: the %s exporter could not be set up: %s: %s", name, type(exc).__name__, exc
            )
            continue
        built.append(name)
    if not built:
        logger.warning("tracing is off: no exporter could be set up")
        provider.shutdown()
        return None
    trace.set_tracer_provider(provider)
    tracing.enable(provider.get_tracer("modelloop.serving", __version__))
    logger.info(
        "tracing on: service %s, exporters %s",
        resource.attributes.get(SERVICE_NAME),
        ", ".join(built),
    )
    return provider


def shutdown_tracing(provider: Any, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
    """Sends the spans still queued and stops the exporters, waiting at most ``timeout_s``.

    Args:
        provider: What :func:`setup_tracing` returned (None: nothing to do).
        timeout_s: The longest wait; an unreachable receiver does not hold the exit up.
            Defaults to 3.
    """
    if provider is None:
        return
    from modelloop.serving import tracing

    tracing.disable()
    done = threading.Thread(target=provider.shutdown, name="tracing-shutdown", daemon=True)
    done.start()
    done.join(timeout_s)
    if done.is_alive():
        logger.warning("tracing: spans still unsent after %.0f s at shutdown were dropped", timeout_s)
