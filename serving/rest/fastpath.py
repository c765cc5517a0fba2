"""The REST hot path: ``POST ...:predict`` and ``POST .../infer`` answered in front of FastAPI.

FastAPI's routing walks its route list with a regular expression each, solves the
endpoint's dependencies and wraps the call in exception middleware, an exit stack and a
sub-request; on one core that costs several times what the bare ASGI server does per
request. These two routes carry nearly all the traffic, so this ASGI middleware matches
their paths with string splits and calls the very handlers the FastAPI routes call
(:func:`~.routes_tfserving.answer_predict`, :func:`~.routes_v2.answer_infer`, with the
same decoders), so both ways in give the same answers. Every other request, and any
path this matcher does not recognise exactly, goes on to FastAPI, which keeps the
documentation, the OpenAPI entries of these routes (their declarations stay where they
are) and every other route.

It is installed inside CORS (so CORS headers still apply) and inside Starlette's
server-error middleware.

Example:

```python
app.add_middleware(PredictFastPath, dataplane=dataplane, max_body_bytes=settings.max_body_bytes)
```
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from starlette.requests import Request

from modelloop.serving.rest.errors import error_response
from modelloop.serving.rest.routes_tfserving import PredictDecoder, answer_predict
from modelloop.serving.rest.routes_v2 import InferDecoder, answer_infer

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from typing import Any

    from starlette.responses import Response
    from starlette.types import ASGIApp, Receive, Scope, Send

    from modelloop.serving.dataplane import DataPlane

    _Handler = Callable[[DataPlane, Request, Any], Awaitable[Response]]

logger = logging.getLogger(__name__)


class PredictFastPath:
    """ASGI middleware that serves the predict and infer routes without FastAPI's routing.

    Args:
        app: The application every other request goes to.
        dataplane: The data plane.
        max_body_bytes: The body limit of the decoders.
    """

    def __init__(self, app: ASGIApp, *, dataplane: DataPlane, max_body_bytes: int) -> None:
        self.app = app
        self.dataplane = dataplane
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answers a predict or infer call, or passes the request on to the app."""
        if scope["type"] != "http" or scope["method"] != "POST" or scope.get("root_path"):
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path.startswith("/v1/models/"):
            parts = path[11:].split("/")
            # The three /v1 predict routes: {model_method}, {model}/versions|labels/{x_method}.
            if len(parts) == 1 and parts[0]:
                request = Request(scope, receive)
                decoder = PredictDecoder(request, parts[0], None, None, self.max_body_bytes)
            elif len(parts) == 3 and parts[1] in ("versions", "labels") and parts[0] and parts[2]:
                pinned = "version" if parts[1] == "versions" else "label"
                request = Request(scope, receive)
                decoder = PredictDecoder(request, parts[2], parts[0], pinned, self.max_body_bytes)
            else:
                await self.app(scope, receive, send)
                return
            await self._answer(answer_predict, request, decoder, scope, send)
            return
        if path.startswith("/v2/models/") and path.endswith("/infer"):
            parts = path[11:-6].split("/")
            # /v2/models/{model}/infer and /v2/models/{model}/versions/{version}/infer.
            if len(parts) == 1 and parts[0]:
                request = Request(scope, receive)
                infer = InferDecoder(request, parts[0], None, self.max_body_bytes)
            elif len(parts) == 3 and parts[1] == "versions" and parts[0] and parts[2]:
                request = Request(scope, receive)
                infer = InferDecoder(request, parts[0], parts[2], self.max_body_bytes)
            else:
                await self.app(scope, receive, send)
                return
            await self._answer(answer_infer, request, infer, scope, send)
            return
        await self.app(scope, receive, send)

    async def _answer(
        self,
        handler: _Handler,
        request: Request,
        decoder: PredictDecoder | InferDecoder,
        scope: Scope,
        send: Send,
    ) -> None:
        try:
            response = await handler(self.dataplane, request, decoder)
        except Exception:
            # The same answer FastAPI's catch-all handler gives: logged, no internals.
            logger.exception("unhandled error on POST %s", scope["path"])
            response = error_response("internal server error", 500)
        await response(scope, request.receive, send)
