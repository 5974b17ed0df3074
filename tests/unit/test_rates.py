"""The dashboard's rates: counters read twice give a rate, over connections kept alive."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socket import socket
from typing import Any

import pytest

from lepton_ai.monitor.rates import Rates


class _Metrics(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as every lepton /metrics endpoint
    requests = 0

    def do_GET(self) -> None:
        type(self).requests += 1
        n = 10 * type(self).requests  # the counter moves 10 per scrape
        body = f'lepton_lb_requests_total{{deployment="d"}} {n}\n'.encode()
        self.send_response(200)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


class _CountingServer(ThreadingHTTPServer):
    daemon_threads = True
    accepted = 0

    def get_request(self) -> tuple[socket, Any]:
        self.accepted += 1
        return super().get_request()


@pytest.fixture
def server() -> Iterator[_CountingServer]:
    srv = _CountingServer(("127.0.0.1", 0), _Metrics)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def test_snapshots_reuse_one_connection_per_target(server: _CountingServer) -> None:
    url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
    rates = Rates()
    try:
        assert "per_s" not in rates.read([url]).get("deployment:d", {})  # one reading
        second = rates.read([url])["deployment:d"]
        assert second["per_s"] > 0  # two readings: a rate
        rates.read([url])
        assert server.accepted == 1  # three snapshots, one TCP connection
    finally:
        rates.close()
    rates.read([url])  # closed: a new client, a new connection
    rates.close()
    assert server.accepted == 2
