"""The KV state machine: operations, exactly-once sessions, bounded session table, snapshots."""

from __future__ import annotations

import pytest

from lepton_ai.consensus.kv import (
    Cas,
    Delete,
    Get,
    KvConfig,
    KvMachine,
    KvResult,
    Noop,
    OpenSession,
    Put,
    Request,
    decode_result,
    encode_command,
)


def _open(m: KvMachine) -> int:
    return decode_result(m.apply(encode_command(OpenSession()))).session


def _do(m: KvMachine, sid: int, seq: int, op: object, ack_below: int | None = None) -> KvResult:
    ack = seq if ack_below is None else ack_below
    return decode_result(m.apply(encode_command(Request(sid, seq, ack, op))))  # type: ignore[arg-type]


def test_put_get_delete_cas() -> None:
    m = KvMachine()
    s = _open(m)
    assert _do(m, s, 1, Put("a", "1")) == KvResult(found=False)
    assert _do(m, s, 2, Put("a", "2")) == KvResult(found=True, value="1")
    assert _do(m, s, 3, Get("a")) == KvResult(found=True, value="2")
    assert m.read(Get("a")).value == "2"
    assert _do(m, s, 4, Cas("a", "1", "x")) == KvResult(ok=False, found=True, value="2")
    assert _do(m, s, 5, Cas("a", "2", "3")).ok
    assert m.read(Get("a")).value == "3"
    assert _do(m, s, 6, Cas("b", None, "new")).ok  # None = "absent"
    assert not _do(m, s, 7, Cas("b", None, "again")).ok
    assert _do(m, s, 8, Delete("a")) == KvResult(found=True, value="3")
    assert _do(m, s, 9, Delete("a")) == KvResult(found=False)
    assert not m.read(Get("a")).found
    assert _do(m, s, 10, Put("v", {"n": [1, 2], "b": b"\x00"})).ok
    assert m.read(Get("v")).value == {"n": [1, 2], "b": b"\x00"}


def test_retry_takes_effect_once_and_returns_first_result() -> None:
    m = KvMachine()
    s = _open(m)
    first = _do(m, s, 1, Cas("k", None, "v1"), ack_below=1)
    assert first.ok
    _do(m, s, 2, Put("other", 1), ack_below=1)
    # A retried seq 1 (the client timed out and resent) returns the cached result...
    assert _do(m, s, 1, Cas("k", None, "v1"), ack_below=1) == first
    # ...even though re-executing it now would fail.
    assert m.read(Get("k")).value == "v1"
    # A duplicated put must not clobber a later write.
    _do(m, s, 3, Put("x", "a"), ack_below=3)
    _do(m, s, 4, Put("x", "b"), ack_below=3)
    _do(m, s, 3, Put("x", "a"), ack_below=3)
    assert m.read(Get("x")).value == "b"


def test_acknowledged_results_are_dropped_and_stale_requests_refused() -> None:
    m = KvMachine()
    s = _open(m)
    for seq in range(1, 6):
        _do(m, s, seq, Put("k", seq), ack_below=1)
    _do(m, s, 6, Put("k", 6), ack_below=6)  # client saw 1..5
    assert _do(m, s, 2, Put("k", 2), ack_below=6).error == "stale"
    assert m.read(Get("k")).value == 6


def test_session_table_is_bounded_lru() -> None:
    m = KvMachine(KvConfig(sessions_max=3))
    a, b, c = _open(m), _open(m), _open(m)
    _do(m, a, 1, Put("k", "a"))  # a is now most recently used
    d = _open(m)  # evicts b, the least recently used
    assert m.session_count == 3
    assert m.evictions == 1
    assert _do(m, b, 1, Put("k", "b")).error == "session_expired"
    assert m.read(Get("k")).value == "a"
    for sid in (a, c, d):
        assert _do(m, sid, 2, Get("k")).error is None
    assert _do(m, 999, 1, Put("k", "z")).error == "session_expired"


def test_in_flight_results_per_session_bounded() -> None:
    m = KvMachine(KvConfig(results_per_session_max=2))
    s = _open(m)
    _do(m, s, 1, Put("a", 1), ack_below=1)
    _do(m, s, 2, Put("a", 2), ack_below=1)
    assert _do(m, s, 3, Put("a", 3), ack_below=1).error == "too_many_in_flight"
    assert m.read(Get("a")).value == 2
    assert _do(m, s, 3, Put("a", 3), ack_below=3).error is None


def test_bad_commands_change_nothing_and_are_deterministic() -> None:
    m = KvMachine(KvConfig(key_bytes_max=4, value_bytes_max=16))
    s = _open(m)
    before = m.snapshot()
    assert decode_result(m.apply(b"\xc1garbage")).error is not None
    assert _do(m, s, 1, Put("toolongkey", 1)).error == "too_large: key"
    assert _do(m, s, 2, Put("k", "x" * 100)).error == "too_large: value"
    assert _do(m, s, 3, Put("k", None)).error == "none_value"
    assert len(m) == 0
    assert decode_result(m.apply(encode_command(Noop()))).ok
    assert m.snapshot() != before  # only counters and the session cache changed
    with pytest.raises(ValueError):
        KvConfig(sessions_max=0)


def test_snapshot_restore_round_trip_keeps_sessions() -> None:
    m = KvMachine()
    s = _open(m)
    res = _do(m, s, 1, Cas("k", None, "v"), ack_below=1)
    m2 = KvMachine()
    m2.restore(m.snapshot())
    assert m2.read(Get("k")).value == "v"
    assert _do(m2, s, 1, Cas("k", None, "v"), ack_below=1) == res  # dedup survives restore
    _do(m, s, 1, Cas("k", None, "v"), ack_below=1)
    assert _open(m2) == _open(m)  # same next session id on both
    assert m2.snapshot() == m.snapshot()


def test_out_of_order_acknowledged_results_are_swept_when_cache_is_full() -> None:
    m = KvMachine(KvConfig(results_per_session_max=3))
    s = _open(m)
    _do(m, s, 2, Put("a", 2), ack_below=1)  # seq 2 overtook seq 1 (a retry)
    _do(m, s, 1, Put("b", 1), ack_below=1)
    _do(m, s, 3, Put("a", 3), ack_below=2)  # client saw seq 1: its result can go
    assert _do(m, s, 4, Put("a", 4), ack_below=2).error is None
    assert m.read(Get("a")).value == 4
