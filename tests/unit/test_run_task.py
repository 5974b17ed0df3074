"""Executor-side task execution: results equal plain Python, bucket format, error kinds."""

from __future__ import annotations

import collections
import operator
import pickle
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lepton_ai.compute.api import DistributedTask
from lepton_ai.compute.plan import JobOptions, decode_plan
from lepton_ai.compute.run_task import (
    CorruptInput,
    UserCodeError,
    decode_bucket,
    encode_bucket,
    run_local,
    run_task,
)


class _Runner:
    def submit_plan(self, plan: bytes, options: JobOptions) -> str:
        raise AssertionError("not submitted in these tests")


T = DistributedTask(_Runner())


def _run(ds: Any, action: str = "collect", op: Any = None) -> Any:
    return run_local(decode_plan(ds.plan_bytes(action, op)))


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.text(alphabet="abc ", max_size=12), max_size=40),
    st.integers(1, 6),
    st.integers(1, 5),
)
def test_word_count_equals_counter(lines: list[str], parts: int, reducers: int) -> None:
    ds = T.parallelize(lines, parts).flat_map(str.split).map(lambda w: (w, 1))
    got = dict(_run(ds.reduce_by_key(operator.add, partitions=reducers)))
    assert got == collections.Counter(w for line in lines for w in line.split())


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(-50, 50), max_size=60), st.integers(1, 7))
def test_narrow_ops_count_reduce_and_group_equal_python(xs: list[int], parts: int) -> None:
    ds = T.parallelize(xs, parts)
    assert _run(ds.map(lambda x: x * 2).filter(lambda x: x > 0)) == [x * 2 for x in xs if x * 2 > 0]
    assert _run(ds, "count") == len(xs)
    assert _run(ds, "reduce", None) == sum(xs)
    if xs:
        assert _run(ds, "reduce", max) == max(xs)
    grouped = dict(_run(ds.map(lambda x: (x % 3, x)).group_by_key(partitions=2)))
    want: dict[int, list[int]] = collections.defaultdict(list)
    for x in xs:
        want[x % 3].append(x)
    assert {k: sorted(v) for k, v in grouped.items()} == {k: sorted(v) for k, v in want.items()}
    assert _run(ds.map_partitions(lambda it: [sum(it)]), "reduce", None) == sum(xs)


def test_numpy_partitions_and_two_shuffles() -> None:
    arr = np.arange(40).reshape(20, 2)
    assert _run(T.parallelize(arr, 3).map_partitions(lambda c: [int(c.sum())]), "reduce") == int(
        arr.sum()
    )
    assert _run(T.parallelize(arr, 4), "count") == 20
    ds = (
        T.parallelize(range(100), 4)
        .map(lambda x: (x % 10, x))
        .reduce_by_key(operator.add, 3)
        .map(lambda kv: (kv[1] % 2, kv[0]))
        .reduce_by_key(operator.add, 2)
    )
    sums = collections.Counter()
    for k in range(10):
        sums[sum(x for x in range(100) if x % 10 == k) % 2] += k
    assert dict(_run(ds)) == dict(sums)


@pytest.mark.parametrize(
    "bucket",
    [
        {},
        {"a": 1, "b": 2},
        {1: "x", 2: None, 3: True, 4: 1.5, 5: b"z"},
        {("tuple", 1): 1},
        {"big": 2**80},
        {"lst": [1, 2]},
        {frozenset({1}): {"nested": 1}},
    ],
)
def test_bucket_round_trip_keeps_types(bucket: dict[Any, Any]) -> None:
    data = encode_bucket(bucket)
    back = decode_bucket(data)
    assert back == bucket
    assert [type(v) for v in back.values()] == [type(v) for v in bucket.values()]
    assert [type(k) for k in back] == [type(k) for k in bucket]


def test_word_count_buckets_use_msgpack() -> None:
    assert encode_bucket({"w": 3})[:1] == b"M"
    assert encode_bucket({("w",): 3})[:1] == b"P"


def test_values_of_dynamic_classes_survive() -> None:
    class Point:  # a local class: plain pickle refuses it, cloudpickle ships it
        def __init__(self, x: int) -> None:
            self.x = x

        def __eq__(self, other: object) -> bool:
            return isinstance(other, Point) and other.x == self.x

        __hash__ = None  # type: ignore[assignment]

    assert _run(T.parallelize(range(3), 2).map(Point)) == [Point(0), Point(1), Point(2)]


def test_user_exception_is_user_code_error_with_traceback() -> None:
    def bad(x: int) -> int:
        if x == 7:
            raise KeyError("seven")
        return x

    plan = decode_plan(T.parallelize(range(10), 2).map(bad).plan_bytes())
    run_task(plan, 0, 0)
    with pytest.raises(UserCodeError) as info:
        run_task(plan, 0, 1)
    assert info.value.exc_type == "KeyError" and "seven" in info.value.message
    assert "in bad" in info.value.traceback
    none_plan = decode_plan(T.parallelize(range(3), 1).map_partitions(lambda it: None).plan_bytes())
    with pytest.raises(UserCodeError, match="not an iterable"):
        run_task(none_plan, 0, 0)
    pairs = decode_plan(T.parallelize(range(3), 1).reduce_by_key(operator.add).plan_bytes())
    with pytest.raises(UserCodeError):  # items are not (key, value) pairs
        run_task(pairs, 0, 0)


def test_corrupt_shuffle_input_names_its_map_partition() -> None:
    plan = decode_plan(
        T.parallelize(range(10), 3)
        .map(lambda x: (x, 1))
        .reduce_by_key(operator.add, 2)
        .plan_bytes()
    )
    good = [run_task(plan, 0, p).buckets for p in range(3)]
    inputs = [b[0] for b in good if b is not None]
    out = run_task(plan, 1, 0, inputs)
    assert out.result is not None and pickle.loads(out.result)
    with pytest.raises(CorruptInput) as info:
        run_task(plan, 1, 0, [inputs[0], b"Mgarbage\xc1", inputs[2]])
    assert info.value.map_partition == 1
    with pytest.raises(ValueError):
        run_task(plan, 1, 0, inputs[:2])
    with pytest.raises(ValueError):
        run_task(plan, 5, 0)
