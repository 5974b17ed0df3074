"""The optional bearer token of the HTTP endpoints: serving and ``/metrics`` (``/sd``).

It is not the cluster token. The cluster token lets its holder submit jobs, that
is run any code on the workers; a model's callers and a Prometheus server need
far less, so they get a token of their own (``$LEPTON_HTTP_TOKEN``, or
``--http-token-file FILE`` on any ``lepton`` command, which sets it): leaking it
exposes predictions and metrics, never the cluster. Unset, the endpoints answer
without one (as on a single trusted host).

Programs read it from their environment only (never from an argument ``ps``
shows), and nothing logs it.
"""

from __future__ import annotations

import hmac
import os

HTTP_TOKEN_ENV = "LEPTON_HTTP_TOKEN"
HTTP_TOKEN_BYTES_MAX = 4096  # a token file larger than this is a mistake


def http_token() -> str | None:
    """``$LEPTON_HTTP_TOKEN``, or None: no bearer token required."""
    return os.environ.get(HTTP_TOKEN_ENV) or None


def read_token_file(path: str) -> str:
    """The token in ``path`` (one line, whitespace stripped); ValueError if empty."""
    with open(path, "rb") as f:
        data = f.read(HTTP_TOKEN_BYTES_MAX + 1)
    if len(data) > HTTP_TOKEN_BYTES_MAX:
        raise ValueError(f"{path}: a token file holds at most {HTTP_TOKEN_BYTES_MAX} bytes")
    token = data.decode("utf-8").strip()
    if not token:
        raise ValueError(f"{path} is empty")
    return token


def bearer_ok(authorization: bytes | str | None, token: str | None) -> bool:
    """True if no token is required, or ``authorization`` is ``Bearer <token>``
    (compared in constant time: the comparison must not leak a prefix)."""
    if token is None:
        return True
    if authorization is None:
        return False
    value = authorization.encode("latin-1") if isinstance(authorization, str) else authorization
    scheme, _, given = value.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    return hmac.compare_digest(given.strip(), token.encode())
