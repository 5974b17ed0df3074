"""The re-replication reconciler and the back-off: rules, bounds, and a seeded fault simulation."""

from __future__ import annotations

import random

import pytest

from lepton_ai.heal.backoff import Backoff
from lepton_ai.heal.replication import (
    Action,
    CopyReplica,
    DataLostReport,
    DropReplica,
    NodeView,
    ObjectSet,
    ReplicationConfig,
    ReplicationReconciler,
)
from lepton_ai.storage.messages import ObjectMeta
from lepton_ai.storage.meta import (
    ObjectDeleted,
    ObjectPut,
    ReplicaAdded,
    ReplicaDropped,
    StorageStateMachine,
)


def oid(n: int) -> str:
    return f"{n:032x}"


def obj(n: int, replicas: list[str], want: int = 2, size: int = 10) -> ObjectMeta:
    return ObjectMeta(f"k{n:04d}", oid(n), size, 0, 4, replicas, want)


def nodes(free: dict[str, int], dead: dict[str, float] | None = None) -> dict[str, NodeView]:
    """Live nodes with their free bytes; ``dead``: node -> when it died."""
    out = {n: NodeView(n, True, f) for n, f in free.items()}
    for n, since in (dead or {}).items():
        out[n] = NodeView(n, False, 0, since)
    return out


def machine(*metas: ObjectMeta) -> StorageStateMachine:
    sm = StorageStateMachine()
    for m in metas:
        assert sm.apply_command(ObjectPut(m)).accepted
    return sm


def copies(actions: list[Action]) -> list[CopyReplica]:
    return [a for a in actions if isinstance(a, CopyReplica)]


# ------------------------------------------------------------------ backoff


def test_backoff_grows_caps_and_gates() -> None:
    b = Backoff(1.0, 2.0, 10.0)
    assert [b.next_delay(n) for n in range(6)] == [0.0, 1.0, 2.0, 4.0, 8.0, 10.0]
    assert b.next_delay(10**6) == 10.0  # no overflow
    assert b.ready(5.0, 5.0, 0)
    assert not b.ready(6.9, 5.0, 2) and b.ready(7.0, 5.0, 2)
    for bad in [(-1.0, 2.0, 1.0), (2.0, 2.0, 1.0), (1.0, 0.5, 2.0)]:
        with pytest.raises(ValueError):
            Backoff(*bad)


