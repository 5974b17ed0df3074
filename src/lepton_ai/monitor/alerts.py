"""Alert rules on the cluster's state: pure (no I/O, no clock of its own).

The leader's shell builds a ``Snapshot`` of what it knows every tick and steps
``Alerts`` with it; what changed comes back as ``Transition``s, which the shell
records on the replicated timeline (``alert_raised``/``alert_cleared``) and, when a
webhook is configured, POSTs (``node/coord_alerts.py``). An alert is keyed by its
rule and subject (``node_down:worker-2``) so it is raised once while it holds and
cleared once when it stops holding, like Prometheus' alerting rules. A leader
change starts from no alerts: the new leader raises again what still holds
(at-least-once, as Alertmanager's receivers expect).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

ALERTS_MAX = 1_000  # alerts held at once; past it the rest wait (a storm is one screen)
DISK_FULL_RATIO = 0.9  # a node's object store this full raises disk_nearly_full
JOB_FAILED_HOLD_S = 300.0  # a failed job's alert holds this long, then clears
RESTARTS_CRASHLOOP = 3  # a replica restarted this many times and not ready: crash-looping

Rule = Literal[
    "node_down",
    "quorum_at_risk",
    "data_under_replicated",
    "data_unavailable",
    "job_failed",
    "replica_crashloop",
    "disk_nearly_full",
]
Severity = Literal["warning", "critical"]

# How long a rule must hold before its alert fires (Prometheus' ``for:``): a
# coordinator starting up reaches its peers within a second or two, a worker
# killed from outside is back in ~0.2 s (self-healing), and neither should page.
HOLD_S: dict[Rule, float] = {
    "node_down": 5.0,
    "quorum_at_risk": 5.0,
    "data_under_replicated": 10.0,
    "data_unavailable": 0.0,
    "job_failed": 0.0,
    "replica_crashloop": 0.0,
    "disk_nearly_full": 30.0,
}

SEVERITY: dict[Rule, Severity] = {
    "node_down": "warning",
    "quorum_at_risk": "critical",
    "data_under_replicated": "warning",
    "data_unavailable": "critical",
    "job_failed": "warning",
    "replica_crashloop": "warning",
    "disk_nearly_full": "warning",
}


@dataclass(frozen=True)
class Snapshot:
    """What the leader knows now, reduced to what the rules read."""

    now: float  # wall-clock seconds
    nodes_down: tuple[str, ...] = ()  # worker names seen this term, not registered now
    voters: int = 1
    voters_reachable: int = 1  # the leader included
    objects_under_replicated: int = 0
    objects_unavailable: int = 0
    failed_jobs: tuple[tuple[str, float], ...] = ()  # (job id, when it failed)
    # (replica id, deployment, restarts, state) of every replica the nodes report
    replicas: tuple[tuple[str, str, int, str], ...] = ()
    disks: tuple[tuple[str, int, int], ...] = ()  # (node, used bytes, capacity bytes)


@dataclass(frozen=True)
class Alert:
    rule: Rule
    subject: str  # what it is about: a node, a job, a replica ("" cluster-wide)
    detail: str
    severity: Severity
    since: float

    @property
    def key(self) -> str:
        return f"{self.rule}:{self.subject}" if self.subject else self.rule


@dataclass(frozen=True)
class Transition:
    status: Literal["firing", "resolved"]
    alert: Alert


def evaluate(s: Snapshot) -> list[Alert]:
    """Every alert that holds in ``s`` (``since`` is ``s.now``; ``Alerts`` keeps the
    time one was first raised)."""
    out: list[Alert] = []

    def add(rule: Rule, subject: str, detail: str) -> None:
        out.append(Alert(rule, subject, detail, SEVERITY[rule], s.now))

    for node in s.nodes_down:
        add("node_down", node, f"worker {node} is not registered")
    majority = s.voters // 2 + 1
    if s.voters > 1 and s.voters_reachable <= majority:
        add(
            "quorum_at_risk",
            "",
            f"{s.voters_reachable} of {s.voters} coordinators reachable; "
            f"{majority} are needed, so one more loss stops the cluster",
        )
    if s.objects_unavailable:
        add("data_unavailable", "", f"{s.objects_unavailable} objects have no live copy")
    if s.objects_under_replicated:
        add(
            "data_under_replicated",
            "",
            f"{s.objects_under_replicated} objects have a copy on a node that is down",
        )
    for job_id, at in s.failed_jobs:
        if s.now - at < JOB_FAILED_HOLD_S:
            add("job_failed", job_id, f"job {job_id} failed")
    for replica_id, deployment, restarts, state in s.replicas:
        if restarts >= RESTARTS_CRASHLOOP and state != "ready":
            add(
                "replica_crashloop",
                replica_id,
                f"replica {replica_id} of {deployment} restarted {restarts} times, now {state}",
            )
    for node, used, capacity in s.disks:
        if capacity > 0 and used >= DISK_FULL_RATIO * capacity:
            add("disk_nearly_full", node, f"node {node}'s store is {used / capacity:.0%} full")
    return out


@dataclass
class Alerts:
    """The alerts raised and not cleared yet, and those holding but not for long
    enough yet (``pending``: key -> when it started to hold)."""

    active: dict[str, Alert] = field(default_factory=dict)
    pending: dict[str, float] = field(default_factory=dict)

    def step(self, s: Snapshot) -> list[Transition]:
        holding = {a.key: a for a in evaluate(s)}
        out: list[Transition] = []
        for key in sorted(self.active.keys() - holding.keys()):
            out.append(Transition("resolved", self.active.pop(key)))
        for key in list(self.pending):
            if key not in holding:
                del self.pending[key]  # stopped holding before it fired: never raised
        for key in sorted(holding.keys() - self.active.keys()):
            alert = holding[key]
            since = self.pending.setdefault(key, s.now)
            if s.now - since < HOLD_S[alert.rule] or len(self.active) >= ALERTS_MAX:
                continue
            del self.pending[key]
            self.active[key] = replace(alert, since=since)
            out.append(Transition("firing", self.active[key]))
        return out
