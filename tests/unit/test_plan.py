"""Plan building: fusion of narrow ops, stage cuts at shuffles, encoding, validation."""

from __future__ import annotations

import operator
import threading
from typing import Any

import msgspec
import pytest

from lepton_ai.compute.api import DistributedTask
from lepton_ai.compute.plan import (
    JobOptions,
    JobPlan,
    ShuffleRead,
    decode_plan,
    encode_plan,
    finalize,
    validate_plan,
)


class _Runner:
    def __init__(self) -> None:
        self.submitted: list[tuple[bytes, JobOptions]] = []

    def submit_plan(self, plan: bytes, options: JobOptions) -> str:
        self.submitted.append((plan, options))
        return f"job-{len(self.submitted)}"


def _task() -> DistributedTask:
    return DistributedTask(_Runner())


def test_narrow_ops_fuse_into_one_stage() -> None:
    ds = _task().parallelize(range(100), 4).map(str).filter(bool).flat_map(list)
    plan = decode_plan(ds.map_partitions(list).plan_bytes("count"))
    assert len(plan.stages) == 1
    stage = plan.stages[0]
    assert stage.num_partitions == 4 and stage.result is not None
    assert [n.split("(")[0] for n in stage.op_names] == [
        "map",
        "filter",
        "flat_map",
        "map_partitions",
    ]


def test_each_shuffle_cuts_a_stage() -> None:
    ds = (
        _task()
        .parallelize(range(10), 3)
        .map(lambda x: (x, 1))
        .reduce_by_key(operator.add, partitions=5)
        .map(lambda kv: (kv[1], kv[0]))
        .group_by_key(partitions=2)
        .filter(bool)
    )
    plan = decode_plan(ds.plan_bytes("collect"))
    assert [s.num_partitions for s in plan.stages] == [3, 5, 2]
    s0, s1, s2 = plan.stages
    assert s0.shuffle_write is not None and s0.shuffle_write.mode == "reduce"
    assert s0.shuffle_write.num_buckets == 5 and s0.shuffle_write.op is not None
    assert s1.shuffle_read == ShuffleRead(0, 3, "reduce", s0.shuffle_write.op)
    assert s1.shuffle_write is not None and s1.shuffle_write.mode == "group"
    assert s2.shuffle_read is not None and s2.shuffle_read.num_maps == 5
    assert s2.result is not None and s2.result.kind == "collect" and len(s2.op_names) == 1
    assert "stage 2[2]" in plan.describe()


def test_default_shuffle_partitions_follow_the_input() -> None:
    ds = _task().parallelize(range(10), 6).map(lambda x: (x, x)).group_by_key()
    assert ds.num_partitions == 6
    assert len(decode_plan(ds.plan_bytes()).stages[1].op_names) == 0


def test_encode_decode_round_trip_and_garbage() -> None:
    ds = _task().parallelize(["a", "b"], 2).map(str.upper)
    plan = decode_plan(ds.plan_bytes())
    assert decode_plan(encode_plan(plan)) == plan
    with pytest.raises(ValueError, match="malformed"):
        decode_plan(b"\x00garbage")


def test_validate_rejects_inconsistent_plans() -> None:
    plan = decode_plan(
        _task().parallelize(range(4), 2).map(lambda x: (x, 1)).group_by_key(3).plan_bytes()
    )
    s0, s1 = plan.stages
    with pytest.raises(ValueError):
        validate_plan(JobPlan([s1, s0]))
    with pytest.raises(ValueError):
        validate_plan(JobPlan([msgspec.structs.replace(s0, num_partitions=5), s1]))
    with pytest.raises(ValueError):
        validate_plan(JobPlan([]))
    with pytest.raises(ValueError):
        validate_plan(JobPlan([s0, msgspec.structs.replace(s1, num_partitions=2)]))


def test_unpicklable_function_fails_at_submit_with_type_error() -> None:
    lock = threading.Lock()
    runner = _Runner()
    ds = DistributedTask(runner).parallelize(range(3), 1).map(lambda x: (lock, x))
    with pytest.raises(TypeError, match="cannot be pickled"):
        ds.submit()
    assert runner.submitted == []


