"""Bearer tokens: reading them from files, checking their configuration, matching them in constant time.

The admin token and the labelers' feedback tokens are configured the same way: in an
environment variable, or in a file that a variable names (``..._FILE``, for Kubernetes
Secrets and Docker secrets). This module turns that configuration into a
:class:`TokenMatcher` once, at start-up, and every request is matched against it;
:func:`authorize_admin` is the one admin check both edges (REST and gRPC) call. It is a
leaf: it imports only :mod:`modelloop.errors`, so settings of every package may use it.

Example:

```python
tokens = parse_token_map('{"labeling-team": "s3cret-1", "qa": "s3cret-2"}', "MODELLOOP_FEEDBACK_TOKENS")
matcher = TokenMatcher(tokens)
matcher.match("s3cret-2")  # 'qa'
matcher.match("guess")  # None
```
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from pathlib import Path

from modelloop.errors import ErrorCode, ServiceError

ANONYMOUS_SOURCE = "anonymous"
"""The source of labels that arrive without authentication (no labeler token configured)."""
DEFAULT_SOURCE = "default"
"""The source that ``MODELLOOP_FEEDBACK_TOKEN`` (one token, no name) authenticates."""

# Source names become Prometheus label values, JSON keys and log words: keep them plain.
_SOURCE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# A bearer token travels in an HTTP header: visible ASCII, no spaces (RFC 9110 field values,
# RFC 6750 b64token is stricter still).
_TOKEN = re.compile(r"^[\x21-\x7e]+$")


def read_token_file(path: Path, what: str) -> str:
    """Reads a secret from a file (a mounted Kubernetes Secret, a Docker secret).

    Surrounding whitespace, such as the newline that ``echo`` leaves, is removed.

    Args:
        path: The file.
        what: The setting that names the file, for the message.

    Returns:
        The file's text, stripped.

    Raises:
        ValueError: The file cannot be read, is not UTF-8, or holds only whitespace. The
            message never contains the file's content.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {str(path)!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{what}: {str(path)!r} is not UTF-8 text") from None
    secret = text.strip()
    if not secret:
        raise ValueError(f"{what}: {str(path)!r} is empty")
    return secret


def check_token(token: str, what: str) -> str:
    """Checks that a token can be sent as ``Authorization: Bearer <token>``.

    Args:
        token: The token.
        what: Where it was configured, for the message.

    Returns:
        The token.

    Raises:
        ValueError: It is empty or holds spaces or characters outside visible ASCII (the
            message never contains the token).
    """
    if not token:
        raise ValueError(f"{what}: the token is empty")
    if not _TOKEN.match(token):
        raise ValueError(f"{what}: a token must be visible ASCII without spaces")
    return token


def check_source(name: object, what: str) -> str:
    """Checks a labeler source name.

    Raises:
        ValueError: Not 1..64 characters of ``[A-Za-z0-9_.-]`` starting with a letter or
            digit, or the reserved name ``anonymous``.
    """
    if not isinstance(name, str) or not _SOURCE.match(name):
        raise ValueError(f"{what}: source name {name!r} must be 1..64 characters of [A-Za-z0-9_.-]")
    if name == ANONYMOUS_SOURCE:
        reserved = f"the source name {ANONYMOUS_SOURCE!r} is reserved for unauthenticated feedback"
        raise ValueError(f"{what}: {reserved}")
    return name


def parse_token_map(text: str, what: str) -> dict[str, str]:
    """Parses a JSON object that maps labeler source names to their tokens.

    Args:
        text: ``{"source": "token", ...}``.
        what: The variable or file it came from, for messages.

    Returns:
        Source -> token.

    Raises:
        ValueError: Not JSON, not an object of strings, an empty object, a bad source
            name or an empty or malformed token. Messages name the source, never a token.
    """
    try:
        data = json.loads(text)
    except ValueError:
        raise ValueError(f'{what}: not JSON; expected an object {{"source": "token", ...}}') from None
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ValueError(f'{what}: expected a JSON object {{"source": "token", ...}}, got {kind}')
    if not data:
        raise ValueError(f"{what}: the object names no source")
    tokens: dict[str, str] = {}
    for name, token in data.items():
        check_source(name, what)
        if not isinstance(token, str):
            kind = type(token).__name__
            raise ValueError(f"{what}: the token of source {name!r} must be a string, got {kind}")
        tokens[name] = check_token(token, f"{what}: source {name!r}")
    return tokens


def merge_token_maps(*maps: Mapping[str, str]) -> dict[str, str]:
    """Merges source -> token maps, refusing a source named twice or a token shared by two sources.

    A shared token could not tell its sources apart, so it would make labels unattributable.

    Raises:
        ValueError: A source appears in two maps, or two sources share a token.
    """
    merged: dict[str, str] = {}
    for tokens in maps:
        for name, token in tokens.items():
            if name in merged:
                raise ValueError(f"labeler source {name!r} is configured twice")
            merged[name] = token
    owners: dict[str, str] = {}
    for name, token in merged.items():
        other = owners.setdefault(_digest(token).hex(), name)
        if other != name:
            raise ValueError(f"labeler sources {other!r} and {name!r} share a token; give each its own")
    return merged


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None when there is none.

    The scheme is case-insensitive (RFC 9110 section 11.1).
    """
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


class TokenMatcher:
    """Finds which configured source a presented token belongs to, in constant time.

    Tokens are kept as SHA-256 digests and a presented token is compared with every one
    of them with :func:`hmac.compare_digest`, without stopping at a match, so neither the
    time taken nor the comparison's length tells an attacker how close a guess came or
    which source it hit.

    Args:
        tokens: Source -> token; empty = no authentication configured.
    """

    def __init__(self, tokens: Mapping[str, str]) -> None:
        self._digests = [(name, _digest(token)) for name, token in sorted(tokens.items())]

    def __bool__(self) -> bool:
        return bool(self._digests)

    @property
    def sources(self) -> list[str]:
        """The configured source names, sorted."""
        return [name for name, _ in self._digests]

    def match(self, token: str) -> str | None:
        """The source whose token this is, or None."""
        given = _digest(token)
        found: str | None = None
        for name, digest in self._digests:
            if hmac.compare_digest(given, digest):
                found = name
        return found


ADMIN_DISABLED = "admin routes are disabled: set MODELLOOP_ADMIN_TOKEN"
"""Why an admin call is refused on a server without an admin token."""


def authorize_admin(authorization: str | None, token: str | None) -> None:
    """The admin check of every admin route and RPC, REST and gRPC alike.

    Args:
        authorization: The request's ``Authorization`` header (the gRPC ``authorization``
            metadata); None when absent.
        token: The configured admin token; None turns the admin API off. Settings refuse
            an empty or blank token at start-up, and an empty one is treated as off here
            too, so no empty credential can ever match.

    Raises:
        ServiceError: PERMISSION_DENIED when no admin token is configured, UNAUTHENTICATED
            when the bearer token is missing or is not the admin's. The comparison takes
            constant time.
    """
    if not token:
        raise ServiceError(ADMIN_DISABLED, ErrorCode.PERMISSION_DENIED)
    given = bearer_token(authorization)
    # Both sides are hashed, so compare_digest sees equal lengths whatever was sent.
    if given is None or not hmac.compare_digest(_digest(given), _digest(token)):
        raise ServiceError(
            "missing or wrong bearer token (Authorization: Bearer <admin token>)", ErrorCode.UNAUTHENTICATED
        )
