"""HTTP plumbing every REST surface shares: content types, the body limit, the admin and labeler
tokens, and the OpenAPI entries of routes that read their own bodies.

Serving's routes and monitoring's routes (feedback, the alert webhook) both read bodies
the same way, so the helpers live here, in a leaf module that imports nothing of the
project but the leaves :mod:`modelloop.errors` and :mod:`modelloop.tokens`. Every failure is a
:class:`~modelloop.errors.ServiceError`; the REST app maps it to a status.
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator, Mapping, Sequence
from http import HTTPStatus
from typing import Any, Protocol

from fastapi import Request
from pydantic import BaseModel
from starlette.requests import ClientDisconnect

from modelloop.errors import ErrorCode, ServiceError
from modelloop.tokens import ANONYMOUS_SOURCE, TokenMatcher, authorize_admin, bearer_token


class HttpRequest(Protocol):
    """What the body helpers and the predict and infer handlers read of a request.

    Starlette's ``Request`` is one; the REST fast path passes a leaner one that builds no
    ``Headers`` object and reads the body straight from ASGI ``receive``
    (``serving/rest/fastpath.py`` ``AsgiRequest``). Header names are lower case.
    """

    @property
    def scope(self) -> Any:
        """The ASGI scope."""
        ...

    @property
    def headers(self) -> Mapping[str, str]:
        """The request headers, looked up by lower-case name."""
        ...

    def stream(self) -> AsyncIterator[bytes]:
        """The body's pieces as they arrive."""
        ...


REQUEST_ID_HEADER = "x-request-id"
MODEL_VERSION_HEADER = "x-model-version"
"""The version that answered, on every REST response a model answered (it may be a rollout's candidate)."""

# `curl -d` sends application/x-www-form-urlencoded, and TF Serving's own REST examples use
# `curl -d '{"instances": ...}'`; TF Serving ignores the content type, so predict and infer
# take it as JSON (`form=True`). Browsers send it cross-site without a preflight, so the
# other routes (feedback, alerts, admin) refuse it; the REST app refuses cross-site writes
# anyway (serving/rest/origin.py).
FORM_MEDIA_TYPE = "application/x-www-form-urlencoded"
BINARY_MEDIA_TYPE = "application/octet-stream"
# zlib wbits: gzip wrapper and zlib wrapper (HTTP "deflate" is zlib-wrapped, RFC 9110 8.4.1.2).
_DECODERS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def check_content_type(request: HttpRequest, *, binary: bool = False, form: bool = False) -> bool:
    """Accepts JSON bodies (and, when ``binary``, the octet-stream of Triton's extension).

    A missing content type is accepted: tritonclient and many scripts send none.

    Args:
        request: The HTTP request.
        binary: Whether ``application/octet-stream`` is allowed. Defaults to False.
        form: Whether ``application/x-www-form-urlencoded`` is read as JSON (``curl -d``,
            for predict and infer only). Defaults to False.

    Returns:
        Whether the body was declared binary.

    Raises:
        ServiceError: UNSUPPORTED_MEDIA_TYPE for any other content type.
    """
    raw = request.headers.get("content-type")
    if raw is None:
        return False
    media = raw.split(";", 1)[0].strip().lower()
    if not media or media == "application/json" or media.endswith("+json"):
        return False
    if form and media == FORM_MEDIA_TYPE:
        return False
    if binary and media == BINARY_MEDIA_TYPE:
        return True
    accepted = "application/json" + (f" or {BINARY_MEDIA_TYPE}" if binary else "")
    raise ServiceError(
        f"unsupported content type {media!r}; send {accepted}", ErrorCode.UNSUPPORTED_MEDIA_TYPE
    )


def _too_large(limit: int, what: str = "request body") -> ServiceError:
    return ServiceError(
        f"{what} is larger than the limit of {limit} bytes (max_body_bytes)", ErrorCode.PAYLOAD_TOO_LARGE
    )


