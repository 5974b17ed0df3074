"""The deployment reconciler: keeps every deployment's replicas running on the worker nodes.

Desired state: the ``DeploymentSpec`` of each deployment (in the log). Observed
state: the live worker nodes, their serving slots and the replicas each reports.
The leader steps this core on every report and tick; its actions are the list of
replicas each node must run (``Assign``, the whole list: agents converge on it) and
the table of ready replicas every node's balancer routes to (``Publish``).

Rules (Kubernetes' Deployment controller, with maxSurge 1 and maxUnavailable 0):

* Placement spreads a deployment's replicas over the nodes (fewest of its replicas
  first, then the least loaded node), never past a node's serving slots.
* A node that is gone takes its replicas with it; they are placed again on the
  survivors at once.
* When all of a deployment's replicas are ready and one node holds two or more
  of them more than a node with a free slot (a node back after a failure), one
  moves: a new replica there first, the crowded node's goes once it is ready.
* A new version (an update or a rollback) starts one new replica at a time; an old
  one is taken out of rotation only once a new one is ready, so the ready count
  never drops below the wanted one, and a new version that never gets ready
  leaves the old one serving. Only when no node has a free slot for the extra
  replica is an old one replaced in place, one at a time.
* Scaling down removes replicas that are not ready first, then those on the most
  crowded node.
* A new leader adopts what the agents report running (its predecessor's
  decisions), so a leader change restarts no replica.

Pure: no asyncio, sockets, time, os or random (the purity test covers ``heal/``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from lepton_ai.monitor.events import EventKind
from lepton_ai.serve.spec import (
    DeploymentSpec,
    Endpoint,
    ReplicaAssignment,
    ReplicaReport,
    assignment_for,
)

SURGE = 1  # replicas of a new version started beyond the wanted count during a rollout
NODES_MAX = 10_000


@dataclass(frozen=True)
class NodeServe:
    """One live worker node as the leader sees it."""

    slots: int  # replicas it may run (all deployments together)
    replicas: tuple[ReplicaReport, ...] = ()
    balancer_url: str = ""


@dataclass(frozen=True)
class Assign:
    """Tell ``node`` to run exactly ``replicas`` (starting and stopping what differs)."""

    node: str
    replicas: list[ReplicaAssignment]


@dataclass(frozen=True)
class Publish:
    """The ready replicas of the cluster, for every node's balancer."""

    endpoints: list[Endpoint]


@dataclass(frozen=True)
class DeployEvent:
    kind: EventKind  # REPLICA_PLACED, _REMOVED, _LOST, UNSCHEDULABLE or ROLLOUT_DONE
    detail: str
    deployment: str


DeployAction = Assign | Publish | DeployEvent


@dataclass
class Placed:
    """A replica the leader wants on ``node``."""

    node: str
    assignment: ReplicaAssignment


