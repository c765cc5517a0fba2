"""The REST application: TF Serving ``/v1`` and OIP ``/v2`` over one data plane.

Built by the composition root; nothing here runs at import. Other packages extend the
app without serving importing them: ``routers`` are mounted beside the protocol routes
(monitoring's feedback route and alert webhook), ``status_columns`` adds columns to
the status page at ``/`` and ``status_sections`` adds sections below its table
(monitoring's live health charts).

Example:

```python
app = create_app(dataplane, settings, registry, routers=[feedback_router], status_columns=columns)
```
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from fastapi import APIRouter, FastAPI, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from modelloop.errors import ServiceError
from modelloop.serving.codecs.v2_json import HEADER_LENGTH
from modelloop.serving.rest.errors import install_error_handlers
from modelloop.serving.rest.routes_tfserving import create_tfserving_router
from modelloop.serving.rest.routes_v2 import create_v2_router
from modelloop.web import REQUEST_ID_HEADER

if TYPE_CHECKING:
    from modelloop.serving.dataplane import DataPlane
    from modelloop.serving.settings import ServingSettings

TITLE = "modelloop"


class StatusColumns(Protocol):
    """Extra columns of the status page, one row per model version (monitoring's drift and accuracy).

    Attributes:
        headers: The column titles, plain text.
    """

    headers: Sequence[str]

    def cells(self, model: str, version: int) -> list[str]:
        """One HTML cell per header for a version; the implementer escapes what it shows."""
        ...


class StatusSection(Protocol):
    """A section of the status page below the model table (monitoring's health charts)."""

    def html(self) -> str:
        """The section's HTML; the implementer escapes what it shows."""
        ...


def create_app(
    dataplane: DataPlane,
    settings: ServingSettings,
    registry: CollectorRegistry,
    *,
    routers: Sequence[APIRouter] = (),
    status_columns: StatusColumns | None = None,
    status_sections: Sequence[StatusSection] = (),
) -> FastAPI:
    """Builds the REST application.

    Args:
        dataplane: The data plane every route calls.
        settings: Server settings: ``max_body_bytes``, ``admin_token``, ``cors_origins``.
        registry: The Prometheus registry ``/metrics`` exposes.
        routers: More routes to mount (the extension point). Defaults to none.
        status_columns: More columns for the status page. Defaults to None.
        status_sections: Sections below the status page's table. Defaults to none.

    Returns:
        The FastAPI app, with ``/v1``, ``/v2``, ``/metrics``, ``/docs``, ``/`` and ``routers``.
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
    for router in routers:
        app.include_router(router)

    @app.get("/metrics", tags=["monitoring"], summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def status_page() -> HTMLResponse:
        return HTMLResponse(render_status_page(dataplane, status_columns, status_sections))

    return app


def render_status_page(
    dataplane: DataPlane, columns: StatusColumns | None = None, sections: Sequence[StatusSection] = ()
) -> str:
    """A plain HTML page: readiness, then every model version's state and the extra columns.

    Args:
        dataplane: The data plane to describe.
        columns: Extra columns (monitoring's). Defaults to None.
        sections: Sections below the table (monitoring's). Defaults to none.

    Returns:
        The HTML document; every value from a model or a client is escaped.
    """
    extra_headers = list(columns.headers) if columns is not None else []
    width = 3 + len(extra_headers)
    rows: list[str] = []
    for name in dataplane.model_names():
        try:
            statuses = dataplane.model_status(name)
        except ServiceError as error:
            rows.append(
                f"<tr><td>{html.escape(name)}</td><td></td>"
                f'<td colspan="{width - 2}">{html.escape(error.message)}</td></tr>'
            )
            continue
        if not statuses:
            rows.append(
                f'<tr><td>{html.escape(name)}</td><td></td><td colspan="{width - 2}">no versions</td></tr>'
            )
        for status in statuses:
            state = status.state.value + (f": {status.error_message}" if status.error_message else "")
            link = f"/v1/models/{html.escape(name)}/versions/{status.version}"
            extra = columns.cells(name, status.version) if columns is not None else []
            cells = "".join(f"<td>{cell}</td>" for cell in extra)
            rows.append(
                f'<tr><td>{html.escape(name)}</td><td><a href="{link}">{status.version}</a></td>'
                f"<td>{html.escape(state)}</td>{cells}</tr>"
            )
    ready = "ready" if dataplane.ready() else "not ready"
    table = "\n".join(rows) or f'<tr><td colspan="{width}">no models</td></tr>'
    header = "".join(f"<th>{html.escape(h)}</th>" for h in ("model", "version", "state", *extra_headers))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{TITLE}</title>
<link rel="icon" href="data:,"></head>
<body>
<h1>{TITLE}</h1>
<p>Server: <strong>{ready}</strong> · <a href="/docs">API docs</a> · <a href="/metrics">metrics</a></p>
<table id="models" border="1" cellpadding="4">
<tr>{header}</tr>
{table}
</table>
{"".join(section.html() for section in sections)}
</body></html>
"""
