"""A lepton process's HTTP endpoint: ``/metrics`` for Prometheus in every
coordinator and worker agent; coordinators add ``/sd`` (Prometheus HTTP service
discovery: every process's target) and the dashboard.

It runs on the process's own event loop (uvicorn on a socket bound by the
program), so a scrape reads the process's state between two of its steps, with no
lock and no thread. Requests are small and few (a scrape every few seconds, a
dashboard poll a second), so uvicorn's defaults fit; the bounds that matter here
are ``CONNECTIONS_MAX`` and the keep-alive timeout.

With ``$LEPTON_TLS_DIR`` the port speaks HTTPS (the node certificate); with
``$LEPTON_HTTP_TOKEN`` ``/metrics`` and ``/sd`` want ``Authorization: Bearer
<token>`` (Prometheus: ``authorization: {credentials_file: ...}``), else 401.
``/healthz`` stays open (it says nothing), the dashboard has its own login.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from lepton_ai.monitor import metrics
from lepton_ai.wire.http_auth import bearer_ok, http_token
from lepton_ai.wire.tls import tls_from_env, uvicorn_tls_options

log = logging.getLogger("lepton_ai.monitor.http")

CONNECTIONS_MAX = 256  # concurrent HTTP connections to one process's monitor port
KEEP_ALIVE_S = 5


def bind_http(host: str, port: int = 0) -> socket.socket:
    """The monitor port, bound before the event loop starts (``port=0``: any)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def metrics_routes() -> list[BaseRoute]:
    async def scrape(request: Request) -> Response:
        if not _authorized(request):
            return _UNAUTHORIZED()
        return Response(metrics.render(), media_type=metrics.CONTENT_TYPE)

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    return [Route("/metrics", scrape), Route("/healthz", healthz)]


def sd_route(targets: Callable[[], Any]) -> Route:
    """``/sd``: the targets in Prometheus' HTTP SD format, from ``targets()``
    (awaitable of a list of ``{"targets": [...], "labels": {...}}``)."""

    async def sd(request: Request) -> Response:
        if not _authorized(request):
            return _UNAUTHORIZED()
        return JSONResponse(await targets())

    return Route("/sd", sd)


def _authorized(request: Request) -> bool:
    return bearer_ok(request.headers.get("authorization"), http_token())


def _UNAUTHORIZED() -> Response:
    return PlainTextResponse(
        "401: a bearer token is required\n", 401, {"www-authenticate": "Bearer"}
    )


class _Server(uvicorn.Server):
    """uvicorn inside a lepton program: the program owns its signals (SIGTERM
    drains it in its own way), so uvicorn must not install handlers for them."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve_http(sock: socket.socket, routes: Sequence[BaseRoute]) -> None:
    """Serve ``routes`` on ``sock`` until cancelled."""
    app = Starlette(routes=list(routes))
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="off",
        limit_concurrency=CONNECTIONS_MAX,
        timeout_keep_alive=KEEP_ALIVE_S,
        loop="none",
        **uvicorn_tls_options(tls_from_env()),
    )
    server = _Server(config)
    try:
        await server.serve(sockets=[sock])
    finally:
        server.should_exit = True


def address_of(sock: socket.socket, advertised_host: str) -> str:
    return f"{advertised_host}:{sock.getsockname()[1]}"
