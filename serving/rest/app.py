"""The REST application: TF Serving ``/v1`` and OIP ``/v2`` over one data plane.

Built by the composition root; nothing here runs at import. Other packages extend the
app without serving importing them: ``routers`` are mounted beside the protocol routes
(monitoring's feedback route and alert webhook), ``card_parts`` add to each model's
card on the status page at ``/`` (the rollout in progress) and ``status_sections`` add
sections below the cards (monitoring's live health curves); the page is
:mod:`.status_page`.

Example:

```python
app = create_app(dataplane, settings, registry, routers=[feedback_router], card_parts=[rollout_part])
```
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from modelloop.serving.codecs.v2_json import HEADER_LENGTH
from modelloop.serving.rest.errors import error_response, install_error_handlers
from modelloop.serving.rest.fastpath import PredictFastPath
from modelloop.serving.rest.origin import OriginGuard
from modelloop.serving.rest.routes_shm import create_shared_memory_router
from modelloop.serving.rest.routes_tfserving import create_tfserving_router
from modelloop.serving.rest.routes_v2 import create_v2_router
from modelloop.serving.rest.status_page import (
    TITLE,
    StatusCardPart,
    StatusSection,
    render_status_page,
)
from modelloop.web import ADMIN_SCHEME, MODEL_VERSION_HEADER, REQUEST_ID_HEADER, collect_openapi_schemas

if TYPE_CHECKING:
    from starlette.types import Receive, Scope, Send

    from modelloop.serving.dataplane import DataPlane
    from modelloop.serving.settings import ServingSettings

DOCS_ASSETS_PATH = "/docs/assets"
# Swagger UI and ReDoc as the pinned fastapi-offline package ships them (Swagger UI under the
# Apache License 2.0, ReDoc under MIT): FastAPI's defaults load them from a public CDN, which
# leaves /docs blank on a machine without internet access.
_DOCS_ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "redoc.standalone.js": "text/javascript; charset=utf-8",
    "favicon.png": "image/png",
}


class ServingAPI(FastAPI):
    """FastAPI with the schemas of self-decoding routes in ``components/schemas``.

    The predict, infer, feedback and alert routes read their bodies themselves and document
    them through ``openapi_extra`` (:func:`modelloop.web.openapi_body`); this moves the
    models those entries refer to where OpenAPI looks for them.
    """

    def openapi(self) -> dict[str, Any]:
        """The OpenAPI document, built once."""
        if self.openapi_schema is None:
            document = collect_openapi_schemas(super().openapi())
            # FastAPI documents its 422 for every route with parameters; this app answers
            # validation errors 400 {"error": ...} (rest/errors.py), as both protocols do.
            for path in document.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            components = document["components"]
            for name in ("HTTPValidationError", "ValidationError"):
                components["schemas"].pop(name, None)
            components["securitySchemes"] = {
                ADMIN_SCHEME: {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The server's MODELLOOP_ADMIN_TOKEN; admin routes are off without one.",
                }
            }
            self.openapi_schema = document
        return self.openapi_schema


@functools.cache
def _read_asset(name: str) -> bytes:
    # Read once per process: every app (one per server, many in the tests) serves the same files.
    return (resources.files("fastapi_offline") / "static" / name).read_bytes()


class RestApp(ServingAPI):
    """The app: predict and infer calls enter through the fast path in front of FastAPI (:mod:`.fastpath`).

    Every request enters through ``origins`` (a write from a foreign origin gets 403, see
    :mod:`.origin`), then ``front``; the fast path answers predict and infer calls and hands
    the rest to FastAPI. Without a ``front`` it is plain FastAPI.

    Attributes:
        front: The fast path, set by :func:`create_app`.
        origins: The cross-site write check, set by :func:`create_app`.
    """

    front: PredictFastPath | None = None
    origins: OriginGuard | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuses cross-site writes, then enters through the fast path."""
        origins = self.origins
        if origins is not None and scope["type"] == "http":
            refusal = origins.refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        front = self.front
        if front is None:
            await super().__call__(scope, receive, send)
        else:
            await front(scope, receive, send)