def test_config_is_validated() -> None:
    for bad in [{"copies_inflight_max": 0}, {"scan_max": 0}, {"dead_grace_s": -1.0}]:
        with pytest.raises(ValueError):
            ReplicationConfig(**bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------ copies


def test_copies_to_the_live_node_with_most_room_one_at_a_time() -> None:
    sm = machine(obj(1, ["a"], want=3))
    r = ReplicationReconciler()
    view = nodes({"a": 5, "b": 100, "c": 200, "d": 9}, dead={"e": 0.0})
    assert r.step(sm, view, 1.0) == [CopyReplica(oid(1), 10, ["a"], "c")]
    assert r.step(sm, view, 2.0) == []  # never two copies of one object at once
    r.copy_done(oid(1), "c", True, 3.0)
    assert r.step(sm, view, 3.0) == []  # done but not yet in the log: wait for the commit
    assert sm.apply_command(ReplicaAdded(oid(1), "c")).accepted
    # "d" has 9 bytes free, too few for 10; "e" is dead.
    assert r.step(sm, view, 4.0) == [CopyReplica(oid(1), 10, ["a", "c"], "b")]
    r.copy_done(oid(1), "b", True, 5.0)
    sm.apply_command(ReplicaAdded(oid(1), "b"))
    assert r.step(sm, view, 6.0) == [] and r.inflight() == []


def test_target_ties_go_to_the_smallest_node_id_and_want_is_capped_by_live_nodes() -> None:
    r = ReplicationReconciler()
    objs = [obj(1, ["a"], want=5)]
    assert copies(r.step(objs, nodes({"a": 1, "c": 50, "b": 50}), 0.0))[0].target == "b"
    # With only two live nodes, two copies is all an object can have.
    r2 = ReplicationReconciler()
    assert r2.step([obj(1, ["a", "b"], want=3)], nodes({"a": 50, "b": 50}), 0.0) == []


def test_space_reserved_by_copies_in_flight() -> None:
    r = ReplicationReconciler()
    objs = [obj(1, ["a"], size=60), obj(2, ["a"], size=60)]
    acts = copies(r.step(objs, nodes({"a": 0, "b": 100, "c": 70}), 0.0))
    # b takes the first; after that b has 40 left, so the second goes to c.
    assert [(c.oid, c.target) for c in acts] == [(oid(1), "b"), (oid(2), "c")]


def test_copies_in_flight_bounded_by_count_and_bytes() -> None:
    cfg = ReplicationConfig(copies_inflight_max=3, copy_bytes_inflight_max=25)
    r = ReplicationReconciler(cfg)
    objs = [obj(i, ["a"]) for i in range(1, 8)]
    view = nodes({"a": 0, "b": 1000})
    assert [c.oid for c in copies(r.step(objs, view, 0.0))] == [oid(1), oid(2)]  # 20 of 25
    assert r.inflight_bytes == 20
    r.copy_done(oid(1), "b", True, 1.0)
    assert [c.oid for c in copies(r.step(objs, view, 1.0))] == [oid(3)]
    r2 = ReplicationReconciler(ReplicationConfig(copies_inflight_max=3))
    assert len(copies(r2.step(objs, view, 0.0))) == 3  # count bound: 3
    r3 = ReplicationReconciler(cfg)
    # An object over the byte bound is copied, but alone.
    big = [obj(9, ["a"], size=500)]
    assert [c.oid for c in copies(r3.step(big, view, 0.0))] == [oid(9)]
    assert copies(r3.step(big + objs, view, 1.0)) == []


def test_a_blocked_scan_resumes_at_the_blocked_object() -> None:
    cfg = ReplicationConfig(copies_inflight_max=1, scan_max=100)
    r = ReplicationReconciler(cfg)
    objs = [obj(i, ["a"]) for i in range(1, 4)]
    view = nodes({"a": 0, "b": 100})
    assert [c.oid for c in copies(r.step(objs, view, 0.0))] == [oid(1)]
    assert r.cursor == "k0001"  # stopped before k0002, not past it
    r.copy_done(oid(1), "b", False, 1.0)
    assert [c.oid for c in copies(r.step(objs, view, 2.0))] == [oid(2)]


def test_failed_copy_avoids_the_target_with_backoff() -> None:
    cfg = ReplicationConfig(retry=Backoff(10.0, 2.0, 100.0))
    r = ReplicationReconciler(cfg)
    objs = [obj(1, ["a"])]
    view = nodes({"a": 0, "b": 100, "c": 50})
    assert copies(r.step(objs, view, 0.0))[0].target == "b"
    r.copy_done(oid(1), "b", False, 1.0)
    assert copies(r.step(objs, view, 2.0))[0].target == "c"  # b is backing off
    r.copy_done(oid(1), "c", False, 3.0)
    assert r.step(objs, view, 5.0) == []  # every candidate backing off
    assert copies(r.step(objs, view, 11.0))[0].target == "b"  # b's 10 s are over
    r.copy_done(oid(1), "b", False, 12.0)  # second failure: 20 s
    assert copies(r.step(objs, view, 13.0))[0].target == "c"
    r.copy_done(oid(1), "c", False, 14.0)
    assert r.step(objs, view, 31.0) == []
    assert copies(r.step(objs, view, 32.0))[0].target == "b"


def test_a_copy_never_reported_times_out() -> None:
    r = ReplicationReconciler(ReplicationConfig(copy_timeout_s=60.0))
    objs = [obj(1, ["a"])]
    view = nodes({"a": 0, "b": 100, "c": 50})
    assert copies(r.step(objs, view, 0.0))[0].target == "b"
    assert r.step(objs, view, 59.0) == []
    assert copies(r.step(objs, view, 60.0))[0].target == "c"  # b counted as failed
    r.copy_done(oid(1), "b", True, 61.0)  # a late report of the expired copy is ignored
    assert [c.target for c in r.inflight()] == ["c"]


def test_a_settled_copy_that_never_commits_is_retried_after_the_timeout() -> None:
    r = ReplicationReconciler(ReplicationConfig(settle_timeout_s=30.0))
    objs = [obj(1, ["a"])]
    view = nodes({"a": 0, "b": 100})
    r.step(objs, view, 0.0)
    r.copy_done(oid(1), "b", True, 1.0)
    assert r.step(objs, view, 30.0) == []
    assert copies(r.step(objs, view, 31.0))[0].target == "b"


# ------------------------------------------------------------------ grace, loss


def test_dead_grace_delays_re_replication() -> None:
    r = ReplicationReconciler(ReplicationConfig(dead_grace_s=5.0))
    objs = [obj(1, ["a", "b"])]
    view = nodes({"a": 0, "c": 100}, dead={"b": 10.0})
    assert r.step(objs, view, 12.0) == []  # b may come back
    assert copies(r.step(objs, view, 15.0)) == [CopyReplica(oid(1), 10, ["a"], "c")]
    # Only waiting replicas: nothing to copy from, but not lost either.
    r2 = ReplicationReconciler(ReplicationConfig(dead_grace_s=5.0))
    assert r2.step([obj(2, ["b"])], view, 12.0) == []
    assert r2.step([obj(2, ["b"])], view, 15.0) == [DataLostReport(oid(2), "k0002", ["b"])]


def test_lost_objects_reported_once_until_they_come_back() -> None:
    r = ReplicationReconciler()
    objs = [obj(1, ["x", "y"]), obj(2, [])]
    down = nodes({"a": 100}, dead={"x": 0.0, "y": 0.0})
    lost = [DataLostReport(oid(1), "k0001", ["x", "y"]), DataLostReport(oid(2), "k0002", [])]
    assert r.step(objs, down, 1.0) == lost
    assert r.step(objs, down, 2.0) == []
    back = nodes({"a": 100, "x": 100}, dead={"y": 0.0})
    assert r.step(objs[:1], back, 3.0) == [CopyReplica(oid(1), 10, ["x"], "a")]
    r.copy_done(oid(1), "a", False, 4.0)
    assert r.step(objs, down, 5.0) == [lost[0]]  # lost again: reported again


# ------------------------------------------------------------------ drops


def test_excess_replicas_dropped_from_the_fullest_node_one_at_a_time() -> None:
    sm = machine(obj(1, ["a", "b", "c", "d"], want=2))
    r = ReplicationReconciler()
    view = nodes({"a": 50, "b": 10, "c": 30, "d": 10})
    assert r.step(sm, view, 0.0) == [DropReplica(oid(1), "b")]  # least free, then smallest id
    assert r.step(sm, view, 1.0) == []  # until the log shows it
    assert sm.apply_command(ReplicaDropped(oid(1), "b")).accepted
    assert r.step(sm, view, 2.0) == [DropReplica(oid(1), "d")]
    sm.apply_command(ReplicaDropped(oid(1), "d"))
    assert r.step(sm, view, 3.0) == []


def test_no_drop_while_a_listed_replica_is_not_live() -> None:
    r = ReplicationReconciler()
    objs = [obj(1, ["a", "b", "c"], want=2)]
    assert r.step(objs, nodes({"a": 1, "b": 1}, dead={"c": 0.0}), 1.0) == []
    assert r.step(objs, nodes({"a": 1, "b": 1}), 2.0) == []  # c unknown: not live either


def test_drops_per_step_bounded() -> None:
    r = ReplicationReconciler(ReplicationConfig(drops_per_step_max=2))
    objs = [obj(i, ["a", "b"], want=1) for i in range(5)]
    view = nodes({"a": 1, "b": 2})
    assert len(r.step(objs, view, 0.0)) == 2
    assert len(r.step(objs, view, 1.0)) == 2  # the first two wait for their commits


# ------------------------------------------------------------------ scanning


def test_cursor_scan_covers_everything_in_bounded_steps() -> None:
    sm = machine(*[obj(i, ["a"], want=1) for i in range(10)])
    r = ReplicationReconciler(ReplicationConfig(scan_max=3))
    view = nodes({"b": 100}, dead={"a": 0.0})
    reported: list[str] = []
    cursors = []
    for t in range(4):
        reported += [a.oid for a in r.step(sm, view, float(t)) if isinstance(a, DataLostReport)]
        cursors.append(r.cursor)
    assert reported == [oid(i) for i in range(10)]
    assert cursors == ["k0002", "k0005", "k0008", "k0001"]  # wrapped around


def test_objects_of_a_newly_lost_node_go_first() -> None:
    metas = [obj(i, ["a", "b"]) for i in range(100)]
    sm = machine(*metas)
    r = ReplicationReconciler(ReplicationConfig(scan_max=5, copies_inflight_max=100))
    up = nodes({"a": 10_000, "b": 10_000, "c": 10_000})
    r.step(sm, up, 0.0)
    assert r.cursor == "k0004"
    down = nodes({"a": 10_000, "c": 10_000}, dead={"b": 1.0})
    acts = copies(r.step(sm, down, 1.0))
    # Without the urgent queue this step would reach k0005..k0009 only.
    assert [c.oid for c in acts] == [oid(i) for i in range(5)]
    seen = {c.oid for c in acts}
    for t in range(2, 21):
        seen |= {c.oid for c in copies(r.step(sm, down, float(t)))}
    assert len(seen) == 100


def test_objects_deleted_meanwhile_are_forgotten() -> None:
    sm = machine(obj(1, ["a"]))
    r = ReplicationReconciler()
    view = nodes({"a": 0, "b": 100})
    r.step(sm, view, 0.0)
    sm.apply_command(ObjectDeleted("k0001"))
    r.copy_done(oid(1), "b", True, 1.0)
    assert not sm.apply_command(ReplicaAdded(oid(1), "b")).accepted  # the leader's commit
    assert r.step(sm, view, 2.0) == []


# ------------------------------------------------------------------ simulation


class _Sim:
    """A leader loop: nodes die and come back, copies take time and may fail."""

    def __init__(self, seed: int, cfg: ReplicationConfig) -> None:
        self.rng = random.Random(seed)
        self.cfg = cfg
        self.names = [f"n{i}" for i in range(6)]
        self.capacity = dict.fromkeys(self.names, 5_000) | {"n5": 150}
        self.live = dict.fromkeys(self.names, True)
        self.since = dict.fromkeys(self.names, 0.0)
        self.sm = StorageStateMachine()
        self.r = ReplicationReconciler(cfg)
        self.pending: list[tuple[float, CopyReplica, bool]] = []  # (done at, copy, ok)
        self.next_oid = 1
        self.reports = 0
        for _ in range(40):
            self.put()

    def put(self, key: str | None = None) -> None:
        want = self.rng.randint(1, 3)
        reps = self.rng.sample(self.names[:5], self.rng.randint(1, want))
        n = self.next_oid
        self.next_oid += 1
        meta = ObjectMeta(key or f"k{n:04d}", oid(n), self.rng.randint(0, 100), 0, 4, reps, want)
        assert self.sm.apply_command(ObjectPut(meta)).accepted

    def views(self, now: float) -> dict[str, NodeView]:
        used = self.sm.bytes_by_node()
        return {
            n: NodeView(n, self.live[n], self.capacity[n] - used.get(n, 0), self.since[n])
            for n in self.names
        }

    def faults(self, now: float) -> None:
        rng = self.rng
        if rng.random() < 0.08:
            n = rng.choice(self.names)
            # Deaths only while 3+ are live: at the end some nodes hold data, some are gone.
            if not self.live[n] or sum(self.live.values()) >= 3:
                self.live[n], self.since[n] = not self.live[n], now
        if rng.random() < 0.05:
            metas = self.sm.list(limit=1000)
            if metas:
                victim = rng.choice(metas)
                if rng.random() < 0.5:
                    self.sm.apply_command(ObjectDeleted(victim.key, victim.oid))
                else:
                    self.put(victim.key)  # replaced: a new oid under the same key

    def finish_copies(self, now: float, faulty: bool) -> None:
        due = [p for p in self.pending if p[0] <= now]
        self.pending = [p for p in self.pending if p[0] > now]
        for _, copy, lucky in due:
            reachable = self.live[copy.target] and any(self.live[s] for s in copy.source_nodes)
            ok = (lucky or not faulty) and reachable
            if ok:  # the leader commits first (stale if replaced/deleted meanwhile)
                self.sm.apply_command(ReplicaAdded(copy.oid, copy.target))
            self.r.copy_done(copy.oid, copy.target, ok, now)

    def check_and_carry_out(self, actions: list[Action], now: float, faulty: bool) -> None:
        inflight_oids = [c.oid for _, c, _ in self.pending]
        for a in actions:
            meta = self.sm.by_oid(a.oid)
            assert meta is not None
            if isinstance(a, CopyReplica):
                assert a.oid not in inflight_oids, "two copies of one object"
                inflight_oids.append(a.oid)
                assert self.live[a.target] and a.target not in meta.replicas
                assert a.source_nodes and all(self.live[s] for s in a.source_nodes)
                assert set(a.source_nodes) <= set(meta.replicas)
                done_at = now + self.rng.randint(1, 5)
                self.pending.append((done_at, a, self.rng.random() < 0.8))
            elif isinstance(a, DropReplica):
                assert all(self.live[n] for n in meta.replicas)
                assert len(meta.replicas) > meta.want
                assert self.sm.apply_command(ReplicaDropped(a.oid, a.node)).accepted
            else:
                assert not any(self.live[n] for n in meta.replicas)
                self.reports += 1
        inflight = self.r.inflight()
        assert len(inflight) <= self.cfg.copies_inflight_max
        assert len(inflight) == 1 or self.r.inflight_bytes <= self.cfg.copy_bytes_inflight_max
        assert sorted(c.oid for c in inflight) == sorted(c.oid for _, c, _ in self.pending)

    def run(self, ticks: int, faulty: bool, t0: float) -> float:
        now = t0
        for _ in range(ticks):
            now += 1.0
            if faulty:
                self.faults(now)
            self.finish_copies(now, faulty)
            actions = self.r.step(self.sm, self.views(now), now)
            self.check_and_carry_out(actions, now, faulty)
        return now


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("grace", [0.0, 3.0])
def test_seeded_simulation_converges(seed: int, grace: float) -> None:
    cfg = ReplicationConfig(
        copies_inflight_max=3,
        copy_bytes_inflight_max=150,
        dead_grace_s=grace,
        scan_max=7,
        retry=Backoff(1.0, 2.0, 8.0),
    )
    sim = _Sim(seed, cfg)
    now = sim.run(300, faulty=True, t0=0.0)
    if sum(sim.live.values()) < 2:  # keep the end state interesting: revive one
        n = next(n for n in sim.names if not sim.live[n])
        sim.live[n], sim.since[n] = True, now
    sim.run(400, faulty=False, t0=now)
    live = {n for n in sim.names if sim.live[n]}
    views = sim.views(now)
    for meta in sim.sm.list(limit=1000):
        have = [n for n in meta.replicas if n in live]
        if not have:
            continue  # lost during the faults
        need = min(meta.want, len(live))
        room = [n for n in live if n not in meta.replicas and views[n].free_bytes >= meta.size]
        assert len(have) >= need or not room, (meta, live)
        if len(have) == len(meta.replicas):
            assert len(meta.replicas) <= max(meta.want, 1)
    assert sim.pending == [] and sim.r.inflight() == []


def test_simulation_is_deterministic() -> None:
    def trace(seed: int) -> bytes:
        sim = _Sim(seed, ReplicationConfig(scan_max=5))
        sim.run(150, faulty=True, t0=0.0)
        return sim.sm.snapshot()

    assert trace(7) == trace(7)


def test_object_set_index() -> None:
    s = ObjectSet([obj(2, ["a"]), obj(1, ["b"]), obj(3, ["a", "b"])])
    assert [m.key for m in s.list()] == ["k0001", "k0002", "k0003"]
    assert [m.key for m in s.list(start_after="k0001", limit=1)] == ["k0002"]
    assert [m.key for m in s.objects_on("a")] == ["k0002", "k0003"]
    assert s.by_oid(oid(3)) is not None and s.by_oid(oid(9)) is None
