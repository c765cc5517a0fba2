"""Bearer-token check of the admin routes (repository load/unload, the alert webhook)."""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

from fastapi import Request

from modelloop.errors import ErrorCode
from modelloop.serving.errors import ServingError, Unauthenticated

if TYPE_CHECKING:
    from modelloop.serving.settings import ServingSettings


def require_admin(request: Request, settings: ServingSettings) -> None:
    """Lets the request through only with ``Authorization: Bearer <admin token>``.

    Args:
        request: The HTTP request.
        settings: Server settings; ``admin_token`` None or empty turns admin routes off.

    Raises:
        ServingError: PERMISSION_DENIED (403) when no admin token is configured.
        Unauthenticated: (401) when the header is missing or the token is wrong.
    """
    token = settings.admin_token.get_secret_value() if settings.admin_token is not None else ""
    if not token:
        raise ServingError(
            "admin routes are disabled: set MODELLOOP_ADMIN_TOKEN", ErrorCode.PERMISSION_DENIED
        )
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    # compare_digest takes as long for a near miss as for a wild guess: no timing oracle.
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise Unauthenticated("missing or wrong bearer token (Authorization: Bearer <admin token>)")
