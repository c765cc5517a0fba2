"""Cross-site writes refused: a POST whose ``Origin`` the server does not allow gets 403.

A page on another site can make a browser POST here without asking first: a form, or a
``fetch`` in ``no-cors`` mode, sends ``application/x-www-form-urlencoded`` (or no content
type) with no CORS preflight, and the browser attaches the page's ``Origin``. CORS only hides
the answer from the page; the request would still run, be logged and feed the label join.
So every request that is not a read (any method but GET, HEAD and OPTIONS) and carries an
``Origin`` must come from an origin in ``MODELLOOP_CORS_ORIGINS`` (``*`` allows any) or from
the server's own origin (the ``Host`` it was sent to: ``/docs``' "Try it out"). A request
without ``Origin`` (curl, SDKs, server-side clients, gRPC gateways) passes unchanged.

The guard runs ahead of the predict fast path and of FastAPI (:class:`~.app.RestApp`), so
one check covers every route, the ones other packages mount included.

Example:

```python
guard = OriginGuard(["https://app.example"])
if guard.refusal(scope) is not None: ...
```
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from modelloop.serving.rest.errors import error_response

if TYPE_CHECKING:
    from starlette.responses import Response
    from starlette.types import Scope

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class OriginGuard:
    """Says whether a request is a write from an origin the server does not allow.

    Args:
        allowed: The allowed origins (``MODELLOOP_CORS_ORIGINS``); ``*`` allows every origin.
    """

    def __init__(self, allowed: Iterable[str]) -> None:
        origins = [origin.strip().rstrip("/").lower() for origin in allowed]
        self.any_origin = "*" in origins
        self.allowed = frozenset(origins)

    def refusal(self, scope: Scope) -> Response | None:
        """A 403 for a write from a foreign origin, or None to let the request through."""
        if scope["method"] in READ_METHODS or self.any_origin:
            return None
        origin = host = None
        for key, value in scope["headers"]:
            if key == b"origin":
                origin = value
            elif key == b"host":
                host = value
        if origin is None:
            return None
        text = origin.decode("latin-1").strip().rstrip("/").lower()
        if text in self.allowed or (host is not None and _authority(text) == host.decode("latin-1").lower()):
            return None
        return error_response(
            f"cross-origin {scope['method']} from {text[:200]!r} refused: the origin is not in "
            "MODELLOOP_CORS_ORIGINS",
            403,
        )


def _authority(origin: str) -> str | None:
    """``host[:port]`` of an ``http`` or ``https`` origin; None for ``null`` and other schemes."""
    for scheme in ("http://", "https://"):
        if origin.startswith(scheme):
            return origin[len(scheme) :]
    return None
