"""Re-replication: the leader's reconciler that keeps every object at ``want`` live copies.

A pure core. The leader calls ``step(objects, nodes, now)`` every tick with the
committed object metadata (the ``StorageStateMachine``) and its view of the nodes,
carries out the returned actions, and feeds back ``copy_done``:

* ``CopyReplica``: tell ``target`` to pull the object from one of ``source_nodes``;
  when it has a verified copy, commit ``ReplicaAdded`` and call ``copy_done(ok=True)``
  (``ok=False`` on any failure: the target is then avoided for that object, with
  back-off).
* ``DropReplica``: commit ``ReplicaDropped`` first, then delete the bytes (the log
  never names a replica that is gone on purpose).
* ``DataLostReport``: every replica is on a lost node; reported once per object.

Rules. An object's *live* replicas are those on live nodes; a replica on a node
dead for less than ``dead_grace_s`` is not live (no source, no target) but not
lost either. With fewer live + waiting replicas than ``min(want, live nodes)``
and at least one live source, the object is copied to the live node without it
that has the most free space for it (ties: the smallest node id). Excess copies
are dropped only when every listed replica is live, from the node with the least
free space. One action per object at a time: after a copy or a drop the object
is left alone until the log shows the change (or ``settle_timeout_s`` passes), so
an uncommitted change is never acted on twice.

Scanning (why not every object every step: 1e6 objects at every tick is too slow
for the leader). Each step examines at most ``scan_max`` objects: first the
*urgent* ones, those with a replica on a node that became lost since the last step
(from ``objects_on(node)``, at most ``urgent_max`` queued: overflow is left to the
scan), then the next ones in key order after a cursor that wraps around. A full
cycle therefore takes ``total / scan_max`` steps for capacity changes (a node
joining) but one or two steps for a lost node. When the copy budget is full the
scan stops at that object and resumes there, so no object is starved by ones after
it. Everything is ordered by key or node id: the simulator replays exactly.

Bounds: ``copies_inflight_max`` copies and ``copy_bytes_inflight_max`` bytes in
flight (one object larger than that bound is copied alone), ``drops_per_step_max``
drops a step, and every table is capped by a ``ReplicationConfig`` field.
"""

from __future__ import annotations

import builtins
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import msgspec

from lepton_ai.heal.backoff import Backoff
from lepton_ai.storage.messages import ObjectMeta


class NodeView(msgspec.Struct, frozen=True):
    """The leader's view of one node: ``since`` = when it became live (or dead)."""

    node: str
    live: bool
    free_bytes: int
    since: float = 0.0


class CopyReplica(msgspec.Struct, frozen=True, tag=True):
    oid: str
    size: int
    source_nodes: list[str]  # live replicas, by node id
    target: str


class DropReplica(msgspec.Struct, frozen=True, tag=True):
    oid: str
    node: str


class DataLostReport(msgspec.Struct, frozen=True, tag=True):
    """No replica of ``key`` is live or waiting out its grace: the data is gone."""

    oid: str
    key: str
    replicas: list[str]


Action = CopyReplica | DropReplica | DataLostReport


@runtime_checkable
class ObjectIndex(Protocol):
    """What the reconciler reads: ``StorageStateMachine`` and ``ObjectSet`` provide it."""

    def by_oid(self, oid: str) -> ObjectMeta | None: ...

    def list(
        self, prefix: str = "", start_after: str = "", limit: int = 1000
    ) -> builtins.list[ObjectMeta]: ...

    def objects_on(self, node: str) -> builtins.list[ObjectMeta]: ...


class ObjectSet:
    """An ``ObjectIndex`` over a plain collection of metas (tests, small tools)."""

    def __init__(self, objects: Iterable[ObjectMeta]) -> None:
        self._metas = sorted(objects, key=lambda m: m.key)
        self._keys = [m.key for m in self._metas]
        self._oids = {m.oid: m for m in self._metas}

    def by_oid(self, oid: str) -> ObjectMeta | None:
        return self._oids.get(oid)

    def list(
        self, prefix: str = "", start_after: str = "", limit: int = 1000
    ) -> builtins.list[ObjectMeta]:
        out: builtins.list[ObjectMeta] = []
        for meta in self._metas:  # linear: ObjectSet is for small collections
            if len(out) >= limit:
                break
            if meta.key > start_after and meta.key.startswith(prefix):
                out.append(meta)
        return out

    def objects_on(self, node: str) -> builtins.list[ObjectMeta]:
        return [m for m in self._metas if node in m.replicas]


