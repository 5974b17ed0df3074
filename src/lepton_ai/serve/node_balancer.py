"""A worker node's balancer: every ready replica of every deployment, routed by path.

``/<deployment>/<rest>`` goes, as ``/<rest>`` (query kept), to a ready replica of that
deployment through one ``Balancer`` per deployment (its retries, ejection and 503s
apply unchanged). The leader pushes the whole table (``set_endpoints``); this keeps
the per-deployment balancers in step with it. Endpoints of the node itself:
``GET /healthz``, ``/readyz`` (some deployment has a ready replica), ``/status``
(JSON: each deployment's endpoints), ``/metrics`` (Prometheus, one ``deployment``
label per balancer). ``/<deployment>/status`` and friends are that deployment's
``Balancer``'s own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from lepton_ai.serve.balancer import Balancer, Headers, OnReply, Reply, json_reply
from lepton_ai.serve.config import BalancerConfig
from lepton_ai.serve.lb_metrics import CONTENT_TYPE, BalancerMetrics, render_grouped
from lepton_ai.serve.spec import DEPLOYMENTS_MAX, REPLICAS_MAX, Endpoint
from lepton_ai.wire.tls import replica_ssl

NODE_DEPLOYMENTS_MAX = DEPLOYMENTS_MAX  # deployments routed; a larger table is refused
# Ready replicas routed, all deployments together: every replica of every deployment,
# twice over (a rolling update serves old and new versions side by side).
NODE_ENDPOINTS_MAX = 2 * DEPLOYMENTS_MAX * REPLICAS_MAX
_LOCAL = {"/healthz", "/readyz", "/metrics", "/status"}

OnDead = Callable[[Endpoint], None]


@dataclass
class _Route:
    """One endpoint as its deployment's ``Balancer`` knows it (by an int id)."""

    endpoint: Endpoint
    router_id: int


@dataclass
class _Deployment:
    balancer: Balancer
    routes: dict[str, _Route] = field(default_factory=dict)  # by replica_id
    health: asyncio.Task[None] | None = None


