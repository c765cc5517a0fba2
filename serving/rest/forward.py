"""Routes a server forwards to its control plane, so clients keep calling the address they know.

With ``--control-plane URL`` the server does not analyse its traffic: the control plane
(``modelloop monitor``) does. Labels still go to the server's REST port (applications
already call it), and so do the monitoring routes; this router passes each such request on
to the control plane and its answer back, status, body and content type unchanged.

Before a label is forwarded, ``before_feedback`` runs (the server's prediction logger
writes what it holds), so a label posted right after its prediction finds it logged.

A control plane that cannot be reached is a 503 that names it; nothing is retried here
(a label is acknowledged only by the control plane's commit).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
from fastapi import APIRouter, Request, Response

from modelloop.errors import ErrorCode, ServiceError

# Headers a forwarded request keeps: what the control plane's routes read.
_FORWARDED = ("authorization", "content-type", "content-encoding", "x-request-id", "accept")
_TIMEOUT_S = 30.0


def create_forward_router(
    url: str, *, before_feedback: Callable[[float], bool] | None = None, max_body_bytes: int
) -> APIRouter:
    """The feedback and monitoring routes, forwarded to the control plane at ``url``.

    Args:
        url: The control plane's base URL (``http://host:8502``).
        before_feedback: Called with a timeout before a label is forwarded. Defaults to None.
        max_body_bytes: The body limit.

    Returns:
        A router to mount on the REST app.
    """
    from modelloop.web import read_body

    base = url.rstrip("/")
    router = APIRouter(tags=["monitoring"])
    client: dict[str, httpx.AsyncClient] = {}

    def _client() -> httpx.AsyncClient:
        # One pooled client per event loop (the server runs one).
        if "c" not in client:
            client["c"] = httpx.AsyncClient(timeout=_TIMEOUT_S)
        return client["c"]

    async def forward(request: Request, path: str, body: bytes | None = None) -> Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARDED}
        target = f"{base}{path}"
        if request.url.query:
            target += f"?{request.url.query}"
        try:
            answer = await _client().request(request.method, target, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise ServiceError(
                f"the control plane at {base} cannot be reached ({type(exc).__name__}); try again",
                ErrorCode.UNAVAILABLE,
            ) from None
        media = answer.headers.get("content-type", "application/json")
        return Response(answer.content, status_code=answer.status_code, media_type=media)

    @router.post("/v1/models/{name}/feedback", summary="Labels (forwarded to the control plane)")
    async def feedback(name: str, request: Request) -> Response:
        body = await read_body(request, max_body_bytes)
        if before_feedback is not None:
            await asyncio.to_thread(before_feedback, 5.0)
        return await forward(request, f"/v1/models/{name}/feedback", body)

    @router.get("/v1/models/{name}/feedback/sources", summary="Labeler sources (forwarded)")
    async def sources(name: str, request: Request) -> Response:
        return await forward(request, f"/v1/models/{name}/feedback/sources")

    @router.post("/monitoring/alerts", summary="Alertmanager webhook (forwarded to the control plane)")
    async def alerts(request: Request) -> Response:
        return await forward(request, "/monitoring/alerts", await read_body(request, max_body_bytes))

    @router.get("/monitoring/models/{name}/history", summary="A model's history (forwarded)")
    async def history(name: str, request: Request) -> Response:
        return await forward(request, f"/monitoring/models/{name}/history")

    @router.get("/monitoring/health", summary="The health section (forwarded)")
    async def health(request: Request) -> Response:
        return await forward(request, "/monitoring/health")

    return router