@dataclass
class DeploymentReconciler:
    """Run by the leader only; ``epoch`` (its term) makes the replica ids it mints unique."""

    epoch: int
    assigned: dict[str, Placed] = field(default_factory=dict)  # replica id -> where
    _known_nodes: set[str] = field(default_factory=set)
    _sent: dict[str, list[ReplicaAssignment]] = field(default_factory=dict)
    _published: list[Endpoint] | None = None
    _minted: int = 0
    _stuck: set[str] = field(default_factory=set)  # deployments reported unschedulable
    _rolling: set[str] = field(default_factory=set)  # deployments with old versions left
    # Deployment -> the extra replica placed to even its spread over the nodes (a node
    # back after a failure gets its share again): one of the crowded node's goes once
    # it is ready.
    _moving: dict[str, str] = field(default_factory=dict)

    def step(
        self, specs: dict[str, DeploymentSpec], nodes: dict[str, NodeServe]
    ) -> list[DeployAction]:
        if len(nodes) > NODES_MAX:
            raise ValueError(f"at most {NODES_MAX} serving nodes")
        actions: list[DeployAction] = []
        self._adopt(specs, nodes)
        self._forget_lost(nodes, actions)
        ready = _ready_ids(nodes)
        for name in sorted(specs):
            self._reconcile(specs[name], nodes, ready, actions)
        self._drop_deleted(specs, actions)
        actions += self._assignments(nodes)
        endpoints = self.endpoints(nodes)
        if endpoints != self._published:
            self._published = endpoints
            actions.append(Publish(endpoints))
        return actions

    # -- observed state -----------------------------------------------------------------
    def _adopt(self, specs: dict[str, DeploymentSpec], nodes: dict[str, NodeServe]) -> None:
        """Replicas a node runs that this leader never assigned (its predecessor did)
        are kept if their deployment still wants that version or is rolling from it."""
        for node, view in sorted(nodes.items()):
            if node in self._known_nodes:
                continue
            self._known_nodes.add(node)
            for r in view.replicas:
                spec = specs.get(r.deployment)
                if r.state == "stopping" or r.replica_id in self.assigned or spec is None:
                    continue
                if r.version == spec.version:
                    a = assignment_for(spec, r.replica_id)
                elif r.version < spec.version and r.url:
                    # An old version still serving mid-rollout: kept until new ones are
                    # ready. The agent knows its target; ids alone name replicas.
                    a = ReplicaAssignment(r.replica_id, r.deployment, r.version, "")
                else:
                    continue  # never served, or from a spec this log never committed
                self.assigned[r.replica_id] = Placed(node, a)

    def _forget_lost(self, nodes: dict[str, NodeServe], actions: list[DeployAction]) -> None:
        for node in sorted(self._known_nodes - set(nodes)):
            self._known_nodes.discard(node)
            self._sent.pop(node, None)
            for rid, placed in sorted(self.assigned.items()):
                if placed.node == node:
                    del self.assigned[rid]
                    actions.append(
                        DeployEvent(
                            EventKind.REPLICA_LOST,
                            f"{rid} on node {node} (node gone)",
                            placed.assignment.deployment,
                        )
                    )

    # -- one deployment ---------------------------------------------------------------
    def _reconcile(
        self,
        spec: DeploymentSpec,
        nodes: dict[str, NodeServe],
        ready: set[str],
        actions: list[DeployAction],
    ) -> None:
        mine = [p for p in self.assigned.values() if p.assignment.deployment == spec.name]
        new = [p for p in mine if p.assignment.version == spec.version]
        old = [p for p in mine if p.assignment.version != spec.version]
        new_ready = sum(1 for p in new if p.assignment.replica_id in ready)
        # Old replicas to keep: enough that ready ones never fall below the wanted count.
        keep_old = max(0, spec.replicas - new_ready)
        for p in _removal_order(old, ready, nodes)[: max(0, len(old) - keep_old)]:
            self._remove(p, "replaced by a ready replica of the new version", actions)
        old_left = min(len(old), keep_old)
        room = spec.replicas + (SURGE if old_left else 0) - old_left - len(new)
        wanted = min(spec.replicas - len(new), room) if old_left else spec.replicas - len(new)
        if wanted > 0:
            placed = self._place(spec, wanted, nodes, actions)
            if placed < wanted and old_left and new_ready == len(new):
                # The cluster is full: no room to surge. Replace one old replica in
                # place (one fewer ready for a moment) rather than never finish.
                victim = _removal_order(old, ready, nodes)[0]
                self._remove(victim, "no free slot for the new version: replaced", actions)
        elif len(new) > spec.replicas and not self._move(spec, new, ready, actions):
            for p in _removal_order(new, ready, nodes)[: len(new) - spec.replicas]:
                self._remove(p, "scaled down", actions)
        self._note_rollout(spec, old_left, actions)
        if not old_left and len(new) == spec.replicas == new_ready:
            self._even_out(spec, new, nodes, actions)

    def _even_out(
        self,
        spec: DeploymentSpec,
        new: list[Placed],
        nodes: dict[str, NodeServe],
        actions: list[DeployAction],
    ) -> None:
        """All ready and one node holds 2+ more of them than a node with room: place one
        more there (the crowded node's goes once it is ready, in ``_move``), so that a
        second node failure does not take most of the deployment at once."""
        # Called only at exactly the wanted count, all ready: a move in progress would
        # have one more, so any left over was finished or overtaken (a loss, a scale).
        self._moving.pop(spec.name, None)
        count = Counter(p.node for p in new)
        target = self._pick_node(spec.name, nodes)
        if target is None or max(count.values(), default=0) - count[target] < 2:
            return
        before = set(self.assigned)
        if self._place(spec, 1, nodes, actions):
            (rid,) = set(self.assigned) - before
            self._moving[spec.name] = rid

    def _move(
        self, spec: DeploymentSpec, new: list[Placed], ready: set[str], actions: list[DeployAction]
    ) -> bool:
        """An evening-out in progress: True while it holds off the scale-down (its extra
        replica is not ready yet, or has just replaced one on the crowded node)."""
        rid = self._moving.get(spec.name)
        moving = self.assigned.get(rid) if rid is not None else None
        if moving is None or len(new) != spec.replicas + 1:
            self._moving.pop(spec.name, None)  # lost, or the count changed: plain rules
            return False
        if rid not in ready:
            return True
        del self._moving[spec.name]
        count = Counter(p.node for p in new)
        crowded = [p for p in new if p is not moving]
        victim = max(crowded, key=lambda p: (count[p.node], p.assignment.replica_id))
        self._remove(victim, f"moved to node {moving.node} (spread)", actions)
        return True

    def _note_rollout(
        self, spec: DeploymentSpec, old_left: int, actions: list[DeployAction]
    ) -> None:
        if old_left:
            self._rolling.add(spec.name)
        elif spec.name in self._rolling:
            self._rolling.discard(spec.name)
            actions.append(
                DeployEvent(
                    EventKind.ROLLOUT_DONE,
                    f"{spec.name} serves version {spec.version} only",
                    spec.name,
                )
            )

    def _place(
        self,
        spec: DeploymentSpec,
        count: int,
        nodes: dict[str, NodeServe],
        actions: list[DeployAction],
    ) -> int:
        """Place up to ``count`` new replicas; how many found a slot."""
        for placed in range(count):
            node = self._pick_node(spec.name, nodes)
            if node is None:
                if spec.name not in self._stuck:
                    self._stuck.add(spec.name)
                    actions.append(
                        DeployEvent(
                            EventKind.UNSCHEDULABLE,
                            f"{spec.name}: no node has a free serving slot ({len(nodes)} nodes)",
                            spec.name,
                        )
                    )
                return placed
            self._stuck.discard(spec.name)
            self._minted += 1
            rid = f"{spec.name}.{spec.version}.{self.epoch}-{self._minted}"
            self.assigned[rid] = Placed(node, assignment_for(spec, rid))
            actions.append(
                DeployEvent(EventKind.REPLICA_PLACED, f"{rid} on node {node}", spec.name)
            )
        return count

    def _pick_node(self, name: str, nodes: dict[str, NodeServe]) -> str | None:
        load = Counter(p.node for p in self.assigned.values())
        mine = Counter(p.node for p in self.assigned.values() if p.assignment.deployment == name)
        free = [n for n, v in nodes.items() if load[n] < v.slots]
        if not free:
            return None
        return min(free, key=lambda n: (mine[n], load[n], n))

    def _remove(self, p: Placed, why: str, actions: list[DeployAction]) -> None:
        rid = p.assignment.replica_id
        del self.assigned[rid]
        actions.append(
            DeployEvent(
                EventKind.REPLICA_REMOVED, f"{rid} on node {p.node}: {why}", p.assignment.deployment
            )
        )

    def _drop_deleted(self, specs: dict[str, DeploymentSpec], actions: list[DeployAction]) -> None:
        for p in sorted(self.assigned.values(), key=lambda p: p.assignment.replica_id):
            if p.assignment.deployment not in specs:
                self._remove(p, "deployment deleted", actions)
        self._stuck &= set(specs)
        self._rolling &= set(specs)
        self._moving = {n: r for n, r in self._moving.items() if n in specs}

    # -- what goes out ----------------------------------------------------------------
    def _assignments(self, nodes: dict[str, NodeServe]) -> list[DeployAction]:
        out: list[DeployAction] = []
        for node in sorted(nodes):
            want = sorted(
                (p.assignment for p in self.assigned.values() if p.node == node),
                key=lambda a: a.replica_id,
            )
            if self._sent.get(node) != want:
                self._sent[node] = want
                out.append(Assign(node, want))
        return out

    def resend(self, node: str) -> None:
        """``node`` (re)registered: its next ``step`` sends its whole list again."""
        self._sent.pop(node, None)

    def endpoints(self, nodes: dict[str, NodeServe]) -> list[Endpoint]:
        """Every replica still assigned that its node reports ready, in a stable order."""
        out = []
        for view in nodes.values():
            for r in view.replicas:
                placed = self.assigned.get(r.replica_id)
                if placed is not None and r.state == "ready" and r.url:
                    out.append(Endpoint(r.deployment, r.version, r.replica_id, r.url))
        return sorted(out, key=lambda e: (e.deployment, e.replica_id))


def _ready_ids(nodes: dict[str, NodeServe]) -> set[str]:
    return {r.replica_id for v in nodes.values() for r in v.replicas if r.state == "ready"}


def _removal_order(
    placed: list[Placed], ready: set[str], nodes: dict[str, NodeServe]
) -> list[Placed]:
    """Not-ready ones first, then those on the most crowded node, newest id last kept."""
    crowd = Counter(p.node for p in placed)
    return sorted(
        placed,
        key=lambda p: (p.assignment.replica_id in ready, -crowd[p.node], p.assignment.replica_id),
    )