@dataclass(frozen=True)
class ReplicationConfig:
    copies_inflight_max: int = 4
    copy_bytes_inflight_max: int = 1 << 30  # bandwidth bound: bytes of the copies in flight
    # 0: re-replicate at once (a LocalCluster does not restart dead nodes yet).
    dead_grace_s: float = 0.0
    scan_max: int = 10_000  # objects examined per step
    drops_per_step_max: int = 64
    copy_timeout_s: float = 900.0  # a copy not reported done by then counts as failed
    settle_timeout_s: float = 30.0  # wait this long for a done copy/drop to show in the log
    settling_max: int = 10_000  # objects waiting for their commit
    urgent_max: int = 100_000  # queued objects of newly lost nodes
    lost_reported_max: int = 100_000  # remembered DataLostReports (older ones may repeat)
    failures_tracked_max: int = 10_000  # objects with failed copies remembered for back-off
    retry: Backoff = field(default_factory=lambda: Backoff(1.0, 2.0, 60.0))

    def __post_init__(self) -> None:
        counts = (self.copies_inflight_max, self.scan_max, self.settling_max)
        if min(counts) < 1 or self.dead_grace_s < 0 or self.copy_bytes_inflight_max < 1:
            raise ValueError(f"bad replication config: {self}")


@dataclass
class _Copy:
    action: CopyReplica
    started_at: float


@dataclass
class _Settle:
    node: str
    added: bool  # True: until the log lists ``node``; False: until it no longer does
    at: float


@dataclass
class _Failure:
    count: int
    last_at: float


@dataclass
class _View:
    """One step's view of the nodes."""

    now: float
    live: dict[str, int]  # live node -> free bytes less the copies in flight to it
    waiting: set[str]  # dead for less than dead_grace_s: not live, not lost yet
    drops: int = 0  # DropReplica emitted this step


