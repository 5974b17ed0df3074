"""The rows of ``cluster.status()``: a member's one-word health split into typed
fields, the row made from the leader's ``MemberInfo``, finding a member by role
and id (``kill("executor", 0)``, ``kill("leader")``) and counting the workers
ready to run tasks.

Shared by the client-side handle (``node.cluster_handle``), ``LocalCluster``
(``node.local_cluster``) and ``lepton cluster status`` (``node.cli``).
"""

from __future__ import annotations

from typing import Any, Literal

from lepton_ai.node.messages import MemberInfo

ROLES = ("coordinator", "leader", "worker", "executor")  # what kill/pause/resume take

Liveness = Literal[
    "alive", "suspect", "unreachable", "down", "unregistered", "crashloop", "gone", "dead"
]
ExecutorState = Literal["starting", "idle", "busy", "spare", ""]
PaxosRole = Literal["leader", "follower", "standby", ""]
_PAXOS_ROLES = frozenset({"leader", "follower", "standby"})
_EXECUTOR_STATES = frozenset({"starting", "idle", "busy"})


def split_health(role: str, health: str) -> tuple[Liveness | str, ExecutorState, PaxosRole]:
    """A member's one-word ``health`` (what ``status()`` has always shown) as three
    fields: is it up (``liveness``), what an executor is doing (``state``) and a
    coordinator's part in the Paxos group (``paxos_role``)."""
    if role == "coordinator" and health in _PAXOS_ROLES:
        return "alive", "", health  # type: ignore[return-value]  # checked just above
    if role == "spare":
        return "alive", "spare", ""
    if role == "executor" and health in _EXECUTOR_STATES:
        return "alive", health, ""  # type: ignore[return-value]  # checked just above
    return health, "", ""


def with_typed_health(members: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add (or refresh, after ``health`` changed) each member's typed fields."""
    for m in members:
        m["liveness"], m["state"], m["paxos_role"] = split_health(m["role"], m["health"])
    return members


def member_dict(m: MemberInfo) -> dict[str, Any]:
    """A ``status()`` row from the leader's view of a member."""
    return {
        "role": m.role,
        "id": m.id,
        "pid": m.pid,
        "address": m.address,
        "health": m.health,
        "node": m.node,
        "restarts": 0,  # filled in by whoever restarts it (LocalCluster, ``cluster up``)
        "last_exit": "",
        **({"paxos": m.paxos} if m.paxos else {}),
        "metrics": m.metrics,
        "serve": m.serve,
        **({"phi": round(m.phi, 3)} if m.role == "worker" else {}),
    }


def unlisted_member_dict(role: str, id: str, pid: int, address: str, health: str) -> dict[str, Any]:
    """A ``status()`` row for a process the leader does not list (down, not yet
    registered), from what the process's owner knows."""
    return {
        "role": role,
        "id": id,
        "pid": pid,
        "address": address,
        "health": health,
        "node": "",
        "restarts": 0,
        "last_exit": "",
        "metrics": "",
        "serve": "",
    }


def find_member(members: list[MemberInfo], role: str, id: int | str) -> MemberInfo:
    """The member ``kill(role, id)`` means: ``"leader"`` is the leading coordinator,
    an int executor id counts across the cluster. ValueError for an unknown role,
    LookupError for no such member."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    want = "coordinator" if role == "leader" else role
    candidates = [m for m in members if m.role == want]
    if role == "leader":
        leaders = [m for m in candidates if m.health == "leader"]
        if leaders:
            return leaders[0]
    key = str(id)
    for m in candidates:
        if m.id == key:
            return m
    if want == "executor" and isinstance(id, int) and not isinstance(id, bool):
        # Executors by index across the cluster: worker order, then slot.
        def order(m: MemberInfo) -> tuple[int, int]:
            w, _, s = m.id.partition(".")
            return (int(w) if w.isdigit() else 1 << 30, int(s) if s.isdigit() else 0)

        ordered = sorted(candidates, key=order)
        if 0 <= id < len(ordered):
            return ordered[id]
    known = ", ".join(m.id for m in candidates) or "none"
    raise LookupError(f"no {want} {id!r} (known: {known})")


def ready_workers(members: list[MemberInfo]) -> int:
    """Workers registered with executors, none of them still starting."""
    workers = {m.node for m in members if m.role == "worker"}
    starting = {m.node for m in members if m.role == "executor" and m.health == "starting"}
    with_execs = {m.node for m in members if m.role == "executor"}
    return len((workers & with_execs) - starting)
