"""The REST application: TF Serving ``/v1`` and OIP ``/v2`` over one data plane.

Built by the composition root; nothing here runs at import.

Example:

```python
app = create_app(dataplane, settings, registry)
uvicorn.run(app, host=settings.host, port=settings.rest_port)
```
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

from fastapi import FastAPI, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from modelloop.serving.codecs.v2_json import HEADER_LENGTH
from modelloop.serving.errors import ServingError
from modelloop.serving.rest.errors import install_error_handlers
from modelloop.serving.rest.routes_alerts import create_alerts_router
from modelloop.serving.rest.routes_monitoring import create_monitoring_router
from modelloop.serving.rest.routes_tfserving import create_tfserving_router
from modelloop.serving.rest.routes_v2 import create_v2_router
from modelloop.serving.rest.transport import REQUEST_ID_HEADER

if TYPE_CHECKING:
    from modelloop.monitoring.service import EvaluationReport, MonitoringService
    from modelloop.monitoring.webhook import AlertHandler
    from modelloop.serving.dataplane import DataPlane
    from modelloop.serving.settings import ServingSettings

TITLE = "modelloop"


def create_app(
    dataplane: DataPlane,
    settings: ServingSettings,
    registry: CollectorRegistry,
    monitoring: MonitoringService | None = None,
    alerts: AlertHandler | None = None,
) -> FastAPI:
    """Builds the REST application.

    Args:
        dataplane: The data plane every route calls.
        settings: Server settings: ``max_body_bytes``, ``admin_token``, ``cors_origins``.
        registry: The Prometheus registry ``/metrics`` exposes.
        monitoring: Takes feedback and describes drift and accuracy on the status page.
            Defaults to None (the feedback route then answers 501).
        alerts: Handles ``POST /monitoring/alerts`` (Alertmanager's webhook) by starting
            gated retrains. Defaults to None (the route then answers 503).

    Returns:
        The FastAPI app, with ``/v1``, ``/v2``, ``/metrics``, ``/docs`` and ``/``.
    """
    app = FastAPI(
        title=TITLE,
        summary="TF Serving REST API and Open Inference Protocol V2 over one data plane.",
        version=str(dataplane.server_metadata().get("version", "")),
    )
    install_error_handlers(app)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
            # Browsers hide response headers unless listed; clients need these two.
            expose_headers=[REQUEST_ID_HEADER, HEADER_LENGTH],
        )
    app.include_router(create_tfserving_router(dataplane, settings))
    app.include_router(create_v2_router(dataplane, settings))
    app.include_router(create_monitoring_router(monitoring, settings))
    app.include_router(create_alerts_router(settings, alerts))

    @app.get("/metrics", tags=["monitoring"], summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def status_page() -> HTMLResponse:
        return HTMLResponse(render_status_page(dataplane, monitoring))

    return app


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _monitoring_cells(report: EvaluationReport | None) -> list[str]:
    """Window, drift, share, top features, prediction drift and accuracy cells of one version."""
    if report is None:
        return ["–"] * 6
    window = f"{report.window_rows} rows"
    drift = report.drift
    if drift is None:
        reason = report.drift_error or f"collecting ({report.window_rows}/{report.min_rows} rows)"
        cells = [window, html.escape(reason), "–", "–", "–"]
    else:
        top = [f for f in drift.top(3) if f.drifted]
        features = ", ".join(f"{html.escape(f.name)} ({f.psi:.2f})" for f in top) or "none"
        verdict = "<strong>DRIFT</strong>" if drift.drifted else "no"
        share = f"{drift.share:.0%} ({drift.n_drifted}/{len(drift.features)})"
        cells = [window, verdict, share, features, _fmt(drift.prediction_psi)]
    acc = report.accuracy
    labels = "?" if report.labels is None else str(report.labels)
    if report.store_error:
        cells.append(f"store unavailable: {html.escape(report.store_error)}")
    elif acc is None or acc.value is None:
        cells.append(f"no labels ({labels})")
    else:
        shown = f"{acc.metric} {acc.value:.3f}" + ("" if acc.ready else " (too few labels)")
        cells.append(f"{shown}, {acc.rows} in window, {labels} labels")
    return cells


def render_status_page(dataplane: DataPlane, monitoring: MonitoringService | None = None) -> str:
    """A plain HTML page: readiness, then every model version's state, drift and accuracy.

    Args:
        dataplane: The data plane to describe.
        monitoring: Where drift and accuracy come from. Defaults to None (columns say
            "off").

    Returns:
        The HTML document; every value from a model or a client is escaped.
    """
    columns = 9
    rows: list[str] = []
    for name in dataplane.model_names():
        reports = monitoring.status(name) if monitoring is not None else {}
        try:
            statuses = dataplane.model_status(name)
        except ServingError as error:
            rows.append(
                f"<tr><td>{html.escape(name)}</td><td></td>"
                f'<td colspan="{columns - 2}">{html.escape(error.message)}</td></tr>'
            )
            continue
        if not statuses:
            rows.append(
                f'<tr><td>{html.escape(name)}</td><td></td><td colspan="{columns - 2}">no versions</td></tr>'
            )
        for status in statuses:
            state = status.state.value + (f": {status.error_message}" if status.error_message else "")
            link = f"/v1/models/{html.escape(name)}/versions/{status.version}"
            extra = ["off"] * 6 if monitoring is None else _monitoring_cells(reports.get(status.version))
            cells = "".join(f"<td>{cell}</td>" for cell in extra)
            rows.append(
                f'<tr><td>{html.escape(name)}</td><td><a href="{link}">{status.version}</a></td>'
                f"<td>{html.escape(state)}</td>{cells}</tr>"
            )
    ready = "ready" if dataplane.ready() else "not ready"
    table = "\n".join(rows) or f'<tr><td colspan="{columns}">no models</td></tr>'
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{TITLE}</title></head>
<body>
<h1>{TITLE}</h1>
<p>Server: <strong>{ready}</strong> · <a href="/docs">API docs</a> · <a href="/metrics">metrics</a></p>
<table border="1" cellpadding="4">
<tr><th>model</th><th>version</th><th>state</th><th>window</th><th>drift detected</th><th>share drifted</th>
<th>top drifted features (PSI)</th><th>prediction drift (PSI)</th><th>accuracy</th></tr>
{table}
</table>
</body></html>
"""
