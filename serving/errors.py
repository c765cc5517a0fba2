"""Serving errors with a transport-neutral code.

The core raises these; only ``rest/errors.py`` and ``grpc/errors.py`` map the code to
an HTTP status or a gRPC status code. The core never imports FastAPI or grpc.
"""

from __future__ import annotations

from enum import Enum


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


class ServingError(Exception):
    """Base of every error the serving core raises on purpose.

    Attributes:
        code: The neutral code the edges map to a status.
        message: A message that names the problem, safe to show to clients.
    """

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message


class InvalidInput(ServingError):
    """The request is malformed or does not match the model's inputs."""

    code = ErrorCode.INVALID_ARGUMENT


class ModelNotFound(ServingError):
    """No such model, version, label or signature."""

    code = ErrorCode.NOT_FOUND


class ModelNotReady(ServingError):
    """The model exists but no version of it can serve right now."""

    code = ErrorCode.UNAVAILABLE


class QueueFull(ServingError):
    """The batch queue of a model version is full; the request is turned away."""

    code = ErrorCode.RESOURCE_EXHAUSTED


class Unimplemented(ServingError):
    """The method exists in the protocol but this server does not implement it."""

    code = ErrorCode.UNIMPLEMENTED


class Unauthenticated(ServingError):
    """An admin route was called without a valid bearer token."""

    code = ErrorCode.UNAUTHENTICATED


class InferenceFailed(ServingError):
    """The runtime failed on a request that passed validation."""

    code = ErrorCode.INTERNAL