async def read_body(request: HttpRequest, limit: int) -> bytes:
    """Reads the body, refusing it as soon as it is known to exceed ``limit``.

    ``Content-Length`` is checked before reading; a chunked body is counted while it
    streams in, so an oversized upload is never held in memory whole. A gzip or deflate
    ``Content-Encoding`` (tritonclient's request compression) is undone, and the
    decompressed size is held to the same limit.

    Args:
        request: The HTTP request.
        limit: The most bytes accepted.

    Returns:
        The body, decompressed.

    Raises:
        ServiceError: PAYLOAD_TOO_LARGE beyond the limit, INVALID_ARGUMENT for a bad
            Content-Length or a corrupt compressed body, UNSUPPORTED_MEDIA_TYPE for an
            unknown Content-Encoding, CANCELLED when the client went away mid-body.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ServiceError(f"invalid Content-Length {declared!r}", ErrorCode.INVALID_ARGUMENT)
        if int(declared) > limit:
            raise _too_large(limit)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", "") and encoding not in _DECODERS:
        raise ServiceError(
            f"unsupported Content-Encoding {encoding!r}; use gzip, deflate or none",
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
        )
    chunks: list[bytes] = []
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise _too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect:
        # Nobody is left to answer; counted as cancelled, not as a failure of the model.
        raise ServiceError(
            "the client closed the connection before the request body was complete", ErrorCode.CANCELLED
        ) from None
    body = b"".join(chunks)
    if encoding in _DECODERS:
        body = _decompress(body, _DECODERS[encoding], limit)
    return body


def _decompress(body: bytes, wbits: int, limit: int) -> bytes:
    decoder = zlib.decompressobj(wbits)
    try:
        # max_length bounds the output, so a small "zip bomb" cannot exhaust memory.
        out = decoder.decompress(body, limit + 1)
        if len(out) > limit or decoder.unconsumed_tail:
            raise _too_large(limit, "decompressed request body")
        out += decoder.flush()
    except zlib.error as error:
        raise ServiceError(f"corrupt compressed request body: {error}", ErrorCode.INVALID_ARGUMENT) from None
    if len(out) > limit:
        raise _too_large(limit, "decompressed request body")
    return out


def require_admin(request: Request, token: str | None) -> None:
    """Lets the request through only with ``Authorization: Bearer <admin token>``.

    The REST face of :func:`modelloop.tokens.authorize_admin`, the check gRPC calls too.

    Args:
        request: The HTTP request.
        token: The admin token; None turns admin routes off.

    Raises:
        ServiceError: PERMISSION_DENIED (403) when no admin token is configured,
            UNAUTHENTICATED (401) when the header is missing or the token is wrong.
    """
    authorize_admin(request.headers.get("authorization"), token)


def require_labeler(request: Request, labelers: TokenMatcher) -> str:
    """Authenticates a labeler by its bearer token and returns its source name.

    Without configured labeler tokens every request passes as the source ``anonymous``
    (the server warns about that at start). The admin token is not a labeler token unless
    it is also configured as one.

    Args:
        request: The HTTP request.
        labelers: The configured labeler tokens.

    Returns:
        The source the token belongs to, or ``anonymous`` when none is configured.

    Raises:
        ServiceError: UNAUTHENTICATED (401) without a bearer token, PERMISSION_DENIED
            (403) with a token that is no labeler's. The token is matched in constant time.
    """
    if not labelers:
        return ANONYMOUS_SOURCE
    token = bearer_token(request.headers.get("authorization"))
    if token is None:
        raise ServiceError(
            "feedback needs a labeler token: Authorization: Bearer <token>", ErrorCode.UNAUTHENTICATED
        )
    source = labelers.match(token)
    if source is None:
        raise ServiceError("the bearer token is not a labeler token", ErrorCode.PERMISSION_DENIED)
    return source


def require_admin_or_labeler(request: Request, admin_token: str | None, labelers: TokenMatcher) -> None:
    """Lets through the admin or any labeler: what labelers' names are is theirs to read.

    Without any configured token (no admin token, no labeler tokens) every label's source
    is ``anonymous`` and there is nothing to authenticate against, so every caller passes.

    Args:
        request: The HTTP request.
        admin_token: The admin token; None when not configured.
        labelers: The configured labeler tokens.

    Raises:
        ServiceError: UNAUTHENTICATED (401) without a bearer token, PERMISSION_DENIED (403)
            with a token that is neither the admin's nor a labeler's.
    """
    if not admin_token and not labelers:
        return
    token = bearer_token(request.headers.get("authorization"))
    if token is None:
        raise ServiceError(
            "this route needs the admin token or a labeler token: Authorization: Bearer <token>",
            ErrorCode.UNAUTHENTICATED,
        )
    if labelers and labelers.match(token) is not None:
        return
    try:
        authorize_admin(request.headers.get("authorization"), admin_token)
    except ServiceError:
        raise ServiceError(
            "the bearer token is neither the admin token nor a labeler token", ErrorCode.PERMISSION_DENIED
        ) from None


# Routes that read their own bodies (see `openapi_body`) carry the JSON schemas of their models
# under this operation key; `collect_openapi_schemas` moves them to `components/schemas`.
OPENAPI_SCHEMAS_KEY = "x-modelloop-schemas"
# ... and the examples of their path parameters, which `collect_openapi_schemas` puts in place.
OPENAPI_PATH_EXAMPLES_KEY = "x-modelloop-path-examples"
_REF_TEMPLATE = "#/components/schemas/{model}"
# The security scheme of the admin routes (`require_admin`), for /docs' "Authorize" button.
ADMIN_SCHEME = "adminToken"
ADMIN_SECURITY: dict[str, Any] = {"security": [{ADMIN_SCHEME: []}]}


def schema_ref(model: type[BaseModel]) -> dict[str, str]:
    """A ``$ref`` to a model's entry in ``components/schemas``."""
    return {"$ref": _REF_TEMPLATE.format(model=model.__name__)}


