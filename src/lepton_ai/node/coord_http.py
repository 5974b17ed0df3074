"""A coordinator's HTTP port: its own ``/metrics``, ``/sd`` (every process of the
cluster as Prometheus targets) and the dashboard.

Any coordinator answers ``/sd`` and the dashboard, the followers too: they read the
cluster's state through an ordinary client of the cluster, which follows the
leader by itself, so a Prometheus or a browser pointed at any coordinator keeps
working across a leader change.
"""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING, Any

from starlette.routing import BaseRoute

from lepton_ai.monitor.http import metrics_routes, sd_route, serve_http
from lepton_ai.node.node_net import parse_address

if TYPE_CHECKING:
    from lepton_ai.node.coordinator import Coordinator

SD_TIMEOUT_S = 5.0  # a scrape of /sd waits this long for the leader's status


class CoordinatorHttp:
    def __init__(self, coordinator: Coordinator, sock: socket.socket) -> None:
        self.c = coordinator
        self.sock = sock
        self._status_lock = asyncio.Lock()
        # A client of this cluster through this coordinator (it follows redirects):
        # the dashboard's source and /sd read the cluster through it.
        from lepton_ai.node.cluster_handle import Cluster

        self.cluster = Cluster(coordinator.address, coordinator.token)

    def routes(self) -> list[BaseRoute]:
        from lepton_ai.monitor.dashboard import dashboard_routes
        from lepton_ai.monitor.dashboard_source import ClusterSource

        # The dashboard at "/": its paths do not clash with /metrics, /sd, /healthz.
        dashboard = dashboard_routes(ClusterSource(self.cluster), self.c.token)
        return [*metrics_routes(), sd_route(self.sd_targets), *dashboard]

    async def run(self) -> None:
        try:
            await serve_http(self.sock, self.routes())
        finally:
            self.cluster.close()

    async def sd_targets(self) -> list[dict[str, Any]]:
        async with self._status_lock:  # one status request in flight per process
            return await asyncio.to_thread(self.cluster.scrape_targets, SD_TIMEOUT_S)


def http_address_of(client_address: str, sock: socket.socket) -> str:
    """The HTTP port's address as others reach it: the host of the coordinator's
    client address (its advertised one), the port ``sock`` is bound to."""
    return f"{parse_address(client_address)[0]}:{sock.getsockname()[1]}"


def attach_http(coordinator: Coordinator, sock: socket.socket) -> None:
    coordinator.http = CoordinatorHttp(coordinator, sock)
    coordinator.http_address = http_address_of(coordinator.address, sock)
