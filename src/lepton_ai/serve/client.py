"""``lep.ServeClient``: calls a deployment through any of its entry points, failing over.

    client = lep.ServeClient(dep.urls)            # every worker node's balancer
    client.predict([[5.1, 3.5, 1.4, 0.2]])        # -> the predictions list

A cluster deployment has one balancer per worker node; a node (and its balancer)
can die. The client sticks to one entry point while it answers and moves to the
next on a connection error, a timeout or a 502/503 from the balancer (no replica
behind it right now), so one dead node costs a request one retry, not a failure.
Anything else (a 4xx for bad input, a 500 from the model) is the answer and is
raised as it is: retrying elsewhere would give the same.

Over HTTPS (a cluster with ``--tls-dir``) the balancers' certificate is checked
against the cluster CA, ``tls_dir``'s ``ca.pem`` (default ``$LEPTON_TLS_DIR``);
``token`` (default ``$LEPTON_HTTP_TOKEN``) is sent as ``Authorization: Bearer``.
"""

from __future__ import annotations

import os
import ssl
import threading
from collections.abc import Sequence
from typing import Any

import httpx

from lepton_ai.errors import Unavailable
from lepton_ai.wire.http_auth import http_token
from lepton_ai.wire.tls import CA_CERT, TLS_DIR_ENV

RETRYABLE_STATUS = frozenset({502, 503, 504})
ENTRY_POINTS_MAX = 1_024


def _http_client(timeout_s: float, tls_dir: str | None, token: str | None) -> httpx.Client:
    ca_dir = tls_dir or os.environ.get(TLS_DIR_ENV)
    verify: ssl.SSLContext | bool = True  # the system's CAs
    if ca_dir:
        verify = ssl.create_default_context(cafile=os.path.join(ca_dir, CA_CERT))
    bearer = token or http_token()
    headers = {"authorization": f"Bearer {bearer}"} if bearer else {}
    return httpx.Client(timeout=timeout_s, verify=verify, headers=headers)


class ServeClient:
    """Thread-safe; ``close()`` (or ``with``) releases its connections."""

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        timeout_s: float = 10.0,
        rounds_max: int = 2,
        tls_dir: str | None = None,
        token: str | None = None,
    ) -> None:
        found = [urls] if isinstance(urls, str) else list(urls)
        self.urls = [u.rstrip("/") for u in found if u]
        if not self.urls:
            raise ValueError("ServeClient needs at least one URL")
        if len(self.urls) > ENTRY_POINTS_MAX:
            raise ValueError(f"at most {ENTRY_POINTS_MAX} URLs")
        if rounds_max < 1:
            raise ValueError("rounds_max must be >= 1")
        self.timeout_s = timeout_s
        self.rounds_max = rounds_max  # passes over every URL before giving up
        self._current = 0
        self._lock = threading.Lock()
        self._http = _http_client(timeout_s, tls_dir, token)

    def predict(self, instances: list[Any]) -> list[Any]:
        """POST ``{"instances": ...}`` to ``/predict``; the ``predictions`` list."""
        doc = self.post("/predict", {"instances": instances}).json()
        predictions = doc.get("predictions") if isinstance(doc, dict) else None
        if not isinstance(predictions, list):
            raise ValueError(f"answer without a predictions list: {str(doc)[:200]}")
        return predictions

    def post(self, path: str, body: Any) -> httpx.Response:
        """The first answer that is not a connection failure or a 502/503/504;
        ``httpx.HTTPStatusError`` for another error status, ``Unavailable`` when no
        entry point answered in ``rounds_max`` passes."""
        last = "no attempt"
        for attempt in range(self.rounds_max * len(self.urls)):
            with self._lock:
                index = (self._current + attempt) % len(self.urls)
            url = self.urls[index] + path
            try:
                response = self._http.post(url, json=body)
            except httpx.TransportError as exc:  # refused, reset, timed out
                last = f"{url}: {type(exc).__name__}: {exc}"
                continue
            if response.status_code in RETRYABLE_STATUS:
                last = f"{url}: HTTP {response.status_code}"
                continue
            with self._lock:
                self._current = index  # stick to the one that answers
            response.raise_for_status()
            return response
        raise Unavailable(f"no entry point of {len(self.urls)} answered; last: {last}")

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ServeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