class ReplicationReconciler:
    """Turns object metadata + node liveness into copy/drop actions (see module doc)."""

    def __init__(self, config: ReplicationConfig | None = None) -> None:
        self.config = config or ReplicationConfig()
        self._inflight: dict[str, _Copy] = {}  # oid -> its one copy in flight
        self._inflight_bytes = 0
        self._settling: dict[str, _Settle] = {}
        self._failures: OrderedDict[str, dict[str, _Failure]] = OrderedDict()  # oid -> target
        self._lost: OrderedDict[str, None] = OrderedDict()  # oids reported lost
        self._urgent: deque[str] = deque()
        self._usable: set[str] = set()  # nodes live or in grace at the last step
        self._cursor = ""

    # inspection ---------------------------------------------------------------

    def inflight(self) -> list[CopyReplica]:
        return [self._inflight[oid].action for oid in sorted(self._inflight)]

    @property
    def inflight_bytes(self) -> int:
        return self._inflight_bytes

    @property
    def cursor(self) -> str:
        return self._cursor

    # events -------------------------------------------------------------------

    def copy_done(self, oid: str, target: str, ok: bool, now: float) -> None:
        """The copy of ``oid`` to ``target`` ended (ok: verified and ReplicaAdded proposed)."""
        copy = self._inflight.get(oid)
        if copy is None or copy.action.target != target:
            if not ok:  # a report of an expired copy: still worth avoiding the target
                self._record_failure(oid, target, now)
            return
        del self._inflight[oid]
        self._inflight_bytes -= copy.action.size
        if not ok:
            self._record_failure(oid, target, now)
        elif len(self._settling) < self.config.settling_max:
            self._settling[oid] = _Settle(target, True, now)
        # else: a second copy may follow before the commit shows; the excess is dropped.

    def _record_failure(self, oid: str, target: str, now: float) -> None:
        per = self._failures.get(oid)
        if per is None:
            if len(self._failures) >= self.config.failures_tracked_max:
                self._failures.popitem(last=False)
            per = self._failures[oid] = {}
        old = per.get(target)
        per[target] = _Failure(1 if old is None else old.count + 1, now)

    # the step -----------------------------------------------------------------

    def step(
        self,
        objects: ObjectIndex | Iterable[ObjectMeta],
        nodes: Mapping[str, NodeView],
        now: float,
    ) -> list[Action]:
        """The actions to start now (the caller carries each out once)."""
        source = objects if isinstance(objects, ObjectIndex) else ObjectSet(objects)
        self._expire(source, now)
        view = self._view(nodes, now)
        self._queue_lost_nodes(source, view)
        actions: list[Action] = []
        budget = self.config.scan_max
        while self._urgent and budget > 0:
            meta = source.by_oid(self._urgent[0])
            if meta is not None and not self._examine(meta, view, actions):
                return actions  # copy budget full: resume with this object
            self._urgent.popleft()
            budget -= 1
        self._scan(source, view, actions, budget)
        return actions

    def _expire(self, source: ObjectIndex, now: float) -> None:
        for oid, copy in builtins.list(self._inflight.items()):
            if now - copy.started_at >= self.config.copy_timeout_s:
                self.copy_done(oid, copy.action.target, False, now)
        for oid, settle in builtins.list(self._settling.items()):
            meta = source.by_oid(oid)
            if (
                meta is None
                or (settle.node in meta.replicas) == settle.added
                or now - settle.at >= self.config.settle_timeout_s
            ):
                del self._settling[oid]

    def _view(self, nodes: Mapping[str, NodeView], now: float) -> _View:
        live: dict[str, int] = {}
        waiting: set[str] = set()
        for node, v in nodes.items():
            if v.live:
                live[node] = v.free_bytes
            elif now - v.since < self.config.dead_grace_s:
                waiting.add(node)
        for copy in self._inflight.values():  # space the copies in flight will take
            if copy.action.target in live:
                live[copy.action.target] -= copy.action.size
        return _View(now, live, waiting)

    def _queue_lost_nodes(self, source: ObjectIndex, view: _View) -> None:
        usable = set(view.live) | view.waiting
        lost, self._usable = sorted(self._usable - usable), usable
        for node in lost:
            for meta in source.objects_on(node):
                if len(self._urgent) >= self.config.urgent_max:
                    return  # the cursor scan finds the rest
                self._urgent.append(meta.oid)

    def _scan(self, source: ObjectIndex, view: _View, actions: list[Action], budget: int) -> None:
        wrapped = False
        while budget > 0:
            batch = source.list("", self._cursor, budget)
            if not batch:
                if wrapped or not self._cursor:
                    return
                self._cursor, wrapped = "", True  # past the last key: start over
                continue
            for meta in batch:
                if not self._examine(meta, view, actions):
                    return  # copy budget full: the cursor stays before this object
                self._cursor = meta.key
                budget -= 1

    def _examine(self, meta: ObjectMeta, view: _View, actions: list[Action]) -> bool:
        """Act on one object; False: the copy budget is full (stop the scan here)."""
        oid = meta.oid
        if oid in self._inflight or oid in self._settling:
            return True  # one action per object at a time
        sources = sorted(n for n in meta.replicas if n in view.live)
        waiting = sum(1 for n in meta.replicas if n in view.waiting)
        if not sources and not waiting:
            self._report_lost(meta, actions)
            return True
        self._lost.pop(oid, None)  # a node came back: report again if lost again
        if len(sources) + waiting < min(meta.want, len(view.live)):
            # Only replicas waiting out their grace: nothing to copy from yet.
            return self._copy(meta, sources, view, actions) if sources else True
        self._failures.pop(oid, None)  # healthy: forget the failed targets
        if len(sources) == len(meta.replicas) > meta.want:
            self._drop(meta, view, actions)
        return True

    def _copy(
        self, meta: ObjectMeta, sources: list[str], view: _View, actions: list[Action]
    ) -> bool:
        cfg = self.config
        if len(self._inflight) >= cfg.copies_inflight_max or len(self._settling) >= (
            cfg.settling_max
        ):
            return False
        if self._inflight and self._inflight_bytes + meta.size > cfg.copy_bytes_inflight_max:
            return False  # wait for bandwidth; an oversized object goes alone
        target = self._target(meta, view)
        if target is None:
            return True  # no room or every candidate backing off: a later scan retries
        action = CopyReplica(meta.oid, meta.size, sources, target)
        self._inflight[meta.oid] = _Copy(action, view.now)
        self._inflight_bytes += meta.size
        view.live[target] -= meta.size
        actions.append(action)
        return True

    def _target(self, meta: ObjectMeta, view: _View) -> str | None:
        failed = self._failures.get(meta.oid, {})
        best: tuple[int, str] | None = None
        for node, free in view.live.items():
            if free < meta.size or node in meta.replicas:
                continue
            f = failed.get(node)
            if f is not None and not self.config.retry.ready(view.now, f.last_at, f.count):
                continue
            rank = (-free, node)  # most free space, then the smallest id
            if best is None or rank < best:
                best = rank
        return None if best is None else best[1]

    def _drop(self, meta: ObjectMeta, view: _View, actions: list[Action]) -> None:
        if view.drops >= self.config.drops_per_step_max or len(self._settling) >= (
            self.config.settling_max
        ):
            return  # excess copies cost only space: a later scan drops them
        node = min(meta.replicas, key=lambda n: (view.live[n], n))  # least free space
        self._settling[meta.oid] = _Settle(node, False, view.now)
        view.drops += 1
        actions.append(DropReplica(meta.oid, node))

    def _report_lost(self, meta: ObjectMeta, actions: list[Action]) -> None:
        if meta.oid in self._lost:
            return
        if len(self._lost) >= self.config.lost_reported_max:
            self._lost.popitem(last=False)
        self._lost[meta.oid] = None
        actions.append(DataLostReport(meta.oid, meta.key, builtins.list(meta.replicas)))
