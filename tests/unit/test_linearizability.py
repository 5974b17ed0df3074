"""The linearizability checker on known good and known bad KV histories."""

from __future__ import annotations

import random

import pytest

from lepton_ai.sim.linearizability import Operation, check_history, check_key


def put(c: int, key: str, v: object, call: float, ret: float | None) -> Operation:
    return Operation(c, "put", key, call, ret, value=v)


def get(c: int, key: str, out: object, call: float, ret: float | None) -> Operation:
    return Operation(c, "get", key, call, ret, output=out)


def cas(  # noqa: PLR0917
    c: int, key: str, exp: object, new: object, ok: bool | None, call: float, ret: float | None
) -> Operation:
    return Operation(c, "cas", key, call, ret, value=new, expected=exp, output=ok)


def test_sequential_history_is_linearizable() -> None:
    h = [put(0, "k", 1, 0, 1), get(0, "k", 1, 2, 3), put(0, "k", 2, 4, 5), get(1, "k", 2, 6, 7)]
    assert check_history(h).ok is True


def test_concurrent_read_may_see_either_value() -> None:
    # get overlaps put(2): both 1 and 2 are fine.
    for seen in (1, 2):
        h = [put(0, "k", 1, 0, 1), put(0, "k", 2, 2, 5), get(1, "k", seen, 3, 4)]
        assert check_history(h).ok is True


def test_stale_read_is_not_linearizable() -> None:
    h = [put(0, "k", 1, 0, 1), put(0, "k", 2, 2, 3), get(1, "k", 1, 4, 5)]
    res = check_history(h)
    assert res.ok is False
    assert res.key == "k"


def test_lost_write_is_not_linearizable() -> None:
    # An acknowledged put that a later read does not see (value never written).
    h = [put(0, "k", 1, 0, 1), put(1, "j", 5, 0, 1), get(2, "k", None, 2, 3)]
    res = check_history(h)
    assert res.ok is False
    assert res.key == "k"


def test_duplicated_write_is_not_linearizable() -> None:
    # put(1) once, then put(2) acknowledged, then a read sees 1 again: the first
    # put was applied a second time (a retry applied twice).
    h = [put(0, "k", 1, 0, 1), put(1, "k", 2, 2, 3), get(2, "k", 1, 4, 5), get(2, "k", 2, 6, 7)]
    assert check_history(h).ok is False


def test_cas_applied_twice_is_detected() -> None:
    # Two cas(None -> x) from different clients can't both succeed.
    h = [cas(0, "k", None, "a", True, 0, 2), cas(1, "k", None, "b", True, 1, 3)]
    assert check_history(h).ok is False
    h_ok = [cas(0, "k", None, "a", True, 0, 2), cas(1, "k", None, "b", False, 1, 3)]
    assert check_history(h_ok).ok is True


def test_unknown_outcome_may_or_may_not_have_taken_effect() -> None:
    # A put whose client timed out: a later read may see it...
    seen = [put(0, "k", 1, 0, 1), put(1, "k", 2, 2, None), get(2, "k", 2, 10, 11)]
    assert check_history(seen).ok is True
    # ...or not.
    unseen = [put(0, "k", 1, 0, 1), put(1, "k", 2, 2, None), get(2, "k", 1, 10, 11)]
    assert check_history(unseen).ok is True
    # But it cannot take effect before it was called.
    early = [put(0, "k", 1, 0, 1), get(2, "k", 2, 1.5, 1.8), put(1, "k", 2, 2, None)]
    assert check_history(early).ok is False
    # And once seen, it cannot be un-seen (it takes effect at one point).
    flip = [*seen, get(2, "k", 1, 12, 13)]
    assert check_history(flip).ok is False
    # An unanswered cas may have swapped or not.
    c = [put(0, "k", "a", 0, 1), cas(1, "k", "a", "b", None, 2, None), get(0, "k", "b", 5, 6)]
    assert check_history(c).ok is True


def test_delete_and_initial_state() -> None:
    h = [Operation(0, "delete", "k", 0, 1), get(1, "k", None, 2, 3)]
    assert check_history(h, initial={"k": 7}).ok is True
    assert check_history([get(1, "k", 7, 0, 1)], initial={"k": 7}).ok is True
    assert check_history([get(1, "k", 7, 0, 1)]).ok is False


def test_unhashable_values_are_compared_by_content() -> None:
    h = [put(0, "k", {"a": [1, 2]}, 0, 1), get(1, "k", {"a": [1, 2]}, 2, 3)]
    assert check_history(h).ok is True


def test_bad_operations_rejected() -> None:
    with pytest.raises(ValueError):
        Operation(0, "append", "k", 0, 1)
    with pytest.raises(ValueError):
        Operation(0, "put", "k", 5, 1)


def test_search_bound_gives_unknown_not_a_guess() -> None:
    ops = [put(i, "k", i, 0, 100) for i in range(12)] + [get(99, "k", -1, 101, 102)]
    verdict, steps = check_key(ops, steps_max=50)
    assert verdict is None
    assert steps > 50


def _random_linearizable_history(rng: random.Random, n: int) -> list[Operation]:
    """Simulate a real register: each op takes effect at a point inside [call, ret]."""
    points = sorted(rng.uniform(0, 100) for _ in range(n))
    state: dict[str, object] = {}
    ops = []
    for i, t in enumerate(points):
        key = rng.choice("ab")
        call, ret = t - rng.uniform(0, 5), t + rng.uniform(0, 5)
        kind = rng.choice(["put", "get", "cas", "delete"])
        if kind == "put":
            ops.append(put(i, key, i, call, ret))
            state[key] = i
        elif kind == "get":
            ops.append(get(i, key, state.get(key), call, ret))
        elif kind == "delete":
            ops.append(Operation(i, "delete", key, call, ret))
            state.pop(key, None)
        else:
            exp = rng.choice([None, state.get(key), -5])
            ok = state.get(key) == exp
            ops.append(cas(i, key, exp, i, ok, call, ret))
            if ok:
                state[key] = i
    return ops


def test_random_real_executions_are_accepted_and_tampering_detected() -> None:
    rng = random.Random(7)
    rejected = 0
    for _ in range(60):
        h = _random_linearizable_history(rng, 40)
        assert check_history(h).ok is True
        # Tamper: a read after everything returns a value that was overwritten long before.
        last = max(op.ret or 0 for op in h)
        puts = [op for op in h if op.kind == "put" and op.key == "a"]
        if len(puts) >= 2:
            stale = [
                *h,
                put(98, "a", "fresh", last + 1, last + 2),
                get(99, "a", puts[0].value, last + 3, last + 4),
            ]
            assert check_history(stale).ok is False
            rejected += 1
    assert rejected > 10
