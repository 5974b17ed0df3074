"""The leader's side of serving: deployment specs in the log, replicas on the worker nodes.

Specs are replicated state (``serve.spec.DeploymentsMachine``, in the same log as
the jobs). Which replicas run where, and which are ready, is soft state: the agents
report it with every heartbeat and a new leader adopts it. Only the leader runs
the deployment reconciler (``heal.deployments``) and tells the agents what to run
(``RunReplicas``) and where every ready replica is (``ServeEndpoints``).

After a leader change the reconciler waits ``grace_s`` for the agents to
re-register: deciding earlier would take replicas it has not heard of yet for
missing ones and start extras. Meanwhile every node's balancer keeps routing with
the table it has, so requests go on being served through the election.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lepton_ai.errors import LeptonError
from lepton_ai.heal.autoscale import Autoscaler, Load
from lepton_ai.heal.deployments import (
    Assign,
    DeployEvent,
    DeploymentReconciler,
    NodeServe,
    Publish,
)
from lepton_ai.monitor.events import EventKind
from lepton_ai.node.messages import (
    ChangeDeployment,
    ClientReply,
    Deployments,
    ErrorReply,
    GetDeployments,
    RunReplicas,
    ServeEndpoints,
)
from lepton_ai.serve.spec import (
    DeploymentInfo,
    DeploymentSpec,
    Endpoint,
    PutDeployment,
    ReplicaInfo,
    ScaleDeployment,
    check_spec,
    decode_deploy_result,
    encode_deploy_command,
)

if TYPE_CHECKING:
    from lepton_ai.node.coordinator import Coordinator

log = logging.getLogger("lepton_ai.coordinator.serve")

# On every replica's timeline (the leader commits them): what the controller did.


@dataclass(frozen=True)
class ServeControlConfig:
    grace_s: float = 2.0  # after a leader change: agents re-register before any decision


class ServeControl:
    """The leader's serving duties, attached to a ``Coordinator``."""

    def __init__(self, coordinator: Coordinator, config: ServeControlConfig) -> None:
        self.c = coordinator
        self.config = config
        self.reconciler: DeploymentReconciler | None = None
        self.leading_since = 0.0
        self._endpoints: list[Endpoint] | None = None  # the table last published
        self._told: set[str] = set()  # workers that have that table
        self._names: list[str] = []  # the deployments that table names
        self.autoscaler = Autoscaler()
        self._scaling: set[str] = set()  # deployments with an autoscaler's change in flight

    def became_leader(self) -> None:
        self.reconciler = DeploymentReconciler(epoch=self.c.epoch)
        self.autoscaler = Autoscaler()
        self.leading_since = time.monotonic()
        self._endpoints, self._told, self._names = None, set(), []

    def stepped_down(self) -> None:
        self.reconciler = None

    # -- the reconciler (leader only, from the coordinator's tick) --------------------
    def tick(self, now: float) -> None:
        rec = self.reconciler
        if rec is None or now - self.leading_since < self.config.grace_s:
            return
        views = {v.worker_id: v for v in self.c.workers.values() if v.serve_url}
        nodes = {
            wid: NodeServe(v.serve_slots, tuple(v.replicas), v.serve_url)
            for wid, v in views.items()
        }
        specs = self.c.machine.deployments.specs
        for action in rec.step(specs, nodes):
            if isinstance(action, Assign):
                views[action.node].conn.send_nowait(RunReplicas(action.replicas))
            elif isinstance(action, Publish):
                self._endpoints, self._told = action.endpoints, set()
            elif isinstance(action, DeployEvent):
                self.c.event(action.kind, action.detail)
        if self._endpoints is not None and sorted(specs) != self._names:
            self._names, self._told = sorted(specs), set()  # a deployment came or went
        if self._endpoints is not None:
            for wid, view in views.items():
                if wid not in self._told:  # a node that joined since: the table too
                    view.conn.send_nowait(ServeEndpoints(self._endpoints, self._names))
                    self._told.add(wid)
        self._autoscale(now)

    def _autoscale(self, now: float) -> None:
        """Step the autoscaler for every deployment with a policy; commit its changes."""
        specs = self.c.machine.deployments.specs
        scaled = {n for n, s in specs.items() if s.autoscale is not None}
        self.autoscaler.forget(scaled)
        views = list(self.c.workers.values())
        for name in sorted(scaled - self._scaling):
            spec = specs[name]
            if spec.autoscale is None:
                continue
            in_flight = sum(v.inflight.get(name, 0) for v in views)
            ready = sum(
                1
                for v in views
                for r in v.replicas
                if r.deployment == name and r.version == spec.version and r.state == "ready"
            )
            load = Load(spec.replicas, ready, in_flight)
            decision = self.autoscaler.step(name, spec.autoscale, load, now)
            if decision is not None:
                self._scaling.add(name)
                self.c.spawn(self._scale(name, decision.replicas, decision.detail))

    async def _scale(self, name: str, replicas: int, detail: str) -> None:
        try:
            raw = await self.c.log.submit(encode_deploy_command(ScaleDeployment(name, replicas)))
            if decode_deploy_result(raw).ok:
                self.c.event(EventKind.AUTOSCALED, detail)
        except LeptonError as exc:  # leadership lost meanwhile: the next leader decides
            log.info("autoscale of %s not committed: %s", name, exc)
        finally:
            self._scaling.discard(name)

    # -- client requests -------------------------------------------------------------
    async def handle(self, msg: object) -> ClientReply | None:
        """Answer a deployment request; None if ``msg`` is not one."""
        if isinstance(msg, ChangeDeployment):
            return await self._change(msg)
        if isinstance(msg, GetDeployments):
            specs = self.c.machine.deployments.specs
            if msg.name and msg.name not in specs:
                return ErrorReply("not_found", f"no deployment named {msg.name!r}")
            names = [msg.name] if msg.name else sorted(specs)
            return Deployments([self.info(specs[n]) for n in names])
        return None

    async def _change(self, msg: ChangeDeployment) -> ClientReply:
        cmd = msg.command
        if isinstance(cmd, PutDeployment):
            try:
                check_spec(cmd.spec)
            except ValueError as exc:
                return ErrorReply("invalid", str(exc))
        try:
            raw = await self.c.log.submit(encode_deploy_command(cmd))
        except LeptonError as exc:  # NotLeader, Unavailable, a slot lost in an election
            return ErrorReply("unavailable", f"log unavailable: {exc}")
        res = decode_deploy_result(raw)
        if not res.ok:
            return ErrorReply(res.kind or "invalid", res.error)
        name = res.spec.name if res.spec is not None else getattr(cmd, "name", "")
        what = type(cmd).__name__.removesuffix("Deployment").lower()
        detail = f"{name}: {what}"
        if res.spec is not None:
            detail += f" -> version {res.spec.version}, {res.spec.replicas} replicas"
        self.c.event(EventKind.DEPLOYMENT_CHANGED, detail)
        return Deployments([self.info(res.spec)] if res.spec is not None else [])

    # -- status ----------------------------------------------------------------------
    def _routable(self) -> set[str] | None:
        """Replicas in the table every serving node has been sent; None before this
        leader published one (the nodes route with their last table meanwhile)."""
        if self._endpoints is None:
            return None
        serving = {v.worker_id for v in self.c.workers.values() if v.serve_url}
        if not serving <= self._told:
            return set()
        return {e.replica_id for e in self._endpoints}

    def info(self, spec: DeploymentSpec) -> DeploymentInfo:
        """The deployment's replicas: what the nodes report (placed ones not reported
        yet as "pending"), and every node balancer's URL for it."""
        replicas: dict[str, ReplicaInfo] = {}
        views = sorted(self.c.workers.values(), key=lambda v: v.name)
        routable = self._routable()
        for v in views:
            for r in v.replicas:
                if r.deployment == spec.name:
                    # "ready" once every node's balancer routes to it, not before: a
                    # caller that waited for ready then calls any entry point.
                    up = r.state != "ready" or routable is None or r.replica_id in routable
                    replicas[r.replica_id] = ReplicaInfo(
                        r.replica_id,
                        v.name,
                        r.version,
                        r.state if up else "starting",
                        r.url,
                        r.pid,
                        r.restarts,
                        r.error,
                    )
        if self.reconciler is not None:
            names = {v.worker_id: v.name for v in views}
            for rid, placed in self.reconciler.assigned.items():
                a = placed.assignment
                if a.deployment == spec.name and rid not in replicas:
                    node = names.get(placed.node, "")
                    replicas[rid] = ReplicaInfo(rid, node, a.version, "pending")
        urls = [f"{v.serve_url}/{spec.name}" for v in views if v.serve_url]
        return DeploymentInfo(spec, [replicas[k] for k in sorted(replicas)], urls)