def cors_options(settings: ServingSettings) -> dict[str, Any] | None:
    """The ``CORSMiddleware`` options of the settings, or None when CORS is off."""
    if not settings.cors_origins:
        return None
    return {
        "allow_origins": list(settings.cors_origins),
        "allow_methods": ["GET", "POST"],
        "allow_headers": ["*"],
        # Browsers hide response headers unless listed; clients need these.
        "expose_headers": [REQUEST_ID_HEADER, MODEL_VERSION_HEADER, HEADER_LENGTH],
    }


def create_app(
    dataplane: DataPlane,
    settings: ServingSettings,
    registry: CollectorRegistry,
    *,
    routers: Sequence[APIRouter] = (),
    card_parts: Sequence[StatusCardPart] = (),
    status_sections: Sequence[StatusSection] = (),
) -> FastAPI:
    """Builds the REST application.

    Args:
        dataplane: The data plane every route calls.
        settings: Server settings: ``max_body_bytes``, ``admin_token``, ``cors_origins``.
        registry: The Prometheus registry ``/metrics`` exposes.
        routers: More routes to mount (the extension point). Defaults to none.
        card_parts: Parts of each model's card on the status page. Defaults to none.
        status_sections: Sections below the status page's cards. Defaults to none.

    Returns:
        The FastAPI app, with ``/v1``, ``/v2``, ``/metrics``, ``/docs``, ``/`` and ``routers``;
        predict and infer calls enter through its fast path.
    """
    app = RestApp(
        title=TITLE,
        summary="TF Serving REST API and Open Inference Protocol V2 over one data plane.",
        version=str(dataplane.server_metadata().get("version", "")),
        # Served below from the package's own copies of the assets.
        docs_url=None,
        redoc_url=None,
    )
    install_error_handlers(app)
    app.origins = OriginGuard(settings.cors_origins)
    cors = cors_options(settings)
    if cors is not None:
        app.add_middleware(CORSMiddleware, **cors)
    app.front = PredictFastPath(
        functools.partial(FastAPI.__call__, app),
        dataplane=dataplane,
        max_body_bytes=settings.max_body_bytes,
        cors=cors,
    )
    app.include_router(create_tfserving_router(dataplane, settings))
    app.include_router(create_v2_router(dataplane, settings))
    app.include_router(create_shared_memory_router(dataplane, settings))
    for router in routers:
        app.include_router(router)

    @app.get(
        "/metrics",
        tags=["monitoring"],
        summary="Prometheus metrics",
        response_class=Response,
        responses={
            200: {
                "description": "The Prometheus text exposition format",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            }
        },
    )
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def status_page() -> HTMLResponse:
        return HTMLResponse(render_status_page(dataplane, card_parts, status_sections))

    _add_docs(app)
    return app


def _add_docs(app: FastAPI) -> None:
    """``/docs`` (Swagger UI) and ``/redoc``, with their assets served by the app itself."""
    assets = {name: (_read_asset(name), media) for name, media in _DOCS_ASSETS.items()}

    def root(request: Request) -> str:
        return str(request.scope.get("root_path", "")).rstrip("/")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        prefix = root(request)
        return get_swagger_ui_html(
            openapi_url=f"{prefix}{app.openapi_url}",
            title=f"{TITLE} API",
            swagger_js_url=f"{prefix}{DOCS_ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{prefix}{DOCS_ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{prefix}{DOCS_ASSETS_PATH}/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        prefix = root(request)
        return get_redoc_html(
            openapi_url=f"{prefix}{app.openapi_url}",
            title=f"{TITLE} API",
            redoc_js_url=f"{prefix}{DOCS_ASSETS_PATH}/redoc.standalone.js",
            redoc_favicon_url=f"{prefix}{DOCS_ASSETS_PATH}/favicon.png",
            with_google_fonts=False,
        )

    @app.get(DOCS_ASSETS_PATH + "/{name}", include_in_schema=False)
    async def docs_asset(name: str) -> Response:
        if name not in assets:
            return error_response(f"no documentation asset {name!r}", 404)
        body, media = assets[name]
        # Versioned with the package: a day of caching spares reloads of 1.5 MB.
        return Response(body, media_type=media, headers={"cache-control": "public, max-age=86400"})