def test_finalize_semantics() -> None:
    t = _task()
    import pickle

    collect = decode_plan(t.parallelize(range(4), 2).plan_bytes("collect"))
    assert finalize(collect, [pickle.dumps([0, 1]), pickle.dumps([2, 3])]) == [0, 1, 2, 3]
    count = decode_plan(t.parallelize(range(4), 2).plan_bytes("count"))
    assert finalize(count, [pickle.dumps(3), pickle.dumps(4)]) == 7
    red = decode_plan(t.parallelize(range(4), 2).plan_bytes("reduce", None))
    assert finalize(red, [pickle.dumps(())]) == 0
    assert finalize(red, [pickle.dumps((None,))]) is None
    mx = decode_plan(t.parallelize(range(4), 2).plan_bytes("reduce", max))
    with pytest.raises(ValueError, match="empty"):
        finalize(mx, [pickle.dumps(())])
    with pytest.raises(ValueError):
        finalize(mx, [pickle.dumps(()), pickle.dumps(())])


def test_reduce_merges_partials_in_one_final_task_in_partition_order() -> None:
    t = _task()
    ds = t.parallelize([str(i) for i in range(30)], 7)
    plan = decode_plan(ds.plan_bytes("reduce", operator.concat))  # associative, not commutative
    assert [s.num_partitions for s in plan.stages] == [7, 1]
    assert plan.stages[0].shuffle_write is not None
    assert plan.stages[0].shuffle_write.mode == "partial"
    assert run_local(plan) == "".join(str(i) for i in range(30))
    single = decode_plan(t.parallelize(range(5), 1).plan_bytes("reduce", None))
    assert len(single.stages) == 1  # one partition: nothing to merge
    assert run_local(single) == 10
    empty = decode_plan(t.parallelize([], 3).plan_bytes("reduce", None))
    assert run_local(empty) == 0


# --- property: any chain of operations plans into (shuffles + 1) stages and computes
# --- what a plain-Python interpreter of the same chain computes.
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lepton_ai.compute.run_task import run_local  # noqa: E402


def _key7(x: int) -> tuple[int, int]:
    return (x % 7, x)


def _fold_kv(kv: tuple[int, Any]) -> int:
    k, v = kv
    return k * 1000 + (v if isinstance(v, int) else len(v))


def _twice(x: int) -> list[int]:
    return [x, x + 1]


def _plus_one_all(it: Any) -> Any:
    return (x + 1 for x in it)


NARROW = {
    "map": (lambda ds: ds.map(abs), lambda xs: [abs(x) for x in xs]),
    "filter": (lambda ds: ds.filter(bool), lambda xs: [x for x in xs if x]),
    "flat_map": (lambda ds: ds.flat_map(_twice), lambda xs: [y for x in xs for y in _twice(x)]),
    "map_partitions": (lambda ds: ds.map_partitions(_plus_one_all), lambda xs: [x + 1 for x in xs]),
}


def _ref_reduce(xs: list[int]) -> list[int]:
    acc: dict[int, int] = {}
    for k, v in map(_key7, xs):
        acc[k] = acc.get(k, 0) + v
    return [_fold_kv(kv) for kv in acc.items()]


def _ref_group(xs: list[int]) -> list[int]:
    acc: dict[int, list[int]] = {}
    for k, v in map(_key7, xs):
        acc.setdefault(k, []).append(v)
    return [_fold_kv(kv) for kv in acc.items()]


SHUFFLE = {
    "reduce_by_key": (
        lambda ds, n: ds.map(_key7).reduce_by_key(operator.add, n).map(_fold_kv),
        _ref_reduce,
    ),
    "group_by_key": (lambda ds, n: ds.map(_key7).group_by_key(n).map(_fold_kv), _ref_group),
}


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(-20, 20), max_size=30),
    st.integers(1, 4),
    st.lists(
        st.tuples(st.sampled_from(sorted(NARROW) + sorted(SHUFFLE)), st.integers(1, 4)),
        max_size=6,
    ),
)
def test_any_chain_plans_and_computes_like_python(
    xs: list[int], parts: int, chain: list[tuple[str, int]]
) -> None:
    ds = _task().parallelize(xs, parts)
    want = list(xs)
    shuffles = 0
    for name, n in chain:
        if name in NARROW:
            build, ref = NARROW[name]
            ds = build(ds)
        else:
            shuffles += 1
            build_s, ref = SHUFFLE[name]
            ds = build_s(ds, n)
        want = ref(want)
    plan = decode_plan(ds.plan_bytes("collect"))
    assert len(plan.stages) == shuffles + 1
    narrow_ops = sum(len(s.op_names) for s in plan.stages)
    assert narrow_ops == len(chain) + shuffles  # a shuffle entry adds a map before and after
    assert sorted(run_local(plan)) == sorted(want)
