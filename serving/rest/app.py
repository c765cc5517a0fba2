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
from modelloop.serving.rest.routes_tfserving import create_tfserving_router
from modelloop.serving.rest.routes_v2 import create_v2_router
from modelloop.serving.rest.transport import REQUEST_ID_HEADER

if TYPE_CHECKING:
    from modelloop.serving.dataplane import DataPlane
    from modelloop.serving.settings import ServingSettings

TITLE = "modelloop"


def create_app(dataplane: DataPlane, settings: ServingSettings, registry: CollectorRegistry) -> FastAPI:
    """Builds the REST application.

    Args:
        dataplane: The data plane every route calls.
        settings: Server settings: ``max_body_bytes``, ``admin_token``, ``cors_origins``.
        registry: The Prometheus registry ``/metrics`` exposes.

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

    @app.get("/metrics", tags=["monitoring"], summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def status_page() -> HTMLResponse:
        return HTMLResponse(render_status_page(dataplane))

    return app


def render_status_page(dataplane: DataPlane) -> str:
    """A minimal HTML page: readiness, then every model's versions and states.

    Args:
        dataplane: The data plane to describe.

    Returns:
        The HTML document.
    """
    rows: list[str] = []
    for name in dataplane.model_names():
        try:
            statuses = dataplane.model_status(name)
        except ServingError as error:
            rows.append(
                f"<tr><td>{html.escape(name)}</td><td></td><td>{html.escape(error.message)}</td></tr>"
            )
            continue
        if not statuses:
            rows.append(f"<tr><td>{html.escape(name)}</td><td></td><td>no versions</td></tr>")
        for status in statuses:
            state = status.state.value + (f": {status.error_message}" if status.error_message else "")
            link = f"/v1/models/{html.escape(name)}/versions/{status.version}"
            rows.append(
                f'<tr><td>{html.escape(name)}</td><td><a href="{link}">{status.version}</a></td>'
                f"<td>{html.escape(state)}</td></tr>"
            )
    ready = "ready" if dataplane.ready() else "not ready"
    table = "\n".join(rows) or '<tr><td colspan="3">no models</td></tr>'
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{TITLE}</title></head>
<body>
<h1>{TITLE}</h1>
<p>Server: <strong>{ready}</strong> · <a href="/docs">API docs</a> · <a href="/metrics">metrics</a></p>
<table border="1" cellpadding="4">
<tr><th>model</th><th>version</th><th>state</th></tr>
{table}
</table>
</body></html>
"""
