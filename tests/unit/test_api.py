"""Dataset API: bad input fails at the call; actions submit the right plan and options."""

from __future__ import annotations

import operator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lepton_ai.compute.api import DistributedTask, JobRunner
from lepton_ai.compute.plan import JobOptions, decode_plan
from lepton_ai.compute.run_task import run_local


class _Submitted(Exception):
    pass


class _Runner:
    """Records what an action submits, then stops it (no cluster in a unit test)."""

    default_parallelism = 3

    def __init__(self) -> None:
        self.plans: list[tuple[bytes, JobOptions]] = []

    def submit_plan(self, plan: bytes, options: JobOptions) -> str:
        self.plans.append((plan, options))
        raise _Submitted


def _task(**kw: Any) -> tuple[DistributedTask, _Runner]:
    runner = _Runner()
    return DistributedTask(runner, **kw), runner


def test_runner_protocol_and_bad_cluster() -> None:
    assert isinstance(_Runner(), JobRunner)
    with pytest.raises(TypeError, match="cluster"):
        DistributedTask(object())
    with pytest.raises(TypeError):
        DistributedTask(_Runner(), progress="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        DistributedTask(_Runner(), max_retries=-1)


@pytest.mark.parametrize(
    ("call", "exc"),
    [
        (lambda t: t.parallelize(5), TypeError),
        (lambda t: t.parallelize("abc"), TypeError),
        (lambda t: t.parallelize([1], partitions=0), ValueError),
        (lambda t: t.parallelize([1], partitions=-2), ValueError),
        (lambda t: t.parallelize([1], partitions=2.5), TypeError),
        (lambda t: t.parallelize(range(10), partitions=10**7), ValueError),
        (lambda t: t.parallelize(np.float64(3.0)), TypeError),
        (lambda t: t.parallelize([1]).map(3), TypeError),
        (lambda t: t.parallelize([1]).filter(None), TypeError),
        (lambda t: t.parallelize([1]).flat_map("x"), TypeError),
        (lambda t: t.parallelize([1]).map_partitions(1), TypeError),
        (lambda t: t.parallelize([1]).reduce_by_key("add"), TypeError),
        (lambda t: t.parallelize([1]).reduce_by_key(operator.add, partitions=0), ValueError),
        (lambda t: t.parallelize([1]).group_by_key(partitions=0), ValueError),
        (lambda t: t.parallelize([1]).reduce(5), TypeError),
        (lambda t: t.read_text("/definitely/not/here/*.log"), FileNotFoundError),
        (lambda t: t.read_text(123), TypeError),
        (lambda t: t.read_text("x", partitions=0), ValueError),
        (lambda t: t.map(None, [1]), TypeError),
        (lambda t: t.reduce(), ValueError),
        (lambda t: t.parallelize([1]).collect(bogus=1), TypeError),
        (lambda t: t.parallelize([1]).count(progress="x"), TypeError),
        (lambda t: t.parallelize([1]).submit("sum"), ValueError),
        (lambda t: t.parallelize([1]).submit("count", max), ValueError),
        (lambda t: t.parallelize([1]).submit("reduce", 3), TypeError),
        (lambda t: t.parallelize([1]).collect(task_timeout_s=0), ValueError),
        (lambda t: t.parallelize([1]).submit(task_timeout_s=-1.5), ValueError),
        (lambda t: t.parallelize([1]).count(task_timeout_s=float("nan")), ValueError),
        (lambda t: t.parallelize([1]).count(task_timeout_s=float("inf")), ValueError),
        (lambda t: t.parallelize([1]).collect(task_timeout_s="5"), TypeError),
        (lambda t: t.parallelize([1]).collect(task_timeout_s=True), TypeError),
    ],
)
def test_bad_input_fails_at_the_call(call: Any, exc: type[Exception]) -> None:
    task, runner = _task()
    with pytest.raises(exc):
        call(task)
    assert runner.plans == []


def test_actions_submit_plans_with_merged_options() -> None:
    task, runner = _task(max_retries=5, speculation=False)
    ds = task.parallelize(range(10))
    assert ds.num_partitions == 3  # the cluster's default_parallelism
    shuffled = ds.map(abs).map(lambda x: (x, 1)).reduce_by_key(operator.add, 2)
    assert repr(shuffled) == "Dataset(partitions=2, ops=[map, map, reduce_by_key[2]])"
    with pytest.raises(_Submitted):
        ds.count(retry_exceptions=True, name="counting")
    plan, options = runner.plans[-1]
    assert options == JobOptions(
        max_retries=5, retry_exceptions=True, speculation=False, name="counting"
    )
    assert run_local(decode_plan(plan)) == 10
    with pytest.raises(_Submitted):
        ds.submit()
    assert decode_plan(runner.plans[-1][0]).result_stage.result.kind == "collect"  # type: ignore[union-attr]
    with pytest.raises(_Submitted):
        ds.submit("reduce", max, max_retries=1)
    plan, options = runner.plans[-1]
    assert run_local(decode_plan(plan)) == 9 and options.max_retries == 1


def test_task_timeout_option_defaults_overrides_and_bad_values() -> None:
    task, runner = _task(task_timeout_s=30)
    ds = task.parallelize(range(4))
    with pytest.raises(_Submitted):
        ds.collect()
    assert runner.plans[-1][1].task_timeout_s == 30
    with pytest.raises(_Submitted):
        ds.submit(task_timeout_s=0.5)
    assert runner.plans[-1][1].task_timeout_s == 0.5
    plain, plain_runner = _task()
    with pytest.raises(_Submitted):
        plain.parallelize([1]).count()
    assert plain_runner.plans[-1][1].task_timeout_s is None
    for bad, exc in [(0, ValueError), (-1, ValueError), ("1", TypeError), ([1], TypeError)]:
        with pytest.raises(exc, match="task_timeout_s"):
            DistributedTask(_Runner(), task_timeout_s=bad)
        with pytest.raises(exc, match="task_timeout_s"):
            JobOptions(task_timeout_s=bad)
    assert JobOptions().task_timeout_s is None


def test_seed_convenience_map_then_reduce() -> None:
    task, runner = _task()
    squares = task.map(lambda x: x * x, range(5), partitions=2)
    assert run_local(decode_plan(squares.plan_bytes())) == [0, 1, 4, 9, 16]
    with pytest.raises(_Submitted):
        task.reduce()
    plan = decode_plan(runner.plans[-1][0])
    assert plan.result_stage.result is not None and plan.result_stage.result.kind == "reduce"
    assert run_local(plan) == 30
    with pytest.raises(_Submitted):
        task.reduce(max)
    assert run_local(decode_plan(runner.plans[-1][0])) == 16


def test_sources_from_iterables_arrays_and_files(tmp_path: Path) -> None:
    task, _ = _task()
    gen = (i for i in range(7))
    assert run_local(decode_plan(task.parallelize(gen, 3).plan_bytes())) == list(range(7))
    arr = np.arange(12).reshape(6, 2)
    rows = run_local(decode_plan(task.parallelize(arr, 4).map(lambda r: int(r[0])).plan_bytes()))
    assert rows == [0, 2, 4, 6, 8, 10]
    (tmp_path / "a.txt").write_text("x y\nz\n")
    ds = task.read_text(str(tmp_path / "a.txt")).flat_map(str.split)
    assert run_local(decode_plan(ds.plan_bytes())) == ["x", "y", "z"]
    (tmp_path / "a.jsonl").write_text('{"k": 1}\n\n{"k": 2}\n')
    ds2 = task.read_jsonl(str(tmp_path / "a.jsonl")).map(lambda r: r["k"])
    assert run_local(decode_plan(ds2.plan_bytes("reduce"))) == 3
    (tmp_path / "a.csv").write_text("k,v\n1,2\n")
    assert run_local(decode_plan(task.read_csv(str(tmp_path / "a.csv")).plan_bytes())) == [
        {"k": "1", "v": "2"}
    ]


def test_big_chunks_go_by_reference_when_the_cluster_stores_blobs() -> None:
    from lepton_ai.data.sources import BlobSource, InlineSource, SourceLimits

    class BlobRunner(_Runner):
        def __init__(self) -> None:
            super().__init__()
            self.blobs: dict[str, bytes] = {}

        def put_blob(self, data: bytes) -> str:
            key = f"blob{len(self.blobs)}"
            self.blobs[key] = data
            return key

    runner = BlobRunner()
    task = DistributedTask(runner, limits=SourceLimits(inline_chunk_bytes_max=1000))
    data = [*range(1000), "x"]
    plan = decode_plan(task.parallelize(data, 2).plan_bytes())
    srcs = plan.stages[0].sources or []
    assert len(srcs) == 2 and all(isinstance(s, BlobSource) for s in srcs), srcs
    assert len(runner.blobs) == 2
    from lepton_ai.compute.run_task import run_task

    out = run_task(plan, 0, 1, fetch_blob=runner.blobs.__getitem__)
    assert out.result is not None
    with pytest.raises(ValueError, match="fetch_blob"):
        run_task(plan, 0, 0)
    small = decode_plan(task.parallelize([1, 2], 2).plan_bytes())
    small_srcs = small.stages[0].sources or []  # (all() of nothing would pass)
    assert len(small_srcs) == 2 and all(isinstance(s, InlineSource) for s in small_srcs), small_srcs


def test_read_parquet_builds_a_plan_that_runs(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(
        pa.table({"k": [i % 3 for i in range(40)]}), tmp_path / "t.parquet", row_group_size=8
    )
    task, runner = _task()
    ds = task.read_parquet(str(tmp_path / "t.parquet"), partitions=5, columns=["k"])
    assert ds.num_partitions == 5
    plan = decode_plan(ds.map(lambda r: (r["k"], 1)).reduce_by_key(operator.add, 2).plan_bytes())
    assert sorted(run_local(plan)) == [(0, 14), (1, 13), (2, 13)]
    for call, exc in [
        (lambda: task.read_parquet(str(tmp_path / "none.parquet")), FileNotFoundError),
        (lambda: task.read_parquet(str(tmp_path), partitions=0), ValueError),
        (lambda: task.read_parquet(str(tmp_path), columns="k"), TypeError),  # type: ignore[arg-type]
    ]:
        with pytest.raises(exc):
            call()
    assert runner.plans == []


def test_health_split_into_typed_fields() -> None:
    from lepton_ai.node.member_status import split_health

    assert split_health("coordinator", "leader") == ("alive", "", "leader")
    assert split_health("coordinator", "standby") == ("alive", "", "standby")
    assert split_health("coordinator", "unreachable") == ("unreachable", "", "")
    assert split_health("worker", "suspect") == ("suspect", "", "")
    assert split_health("worker", "crashloop") == ("crashloop", "", "")
    assert split_health("executor", "busy") == ("alive", "busy", "")
    assert split_health("spare", "idle") == ("alive", "spare", "")
