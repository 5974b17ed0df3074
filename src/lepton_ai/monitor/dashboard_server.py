"""Serving the dashboard app standalone (``lepton dashboard --serve``, tests, benchmarks).

The listening socket is bound here, before uvicorn starts, so port 0 works and
the URL is known (and printed) before the first request.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import uvicorn

from lepton_ai.errors import LeptonError

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
LISTEN_BACKLOG = 128  # pending connections; a dashboard has few viewers


class DashboardServer:
    """``app`` on ``host:port`` (0: a free port): ``serve_forever()`` in this thread,
    or ``start()`` in a background one and ``close()``."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
            self.sock.listen(LISTEN_BACKLOG)
        except OSError:
            self.sock.close()
            raise
        bound_host, bound_port = self.sock.getsockname()[:2]
        shown = f"[{bound_host}]" if family == socket.AF_INET6 else bound_host
        self.url = f"http://{shown}:{bound_port}/"
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def serve_forever(self) -> None:
        """Serve until Ctrl-C (uvicorn handles the signal and shuts down cleanly)."""
        try:
            self.server.run(sockets=[self.sock])
        finally:
            self.sock.close()

    def start(self) -> DashboardServer:
        # uvicorn leaves signal handlers alone off the main thread: Ctrl-C stays the caller's.
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])),
            name="lepton-dashboard",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.close()
                raise LeptonError(f"the dashboard did not start within {START_TIMEOUT_S} s")
            time.sleep(0.01)
        return self

    def close(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT_S)
            self._thread = None
        self.sock.close()

    def __enter__(self) -> DashboardServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