class NodeBalancer:
    """The routing table of one node; a ``frontend.Dispatcher`` for ``FrontEnd``."""

    def __init__(self, config: BalancerConfig, on_dead: OnDead = lambda endpoint: None) -> None:
        self.config = config
        self.metrics = BalancerMetrics()  # the node's own answers (local, 404, 413)
        self._on_dead = on_dead
        self._deployments: dict[str, _Deployment] = {}
        self._next_id = 0  # router ids: fresh for every (replica, url), never reused
        self._tg: asyncio.TaskGroup | None = None

    # -- the table -------------------------------------------------------------------
    def set_endpoints(self, endpoints: list[Endpoint], names: list[str] | None = None) -> None:
        """Replace the table (ValueError, and nothing changes, if it is malformed or too big).
        ``names``: every deployment that exists; one with no ready replica right now is
        answered 503 (try again, or another node) rather than 404 (no such thing)."""
        table = _check_table(endpoints)
        for name in names or []:
            table.setdefault(name, {})
        if len(table) > NODE_DEPLOYMENTS_MAX:
            raise ValueError(
                f"{len(table)} deployments; a node routes at most {NODE_DEPLOYMENTS_MAX}"
            )
        for name in [n for n in self._deployments if n not in table]:
            self._drop(name)
        for name, wanted in table.items():
            dep = self._deployments.get(name)
            if dep is None:
                dep = self._deployments[name] = self._new_deployment(name)
            self._sync(dep, wanted)

    def inflight(self) -> dict[str, int]:
        """Requests this node's balancer has at the replicas, per deployment (what the
        leader's autoscaler sums over the nodes)."""
        return {
            name: sum(v.outstanding for v in d.balancer.router.views())
            for name, d in self._deployments.items()
        }

    def endpoints(self) -> list[Endpoint]:
        return [r.endpoint for d in self._deployments.values() for r in d.routes.values()]

    def _sync(self, dep: _Deployment, wanted: dict[str, Endpoint]) -> None:
        for replica_id, route in list(dep.routes.items()):
            if wanted.get(replica_id) != route.endpoint:
                # Requests in flight to it finish (the pool closes idle connections only).
                dep.balancer.remove_replica(route.router_id)
                del dep.routes[replica_id]
        for replica_id, endpoint in wanted.items():
            if replica_id in dep.routes:
                continue
            parts = urlsplit(endpoint.url)
            router_id = self._next_id
            self._next_id += 1
            # An https replica (off-host reachable) wants the cluster's client certificate.
            ssl = replica_ssl() if parts.scheme == "https" else None
            dep.balancer.add_replica(router_id, parts.port or 80, parts.hostname or "", ssl)
            # The leader lists ready replicas only; active probes take it out if not.
            dep.balancer.set_ready(router_id)
            dep.routes[replica_id] = _Route(endpoint, router_id)

    def _new_deployment(self, name: str) -> _Deployment:
        routes: dict[str, _Route] = {}
        # Its own /status (``/<deployment>/status``) lists the same endpoints as ours.
        balancer = Balancer(self.config, status=lambda: _status(balancer, routes))
        dep = _Deployment(balancer, routes)
        if self._tg is not None:
            dep.health = self._start_health(name, dep)
        return dep

    def _drop(self, name: str) -> None:
        dep = self._deployments.pop(name)
        if dep.health is not None:
            dep.health.cancel()
        for route in dep.routes.values():
            dep.balancer.remove_replica(route.router_id)
        dep.balancer.close()

    # -- active health ---------------------------------------------------------------
    def start(self, tg: asyncio.TaskGroup) -> None:
        """Probe every deployment's replicas from now on, in tasks ``tg`` owns."""
        self._tg = tg
        for name, dep in self._deployments.items():
            if dep.health is None:
                dep.health = self._start_health(name, dep)

    def stop(self) -> None:
        """Stop probing (the owner's task group is exiting); close idle upstream connections."""
        self._tg = None
        for dep in self._deployments.values():
            if dep.health is not None:
                dep.health.cancel()
                dep.health = None
            dep.balancer.close()

    def _start_health(self, name: str, dep: _Deployment) -> asyncio.Task[None]:
        if self._tg is None:
            raise AssertionError("health loop outside start()")

        def on_dead(router_id: int) -> None:
            for route in dep.routes.values():
                if route.router_id == router_id:
                    self._on_dead(route.endpoint)

        return self._tg.create_task(dep.balancer.health_loop(on_dead), name=f"lepton-lb-{name}")

    # -- requests (the front end calls this) -----------------------------------------
    def dispatch(
        self, method: str, target: str, headers: Headers, body: bytes, on_reply: OnReply
    ) -> None:
        path, sep, query = target.partition("?")
        if method == "GET" and path in _LOCAL:
            self._answer(self._local(path), on_reply)
            return
        name, _, rest = path.removeprefix("/").partition("/")
        dep = self._deployments.get(name)
        if dep is None:
            self._answer(json_reply(404, {"error": f"no deployment named {name!r}"}), on_reply)
            return
        dep.balancer.dispatch(method, f"/{rest}{sep}{query}", headers, body, on_reply)

    def _answer(self, reply: Reply, on_reply: OnReply) -> None:
        self.metrics.count(reply[0])
        on_reply(reply)

    def _local(self, path: str) -> Reply:
        if path == "/healthz":
            return json_reply(200, {"status": "alive"})
        if path == "/readyz":
            ok = any(
                d.balancer.router.any_ready(d.balancer.now()) for d in self._deployments.values()
            )
            return json_reply(200 if ok else 503, {"ready": ok})
        if path == "/status":
            doc = {
                name: {"endpoints": _status(d.balancer, d.routes)}
                for name, d in self._deployments.items()
            }
            return json_reply(200, {"deployments": doc})
        groups = {"": self.metrics}
        for name, dep in self._deployments.items():
            lb = dep.balancer
            now = lb.now()
            lb.metrics.ready = sum(1 for v in lb.router.views() if v.ready and not v.ejected(now))
            groups[name] = lb.metrics
        return 200, [(b"content-type", CONTENT_TYPE.encode())], render_grouped("deployment", groups)


def _status(lb: Balancer, routes: dict[str, _Route]) -> list[dict[str, Any]]:
    now = lb.now()
    out = []
    for replica_id, route in sorted(routes.items()):
        view = lb.router.view(route.router_id)
        out.append(
            {
                "replica_id": replica_id,
                "version": route.endpoint.version,
                "url": route.endpoint.url,
                "ready": view is not None and view.ready,
                "outstanding": 0 if view is None else view.outstanding,
                "ejected": view is not None and view.ejected(now),
            }
        )
    return out


def _check_table(endpoints: list[Endpoint]) -> dict[str, dict[str, Endpoint]]:
    """The table by deployment and replica id; ValueError for what cannot be routed."""
    if len(endpoints) > NODE_ENDPOINTS_MAX:
        raise ValueError(f"{len(endpoints)} endpoints; a node routes at most {NODE_ENDPOINTS_MAX}")
    table: dict[str, dict[str, Endpoint]] = {}
    for e in endpoints:
        parts = urlsplit(e.url)
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
            raise ValueError(
                f"endpoint {e.replica_id!r}: url must be http(s)://host:port, got {e.url!r}"
            )
        if not e.deployment or "/" in e.deployment:
            raise ValueError(f"endpoint {e.replica_id!r}: bad deployment name {e.deployment!r}")
        by_id = table.setdefault(e.deployment, {})
        if e.replica_id in by_id:
            raise ValueError(f"endpoint {e.replica_id!r} listed twice")
        by_id[e.replica_id] = e
    return table
