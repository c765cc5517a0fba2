"""Serving errors, each with a neutral :class:`~modelloop.errors.ErrorCode`.

The core raises these; only ``rest/errors.py`` and ``grpc/errors.py`` map the code to
an HTTP status or a gRPC status code. The core never imports FastAPI or grpc.
"""

from __future__ import annotations

from modelloop.errors import ErrorCode, ServiceError


class ServingError(ServiceError):
    """Base of every error the serving core raises on purpose."""


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
