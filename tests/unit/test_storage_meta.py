"""The storage metadata machine: puts, stale deletes, replicas, bulk deletes, queries, snapshots."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lepton_ai.compute.job_state import JobDeleted, JobSubmitted, decode_command, encode_command
from lepton_ai.compute.plan import JobOptions
from lepton_ai.consensus.kv import OpenSession, Put, Request
from lepton_ai.consensus.kv import decode_command as decode_kv
from lepton_ai.consensus.kv import encode_command as encode_kv
from lepton_ai.storage.messages import KEY_BYTES_MAX, ObjectMeta
from lepton_ai.storage.meta import (
    JobObjectsDeleted,
    ObjectDeleted,
    ObjectPut,
    PrefixDeleted,
    ReplicaAdded,
    ReplicaDropped,
    SortedKeys,
    StorageCommand,
    StorageResult,
    StorageStateConfig,
    StorageStateMachine,
    decode_storage_command,
    decode_storage_result,
    encode_storage_command,
)


def oid(n: int) -> str:
    return f"{n:032x}"


def meta(
    key: str,
    n: int,
    replicas: list[str] | None = None,
    *,
    size: int = 10,
    want: int = 2,
    job: str = "",
    created_at: float = 0.0,
) -> ObjectMeta:
    reps = ["a", "b"] if replicas is None else replicas
    return ObjectMeta(key, oid(n), size, 7, 4, reps, want, created_at, job)


def put(sm: StorageStateMachine, m: ObjectMeta, if_absent: bool = False) -> StorageResult:
    return sm.apply_command(ObjectPut(m, if_absent))


def rejected(sm: StorageStateMachine, cmd: StorageCommand, why: str) -> None:
    """The command is rejected with a reason containing ``why`` and changes nothing."""
    before = sm.snapshot()
    res = sm.apply_command(cmd)
    assert not res.accepted and why in res.reason, res
    assert res.removed == []
    assert sm.snapshot() == before


# ------------------------------------------------------------------ put


def test_put_creates_then_replaces_and_returns_the_old_object() -> None:
    sm = StorageStateMachine()
    assert put(sm, meta("k", 1)) == StorageResult(True)
    res = put(sm, meta("k", 2, ["c"]))
    assert res.accepted and [m.oid for m in res.removed] == [oid(1)]
    assert res.removed[0].replicas == ["a", "b"]  # where the leader deletes the old bytes
    got = sm.get("k")
    assert got is not None and got.oid == oid(2)
    assert sm.by_oid(oid(1)) is None and sm.by_oid(oid(2)) == got
    assert sm.total_objects == 1
    assert sm.bytes_by_node() == {"c": 10}


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        (meta("", 1), "empty key"),
        (meta("a\x00b", 1), "NUL"),
        (meta("/abs", 1), "starts with '/'"),
        (meta("x" * (KEY_BYTES_MAX + 1), 1), "KEY_BYTES_MAX"),
        (meta("é" * (KEY_BYTES_MAX // 2 + 1), 1), "KEY_BYTES_MAX"),  # utf-8 bytes, not chars
        (meta("\ud800", 1), "UTF-8"),
        (msgspec.structs.replace(meta("k", 1), oid="xyz"), "object id"),
        (msgspec.structs.replace(meta("k", 1), oid=oid(1) + "\n"), "object id"),
        (msgspec.structs.replace(meta("k", 1), oid=oid(0xABC).upper()), "object id"),
        (meta("k", 1, size=-1), "negative size"),
        (msgspec.structs.replace(meta("k", 1), chunk_bytes=0), "chunk_bytes"),
        (msgspec.structs.replace(meta("k", 1), crc=-1), "crc"),
        (meta("k", 1, []), "no replicas"),
        (meta("k", 1, ["a", "a"]), "duplicate"),
        (meta("k", 1, ["a", ""]), "empty replica"),
        (meta("k", 1, want=0), "want"),
        (meta("k", 1, want=17), "want"),
        (meta("k", 1, [f"n{i}" for i in range(17)]), "replicas_max"),
        (meta("k", 1, created_at=float("nan")), "created_at"),
    ],
)
def test_invalid_puts_are_rejected_and_change_nothing(bad: ObjectMeta, why: str) -> None:
    sm = StorageStateMachine()
    put(sm, meta("other", 9))
    rejected(sm, ObjectPut(bad), why)


def test_key_at_the_byte_limit_is_accepted() -> None:
    sm = StorageStateMachine()
    assert put(sm, meta("x" * KEY_BYTES_MAX, 1)).accepted


def test_an_oid_names_one_object_forever() -> None:
    sm = StorageStateMachine()
    put(sm, meta("k", 1))
    rejected(sm, ObjectPut(meta("other", 1)), "another key")
    # A retried put of the same object must not report it as replaced (its bytes would go).
    rejected(sm, ObjectPut(meta("k", 1)), "duplicate put")


def test_if_absent_put_is_first_wins() -> None:
    sm = StorageStateMachine()
    assert put(sm, meta("k", 1), if_absent=True).accepted
    rejected(sm, ObjectPut(meta("k", 2), if_absent=True), "key exists")
    assert put(sm, meta("k2", 2), if_absent=True).accepted


def test_objects_max_rejects_new_keys_but_allows_replacing() -> None:
    sm = StorageStateMachine(StorageStateConfig(objects_max=2))
    put(sm, meta("a", 1))
    put(sm, meta("b", 2))
    rejected(sm, ObjectPut(meta("c", 3)), "objects_max")
    assert put(sm, meta("a", 4)).accepted


def test_the_machine_owns_its_replica_lists() -> None:
    sm = StorageStateMachine()
    reps = ["a", "b"]
    put(sm, meta("k", 1, reps))
    reps.append("evil")
    got = sm.get("k")
    assert got is not None and got.replicas == ["a", "b"]


# ------------------------------------------------------------------ delete


def test_delete_and_stale_delete() -> None:
    sm = StorageStateMachine()
    put(sm, meta("k", 1))
    put(sm, meta("k", 2))  # the key now names a newer object
    rejected(sm, ObjectDeleted("k", oid(1)), "stale delete")
    rejected(sm, ObjectDeleted("nope"), "no such key")
    res = sm.apply_command(ObjectDeleted("k", oid(2)))
    assert res.accepted and [(m.oid, m.replicas) for m in res.removed] == [(oid(2), ["a", "b"])]
    assert sm.get("k") is None and sm.by_oid(oid(2)) is None and sm.total_objects == 0
    assert sm.bytes_by_node() == {} and sm.objects_on("a") == []
    put(sm, meta("j", 3))
    assert sm.apply_command(ObjectDeleted("j")).accepted  # no oid: whatever it holds


# ------------------------------------------------------------------ replicas


def test_replica_added_and_dropped() -> None:
    sm = StorageStateMachine()
    put(sm, meta("k", 1, ["a"]))
    assert sm.apply_command(ReplicaAdded(oid(1), "b")).accepted
    rejected(sm, ReplicaAdded(oid(1), "b"), "already")
    rejected(sm, ReplicaAdded(oid(2), "c"), "no such object")
    rejected(sm, ReplicaAdded(oid(1), ""), "empty node")
    rejected(sm, ReplicaDropped(oid(1), "z"), "not a replica")
    rejected(sm, ReplicaDropped(oid(2), "a"), "no such object")
    got = sm.get("k")
    assert got is not None and got.replicas == ["a", "b"]
    assert [m.key for m in sm.objects_on("b")] == ["k"]
    assert sm.apply_command(ReplicaDropped(oid(1), "a")).accepted
    assert sm.apply_command(ReplicaDropped(oid(1), "b")).accepted  # the last one: lost
    got = sm.get("k")
    assert got is not None and got.replicas == []
    assert sm.bytes_by_node() == {}
    assert [m.key for m in sm.under_replicated({"a", "b"})] == ["k"]


def test_replica_commands_on_a_replaced_object_are_stale() -> None:
    sm = StorageStateMachine()
    put(sm, meta("k", 1, ["a"]))
    put(sm, meta("k", 2, ["b"]))
    rejected(sm, ReplicaAdded(oid(1), "c"), "no such object")
    rejected(sm, ReplicaDropped(oid(1), "a"), "no such object")


def test_replicas_max_bounds_replica_added() -> None:
    sm = StorageStateMachine(StorageStateConfig(replicas_max=2))
    put(sm, meta("k", 1, ["a", "b"]))
    rejected(sm, ReplicaAdded(oid(1), "c"), "replicas_max")


# ------------------------------------------------------------------ bulk deletes


def test_job_objects_deleted_in_bounded_batches_in_key_order() -> None:
    sm = StorageStateMachine(StorageStateConfig(deletes_per_command_max=3))
    for i in range(7):
        put(sm, meta(f"j/{i}", i + 1, job="j1"))
    put(sm, meta("other", 100, job="j2"))
    put(sm, meta("free", 101))
    res = sm.apply_command(JobObjectsDeleted("j1"))
    assert res.accepted and res.more and [m.key for m in res.removed] == ["j/0", "j/1", "j/2"]
    res = sm.apply_command(JobObjectsDeleted("j1"))
    assert res.more and [m.key for m in res.removed] == ["j/3", "j/4", "j/5"]
    res = sm.apply_command(JobObjectsDeleted("j1"))
    assert not res.more and [m.key for m in res.removed] == ["j/6"]
    res = sm.apply_command(JobObjectsDeleted("j1"))
    assert res.accepted and not res.more and res.removed == []
    assert [m.key for m in sm.list()] == ["free", "other"]
    rejected(sm, JobObjectsDeleted(""), "empty job id")


def test_job_index_follows_replacement() -> None:
    sm = StorageStateMachine()
    put(sm, meta("k", 1, job="j1"))
    put(sm, meta("k", 2, job="j2"))  # the key now belongs to j2
    assert sm.apply_command(JobObjectsDeleted("j1")).removed == []
    assert [m.oid for m in sm.apply_command(JobObjectsDeleted("j2")).removed] == [oid(2)]


def test_prefix_deleted_by_age_and_kept_jobs() -> None:
    sm = StorageStateMachine()
    put(sm, meta("tmp/a", 1, created_at=1.0))
    put(sm, meta("tmp/b", 2, created_at=5.0))  # too young
    put(sm, meta("tmp/c", 3, created_at=1.0, job="running"))  # its job still runs
    put(sm, meta("tmp/d", 4, created_at=1.0, job="done"))
    put(sm, meta("tmpx", 5, created_at=1.0))  # not under "tmp/"
    put(sm, meta("keep/a", 6, created_at=1.0))
    res = sm.apply_command(PrefixDeleted("tmp/", 3.0, ["running"]))
    assert res.accepted and not res.more
    assert [m.key for m in res.removed] == ["tmp/a", "tmp/d"]
    assert [m.key for m in sm.list()] == ["keep/a", "tmp/b", "tmp/c", "tmpx"]
    rejected(sm, PrefixDeleted("", 10.0), "empty prefix")
    big = StorageStateConfig(keep_jobs_max=1)
    sm2 = StorageStateMachine(big)
    rejected(sm2, PrefixDeleted("t", 1.0, ["a", "b"]), "keep_jobs")


@pytest.mark.parametrize(("deletes", "scan"), [(2, 1000), (1000, 3), (2, 3)])
def test_prefix_deleted_resumes_from_the_cursor(deletes: int, scan: int) -> None:
    cfg = StorageStateConfig(deletes_per_command_max=deletes, scan_per_command_max=scan)
    sm = StorageStateMachine(cfg)
    for i in range(10):
        put(sm, meta(f"t/{i:02d}", i + 1, created_at=float(i % 2)))  # odd ones too young
    put(sm, meta("u", 99))
    removed: list[str] = []
    after, rounds = "", 0
    while True:
        rounds += 1
        res = sm.apply_command(PrefixDeleted("t/", 1.0, start_after=after))
        assert len(res.removed) <= deletes
        removed += [m.key for m in res.removed]
        if not res.more:
            break
        after = res.cursor
    assert removed == [f"t/{i:02d}" for i in range(0, 10, 2)]
    assert rounds > 1
    assert [m.key for m in sm.list()] == [f"t/{i:02d}" for i in range(1, 10, 2)] + ["u"]


# ------------------------------------------------------------------ queries


def test_list_prefix_start_after_limit_and_list_max() -> None:
    sm = StorageStateMachine(StorageStateConfig(list_max=3))
    for i, k in enumerate(["b/2", "a", "b/1", "b/3", "b/4", "c", "b"]):
        put(sm, meta(k, i + 1))
    assert [m.key for m in sm.list("b/")] == ["b/1", "b/2", "b/3"]  # list_max
    assert [m.key for m in sm.list("b/", start_after="b/2")] == ["b/3", "b/4"]
    assert [m.key for m in sm.list("b/", limit=1)] == ["b/1"]
    assert [m.key for m in sm.list("", start_after="b/4", limit=10)] == ["c"]
    assert [m.key for m in sm.list("b", start_after="a")] == ["b", "b/1", "b/2"]
    assert sm.list("zz") == [] and sm.list(limit=0) == [] and sm.list(limit=-5) == []


def test_node_queries() -> None:
    sm = StorageStateMachine()
    put(sm, meta("x", 1, ["a", "b"], size=5, want=2))
    put(sm, meta("y", 2, ["b", "c"], size=7, want=2))
    put(sm, meta("z", 3, ["c"], size=1, want=1))
    assert sm.bytes_by_node() == {"a": 5, "b": 12, "c": 8}
    assert [m.key for m in sm.objects_on("b")] == ["x", "y"]
    assert sm.objects_on("nowhere") == []
    assert [m.key for m in sm.under_replicated({"a", "b", "c"})] == []
    assert [m.key for m in sm.under_replicated({"a", "c"})] == ["x", "y"]
    assert [m.key for m in sm.under_replicated({"b"})] == ["z"]  # 1 live node: want 1
    assert [m.key for m in sm.under_replicated(set())] == ["x", "y", "z"]  # all lost
    assert [m.key for m in sm.under_replicated(set(), limit=1)] == ["x"]


def test_objects_on_down_nodes_through_the_index() -> None:
    """What metrics and the dashboard poll: the index finds the objects a down node
    held (without reading every object), split by whether a live copy is left."""
    sm = StorageStateMachine()
    put(sm, meta("x", 1, ["a", "b"]))
    put(sm, meta("y", 2, ["b", "c"]))
    put(sm, meta("z", 3, ["c"], want=1))
    assert sm.copies_down({"a", "b", "c"}) == (0, 0)
    assert sm.copies_down({"a", "b"}) == (1, 1)  # y still on b; z only on c
    assert sm.copies_down({"a"}) == (1, 2)  # x on a; y and z lost
    under, lost = sm.on_down_nodes({"a"}, limit=10)
    assert ([m.key for m in under], [m.key for m in lost]) == (["x"], ["y", "z"])
    under, lost = sm.on_down_nodes(set(), limit=2)
    assert (under, [m.key for m in lost]) == ([], ["x", "y"])  # the first by key


# ------------------------------------------------------------------ encoding


def test_commands_round_trip_and_other_machines_bytes_are_rejected() -> None:
    cmds: list[StorageCommand] = [
        ObjectPut(meta("k", 1), True),
        ObjectDeleted("k", oid(1)),
        ReplicaAdded(oid(1), "n"),
        ReplicaDropped(oid(1), "n"),
        JobObjectsDeleted("j"),
        PrefixDeleted("p/", 1.5, ["j"], "p/a"),
    ]
    for cmd in cmds:
        data = encode_storage_command(cmd)
        assert decode_storage_command(data) == cmd
        # ...and the other machines of the coordinator's log refuse storage bytes.
        with pytest.raises(ValueError):
            decode_command(data)
        with pytest.raises(msgspec.DecodeError):
            decode_kv(data)
    others = [
        encode_command(JobSubmitted("j", b"", JobOptions())),
        encode_command(JobDeleted("j")),
        encode_kv(OpenSession()),
        encode_kv(Request(1, 1, 1, Put("k", "v"))),
        msgspec.msgpack.encode({"type": "LeaderElected", "node": 1}),
        b"\xc1garbage",
        b"",
    ]
    sm = StorageStateMachine()
    for data in others:
        with pytest.raises(ValueError):
            decode_storage_command(data)
        before = sm.snapshot()
        res = decode_storage_result(sm.apply(data))
        assert not res.accepted and sm.snapshot() == before


def test_apply_bytes_interface() -> None:
    sm = StorageStateMachine()
    res = decode_storage_result(sm.apply(encode_storage_command(ObjectPut(meta("k", 1)))))
    assert res == StorageResult(True)
    res = decode_storage_result(sm.apply(encode_storage_command(ObjectDeleted("k"))))
    assert res.accepted and res.removed[0].oid == oid(1)


def test_snapshot_restore_round_trip() -> None:
    sm = StorageStateMachine()
    for i in range(50):
        put(sm, meta(f"k{(i * 37) % 50:03d}", i + 1, [f"n{i % 3}"], job=f"j{i % 4}"))
    snap = sm.snapshot()
    other = StorageStateMachine()
    other.restore(snap)
    assert other.snapshot() == snap
    assert other.objects == sm.objects
    assert other.list(limit=100) == sm.list(limit=100)
    assert other.bytes_by_node() == sm.bytes_by_node()
    assert other.objects_on("n1") == sm.objects_on("n1")
    # The derived indexes work after a restore.
    assert other.apply_command(JobObjectsDeleted("j1")).removed == (
        sm.apply_command(JobObjectsDeleted("j1")).removed
    )
    assert other.snapshot() == sm.snapshot()
    other.restore(StorageStateMachine().snapshot())
    assert other.total_objects == 0 and other.by_oid(oid(1)) is None


def test_restore_rejects_an_inconsistent_snapshot() -> None:
    from lepton_ai.storage.meta import _Snapshot

    bad = msgspec.msgpack.encode(_Snapshot([meta("b", 1), meta("a", 2)]))
    with pytest.raises(ValueError):
        StorageStateMachine().restore(bad)
    dup = msgspec.msgpack.encode(_Snapshot([meta("a", 1), meta("b", 1)]))
    with pytest.raises(ValueError):
        StorageStateMachine().restore(dup)


# ------------------------------------------------------------------ property

_KEYS = st.sampled_from(["a", "a/b", "a/c", "b", "tmp/x", "tmp/y", "tmp/z", "z"])
_NODES = st.sampled_from(["n1", "n2", "n3", "n4"])
_OIDS = st.integers(1, 10).map(oid)
_JOBS = st.sampled_from(["", "j1", "j2"])


@st.composite
def _metas(draw: st.DrawFn) -> ObjectMeta:
    """Mostly valid metas (so most puts land), sometimes an invalid field."""
    valid = draw(st.integers(0, 4)) > 0
    return ObjectMeta(
        key=draw(_KEYS),
        oid=oid(draw(st.integers(1, 40))),
        size=draw(st.integers(0, 100) if valid else st.integers(-1, 0)),
        crc=0,
        chunk_bytes=4,
        replicas=draw(st.lists(_NODES, min_size=1, max_size=3, unique=True))
        if valid
        else draw(st.lists(_NODES, max_size=3)),
        want=draw(st.integers(1, 3) if valid else st.integers(0, 3)),
        created_at=draw(st.floats(0, 10)),
        job=draw(_JOBS),
    )


_COMMANDS = st.one_of(
    st.builds(ObjectPut, _metas(), st.booleans()),
    st.builds(ObjectPut, _metas(), st.just(False)),
    st.builds(ObjectPut, _metas(), st.just(False)),
    st.builds(ObjectDeleted, _KEYS, st.one_of(st.just(""), _OIDS)),
    st.builds(ReplicaAdded, _OIDS, _NODES),
    st.builds(ReplicaDropped, _OIDS, _NODES),
    st.builds(JobObjectsDeleted, _JOBS),
    st.builds(
        PrefixDeleted,
        st.sampled_from(["a", "tmp/", "tmp/", "", "b"]),
        st.floats(0, 10),
        st.lists(_JOBS, max_size=2),
        st.one_of(st.just(""), _KEYS),
    ),
)


def _aim(cmd: StorageCommand, pick: int, sm: StorageStateMachine) -> StorageCommand:
    """Point a command at a stored object (pick >= 0), so that most of them land."""
    metas = sm.list(limit=100)
    if pick < 0 or not metas:
        return cmd
    m = metas[pick % len(metas)]
    if isinstance(cmd, ObjectDeleted):
        return ObjectDeleted(m.key, m.oid if cmd.oid else "")
    if isinstance(cmd, ReplicaAdded):
        return ReplicaAdded(m.oid, cmd.node)
    if isinstance(cmd, ReplicaDropped):
        node = m.replicas[pick % len(m.replicas)] if m.replicas and pick % 2 else cmd.node
        return ReplicaDropped(m.oid, node)
    return cmd


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(_COMMANDS, st.integers(-3, 20)), min_size=10, max_size=60),
    st.integers(0, 60),
)
def test_replicas_agree_with_a_snapshot_restore_midway(
    steps: list[tuple[StorageCommand, int]], cut: int
) -> None:
    cfg = StorageStateConfig(objects_max=4, deletes_per_command_max=1, scan_per_command_max=2)
    one, two = StorageStateMachine(cfg), StorageStateMachine(cfg)
    for i, (template, pick) in enumerate(steps):
        cmd = _aim(template, pick, one)
        if i == cut:
            fresh = StorageStateMachine(cfg)
            fresh.restore(two.snapshot())
            two = fresh
        data = encode_storage_command(cmd)
        before = one.snapshot()
        r1, r2 = one.apply(data), two.apply(data)
        assert r1 == r2
        res = decode_storage_result(r1)
        if not res.accepted:
            assert one.snapshot() == before
        # The derived indexes agree with the objects at every step.
        nodes: dict[str, int] = {}
        for m in one.objects.values():
            assert one.by_oid(m.oid) == m
            for n in m.replicas:
                nodes[n] = nodes.get(n, 0) + m.size
        assert one.bytes_by_node() == dict(sorted(nodes.items()))
        assert [m.key for m in one.list(limit=100)] == sorted(one.objects)
    assert one.snapshot() == two.snapshot()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 60)), max_size=200), st.integers(0, 61))
def test_sorted_keys_match_a_sorted_list(ops: list[tuple[bool, int]], probe: int) -> None:
    keys, model = SortedKeys(block=2), set[str]()
    for add, n in ops:
        k = f"{n:02d}"
        if add and k not in model:
            keys.add(k)
            model.add(k)
        elif not add and k in model:
            keys.remove(k)
            model.discard(k)
        assert list(keys) == sorted(model) and len(keys) == len(model)
    lo = f"{probe:02d}"
    assert list(keys.from_key(lo, inclusive=True)) == [k for k in sorted(model) if k >= lo]
    assert list(keys.from_key(lo, inclusive=False)) == [k for k in sorted(model) if k > lo]
    rebuilt = SortedKeys(sorted(model), block=3)
    assert list(rebuilt) == sorted(model)
    assert list(rebuilt.from_key(lo, inclusive=True)) == [k for k in sorted(model) if k >= lo]
