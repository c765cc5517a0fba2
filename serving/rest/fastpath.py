"""The REST hot path: ``POST ...:predict`` and ``POST .../infer`` answered in front of FastAPI.

FastAPI's own ``__call__`` checks its telemetry switch, runs its middleware stack (error,
telemetry and exception middleware, an exit stack), walks its route list with a regular
expression each and solves the endpoint's dependencies: on one core that is several times
what the bare ASGI server costs per request. These two routes carry nearly all the
traffic, so :class:`PredictFastPath` matches their paths with string splits, ahead of all
of that, and calls the very handlers the FastAPI routes call
(:func:`~.routes_tfserving.answer_predict`, :func:`~.routes_v2.answer_infer`, with the
same decoders), so both ways in give the same answers. Every other request, and any path
this matcher does not recognise exactly, goes on to FastAPI, which keeps the
documentation, the OpenAPI entries of these routes (their declarations stay where they
are) and every other route. With CORS configured, the answered calls get the same CORS
headers as the app's routes.

Example:

```python
front = PredictFastPath(fastapi_call, dataplane=dataplane, max_body_bytes=settings.max_body_bytes)
await front(scope, receive, send)
```
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect

from modelloop.serving.rest.errors import error_response
from modelloop.serving.rest.routes_tfserving import PredictDecoder, answer_predict
from modelloop.serving.rest.routes_v2 import InferDecoder, answer_infer

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

    from modelloop.serving.dataplane import DataPlane

logger = logging.getLogger(__name__)

_ROUTE = "modelloop.route"  # the scope key the match is handed on under
_PREDICT, _INFER = 1, 2


def match_route(path: str) -> tuple[int, str, str | None, str | None] | None:
    """Recognises the paths of the predict and infer routes, as Starlette would route them.

    Args:
        path: The request path (percent-decoded, as in the ASGI scope).

    Returns:
        ``(kind, a, b, c)``, or None for any other path: for ``:predict`` the last
        segment, the model (or None) and ``"version"``/``"label"`` (or None); for
        ``/infer`` the model, the version (or None) and None.

    Example:

    >>> match_route("/v1/models/digits/labels/stable:predict")
    (1, 'stable:predict', 'digits', 'label')
    """
    if path.startswith("/v1/models/"):
        parts = path[11:].split("/")
        # {model_method} and {model}/versions|labels/{x_method}, as Starlette's [^/]+ params.
        if len(parts) == 1 and parts[0]:
            return _PREDICT, parts[0], None, None
        if len(parts) == 3 and parts[1] in ("versions", "labels") and parts[0] and parts[2]:
            return _PREDICT, parts[2], parts[0], "version" if parts[1] == "versions" else "label"
        return None
    if path.startswith("/v2/models/") and path.endswith("/infer"):
        parts = path[11:-6].split("/")
        if len(parts) == 1 and parts[0]:
            return _INFER, parts[0], None, None
        if len(parts) == 3 and parts[1] == "versions" and parts[0] and parts[2]:
            return _INFER, parts[0], parts[2], None
    return None


class AsgiRequest:
    """The request as the predict and infer handlers read it, straight from ASGI.

    Starlette's ``Request`` builds a ``Headers`` object whose every lookup walks the raw
    header list and decodes it again, and reads the body through a state machine of its
    own; the handlers read four headers and the body once. Here the headers become one
    dict (the first of a repeated header wins, as Starlette's ``get`` has it) and the body
    comes from ``receive`` as it arrives.

    Args:
        scope: The ASGI scope.
        receive: The ASGI receive callable.
    """

    __slots__ = ("_receive", "headers", "scope")

    def __init__(self, scope: Scope, receive: Receive) -> None:
        self.scope = scope
        self._receive = receive
        headers: dict[str, str] = {}
        for key, value in scope["headers"]:
            name = key.decode("latin-1")
            if name not in headers:
                headers[name] = value.decode("latin-1")
        self.headers = headers

    async def stream(self) -> AsyncIterator[bytes]:
        """Yields the body's pieces.

        Raises:
            ClientDisconnect: The client went away before the body was complete.
        """
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            body = message.get("body", b"")
            if body:
                yield body
            if not message.get("more_body", False):
                return


class PredictFastPath:
    """An ASGI app that answers predict and infer calls and hands everything else to ``app``.

    Args:
        app: Where every other request goes (FastAPI's own ``__call__``).
        dataplane: The data plane.
        max_body_bytes: The body limit of the decoders.
        cors: ``CORSMiddleware`` options for the answered calls, or None without CORS.
            Defaults to None.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        dataplane: DataPlane,
        max_body_bytes: int,
        cors: Mapping[str, Any] | None = None,
    ) -> None:
        self.app = app
        self.dataplane = dataplane
        self.max_body_bytes = max_body_bytes
        self._answer_app: ASGIApp = self._answer if cors is None else CORSMiddleware(self._answer, **cors)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answers a predict or infer call, or passes the request on to the app."""
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            route = match_route(scope["path"])
            if route is not None:
                scope[_ROUTE] = route
                await self._answer_app(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _answer(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind, a, b, c = scope[_ROUTE]
        request = AsgiRequest(scope, receive)
        try:
            if kind == _PREDICT:
                decoder = PredictDecoder(request, a, b, c, self.max_body_bytes)
                response = await answer_predict(self.dataplane, request, decoder)
            else:
                infer = InferDecoder(request, a, b, self.max_body_bytes, self.dataplane.shared_memory)
                response = await answer_infer(self.dataplane, request, infer)
        except Exception:
            # The same answer FastAPI's catch-all handler gives: logged, no internals.
            logger.exception("unhandled error on POST %s", scope["path"])
            response = error_response("internal server error", 500)
        await response(scope, receive, send)
