"""reduce() over many partitions merges its partials as a tree, in partition order."""

from __future__ import annotations

import operator

from lepton_ai.compute.api import DistributedTask
from lepton_ai.compute.plan import REDUCE_FAN_IN, JobOptions, decode_plan, partial_bucket
from lepton_ai.compute.run_task import run_local


class _Runner:  # plans only: nothing is submitted
    def submit_plan(self, plan: bytes, options: JobOptions) -> str:
        raise AssertionError("not submitted in these tests")


def _task() -> DistributedTask:
    return DistributedTask(_Runner())


def test_many_partitions_merge_through_an_intermediate_stage_in_order() -> None:
    t = _task()
    n = REDUCE_FAN_IN * 3 + 1
    ds = t.parallelize([str(i) for i in range(200)], n)
    plan = decode_plan(ds.plan_bytes("reduce", operator.concat))  # not commutative
    assert [s.num_partitions for s in plan.stages] == [n, 4, 1]
    assert all(s.shuffle_write is not None for s in plan.stages[:-1])
    assert run_local(plan) == "".join(str(i) for i in range(200))


def test_tree_handles_empty_partitions_and_the_default_op() -> None:
    t = _task()
    plan = decode_plan(t.parallelize(range(5), 40).plan_bytes("reduce", None))
    assert len(plan.stages) == 3
    assert run_local(plan) == 10
    empty = decode_plan(t.parallelize([], 40).plan_bytes("reduce", None))
    assert run_local(empty) == 0


def test_partial_buckets_are_contiguous_and_cover_every_group() -> None:
    for n in (17, 33, 64, 1000):
        groups = -(-n // REDUCE_FAN_IN)
        owners = [partial_bucket(p, n, groups) for p in range(n)]
        assert owners == sorted(owners) and set(owners) == set(range(groups))


def test_counter_partials_round_trip_and_fall_back_to_pickle() -> None:
    from collections import Counter

    from lepton_ai.compute.run_task import decode_bucket, encode_partial

    for counts in (
        Counter({"a": 3, "b": 1}),
        Counter({1: 2, "x": -5}),
        Counter({"big": 2**70}),  # beyond MessagePack: pickled
        Counter({"f": 0.5}),  # not an int count: pickled
        Counter(),
    ):
        data = encode_partial((counts,))
        back = decode_bucket(data)
        assert back == (counts,) and type(back[0]) is Counter
        assert list(back[0].items()) == list(counts.items())
    assert encode_partial((Counter({"a": 1}),))[:1] == b"C"
    assert encode_partial((Counter({"a": 2**70}),))[:1] == b"P"