def _component_schemas(models: Sequence[type[BaseModel]]) -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    for model in models:
        schema = model.model_json_schema(ref_template=_REF_TEMPLATE)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return schemas


def openapi_body(
    models: Sequence[type[BaseModel]],
    *,
    description: str,
    examples: Mapping[str, Any],
    binary_description: str | None = None,
    headers: Mapping[str, str] | None = None,
    components: Sequence[type[BaseModel]] = (),
    required: bool = True,
    path_examples: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The ``openapi_extra`` of a route that documents a JSON body it decodes itself.

    A pydantic body parameter would make FastAPI parse and validate every request before
    the handler's own decoder reads it again; this documents the body and leaves the
    handler alone.

    Args:
        models: The body's schema: one model, or several the body may match (``anyOf``).
        description: What the body is.
        examples: OpenAPI example objects by name (``{"summary": ..., "value": ...}``).
        binary_description: When set, ``application/octet-stream`` is documented too,
            with this description. Defaults to None.
        headers: Optional request headers (name to description) the route reads.
            Defaults to None.
        components: More models to publish in ``components/schemas`` (response models
            that ``responses`` refers to with :func:`schema_ref`). Defaults to none.
        required: Whether a body must be sent. Defaults to True.
        path_examples: Example values of path parameters, so that /docs' "Try it out"
            starts from a request that works; names the route lacks are ignored.
            Defaults to None.

    Returns:
        The dict for the route decorator's ``openapi_extra``.

    Example:

    ```python
    @router.post("/v1/models/{name}/feedback", openapi_extra=openapi_body([Feedback], ...))
    ```
    """
    refs = [schema_ref(model) for model in models]
    schema = refs[0] if len(refs) == 1 else {"anyOf": refs}
    content: dict[str, Any] = {"application/json": {"schema": schema, "examples": dict(examples)}}
    if binary_description is not None:
        content["application/octet-stream"] = {
            "schema": {"type": "string", "format": "binary", "description": binary_description}
        }
    extra: dict[str, Any] = {
        "requestBody": {"required": required, "description": description, "content": content},
        OPENAPI_SCHEMAS_KEY: _component_schemas([*models, *components]),
    }
    if path_examples:
        extra[OPENAPI_PATH_EXAMPLES_KEY] = dict(path_examples)
    if headers:
        extra["parameters"] = [
            {
                "name": name,
                "in": "header",
                "required": False,
                "description": text,
                "schema": {"type": "string"},
            }
            for name, text in headers.items()
        ]
    return extra


def error_responses(model: type[BaseModel], *codes: int, **why: str) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` entries of the error statuses a route answers, all with ``model``.

    Args:
        model: The error body's model.
        *codes: The HTTP statuses.
        **why: A description per status, keyed ``s400`` etc.; the status phrase otherwise.

    Returns:
        A dict to merge into the route decorator's ``responses``.
    """
    return {
        code: {"model": model, "description": why.get(f"s{code}", HTTPStatus(code).phrase)} for code in codes
    }


def collect_openapi_schemas(openapi: dict[str, Any]) -> dict[str, Any]:
    """Moves the schemas :func:`openapi_body` put on operations into ``components/schemas``, and
    sets the examples of their path parameters.

    Args:
        openapi: The document FastAPI generated; changed in place.

    Returns:
        The same document.
    """
    schemas = openapi.setdefault("components", {}).setdefault("schemas", {})
    for path in openapi.get("paths", {}).values():
        for operation in path.values():
            if not isinstance(operation, dict):
                continue
            schemas.update(operation.pop(OPENAPI_SCHEMAS_KEY, {}))
            examples = operation.pop(OPENAPI_PATH_EXAMPLES_KEY, {})
            for parameter in operation.get("parameters", []):
                if parameter.get("in") == "path" and parameter.get("name") in examples:
                    parameter["example"] = examples[parameter["name"]]
    return openapi
