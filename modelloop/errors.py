"""Errors every package shares: the one-line user error and the neutral error codes.

``ModelloopError`` is what the offline tools (train, export, retrain) raise for a user's
mistake. ``ServiceError`` is what the services (serving, monitoring) raise on purpose: it
carries a neutral :class:`ErrorCode`, and only the edges map that code to a status, one
table each (``serving/rest/errors.py`` to HTTP, ``serving/grpc/errors.py`` to gRPC). This
module imports nothing of the project, so every package may import it.
"""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path


class ModelloopError(Exception):
    """A failure caused by the user's input, reported in one line without a traceback.

    The CLI catches it, prints ``modelloop: error: <message>`` and exits non-zero.
    """


class ErrorCode(Enum):
    """Neutral error codes, named after the canonical gRPC/absl status codes."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    UNAVAILABLE = "UNAVAILABLE"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    CANCELLED = "CANCELLED"
    PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
    UNSUPPORTED_MEDIA_TYPE = "UNSUPPORTED_MEDIA_TYPE"
    INTERNAL = "INTERNAL"


class ServiceError(Exception):
    """Base of every error a service raises on purpose; the edges map its code.

    Attributes:
        code: The neutral code the edges map to a status.
        message: A message that names the problem, safe to show to clients.
        request_id: The id of the request that failed, when the data plane knew it, so
            that the edge can send it back with the error. Defaults to "".
    """

    code: ErrorCode = ErrorCode.INTERNAL
    request_id: str = ""

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message


# `scheme://user:password@host` (and `scheme://token@host`): the part before `@` goes.
_URL_CREDENTIALS = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@'\"]+@")
# An absolute path of two or more segments that is not part of a URL (no word character,
# `:`, `/` or `.` before it): only its last segment stays.
_HOST_PATH = re.compile(r"(?<![\w:/.~-])/(?:[^/\s'\"():,;]+/)+([^/\s'\"():,;]+)")


def hide_credentials(text: str) -> str:
    """``text`` with every URL's user and password replaced by ``***`` (for logs too)."""
    return _URL_CREDENTIALS.sub(r"\1***@", text)


def redact(text: str, root: str | Path | None = None) -> str:
    """A message fit for any caller: no credentials, no host paths.

    Load and repository errors quote file paths (``/srv/models/other/2/model.onnx``) and
    endpoint URLs (``http://user:secret@minio:9000``); the server's log keeps them whole,
    answers get this. A path under ``root`` becomes relative to it (``other/2/model.onnx``);
    any other absolute path becomes ``…/<last segment>``; a URL's user and password become
    ``***``.

    Args:
        text: The message.
        root: The model repository, whose paths are shown relative to it. Defaults to None.

    Returns:
        The message without credentials and host paths.

    Example:

    >>> redact("no file /srv/models/a/1/model.onnx at http://u:p@minio:9000", "/srv/models")
    'no file a/1/model.onnx at http://***@minio:9000'
    """
    text = hide_credentials(text)
    if root is not None:
        prefix = str(root).rstrip("/") + "/"
        if len(prefix) > 1:
            text = text.replace(prefix, "")
    return _HOST_PATH.sub(r"…/\1", text)
