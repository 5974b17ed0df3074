"""An executor fed a window of attempts (real executor processes, driven by
``ExecutorSlot``): they run in order; a queued one can be cancelled before it
starts; when the executor dies, the running attempt fails and the queued ones
come back as ``Requeued`` (they never ran, so no retry is charged)."""

from __future__ import annotations

import asyncio
import functools
import signal
import sys
import time
from pathlib import Path

import cloudpickle
import pytest

from helpers import wait_until_async
from lepton_ai.compute.plan import NarrowOp, SourceOp, build_plan, encode_plan
from lepton_ai.compute.scheduler_events import TaskAttempt
from lepton_ai.data.sources import range_sources
from lepton_ai.node.executor_slots import ExecutorConfig, ExecutorDied, ExecutorSlot, Requeued
from lepton_ai.node.messages import ExecRun

cloudpickle.register_pickle_by_value(sys.modules[__name__])

PARTS = 4


def _slow(started: str, x: int) -> int:
    if x == 0:
        Path(started).touch()  # the test kills the executor only once this is running
        time.sleep(0.3)
    else:
        time.sleep(0.01)
    return x


def _plan(tmp_path: Path) -> bytes:
    started = str(tmp_path / "partition-0-running")
    ops = [
        SourceOp(tuple(range_sources(range(PARTS), PARTS))),
        NarrowOp("map", functools.partial(_slow, started)),
    ]
    return encode_plan(build_plan(ops, "collect"))


async def _running_partition_0(tmp_path: Path) -> None:
    """Until the executor really runs partition 0 (it is not just queued in the slot)."""
    marker = tmp_path / "partition-0-running"
    await wait_until_async(marker.exists, 30.0, "partition 0 running in the executor")


def _attempt(p: int) -> TaskAttempt:
    return TaskAttempt("job1", 0, p, 1, p)


async def _with_slot(tmp_path: Path, body) -> None:  # type: ignore[no-untyped-def]
    slot = ExecutorSlot(0, "w1", str(tmp_path), ExecutorConfig(spares=0), lambda k, d: None)
    task = asyncio.get_running_loop().create_task(slot.supervise())
    try:
        await asyncio.wait_for(body(slot), 60)
    finally:
        await slot.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.timeout(90)
def test_window_runs_in_order_and_a_queued_attempt_can_be_cancelled(tmp_path: Path) -> None:
    async def body(slot: ExecutorSlot) -> None:
        plan = _plan(tmp_path)
        futures = [await slot.submit("job1", plan, ExecRun(_attempt(p))) for p in range(PARTS)]
        assert slot.is_running(_attempt(0)) and len(slot.outstanding) == PARTS
        assert slot.cancel(_attempt(2))  # queued behind the slow one: dropped, no kill
        replies = [await f for f in futures]
        assert [r.attempt.partition for r in replies] == list(range(PARTS))
        assert [r.kind for r in replies] == ["done", "done", "cancelled", "done"]
        assert slot.restarts == 0 and not slot.outstanding

    asyncio.run(_with_slot(tmp_path, body))


@pytest.mark.timeout(90)
def test_executor_death_fails_the_running_attempt_and_requeues_the_rest(tmp_path: Path) -> None:
    async def body(slot: ExecutorSlot) -> None:
        plan = _plan(tmp_path)
        futures = [await slot.submit("job1", plan, ExecRun(_attempt(p))) for p in range(PARTS)]
        await _running_partition_0(tmp_path)
        assert slot.signal(signal.SIGKILL)
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        assert type(outcomes[0]) is ExecutorDied and not outcomes[0].cancelled
        assert all(type(o) is Requeued for o in outcomes[1:])
        # The slot comes back with a new executor that runs what was requeued.
        again = await slot.submit("job1", plan, ExecRun(_attempt(1)))
        assert (await again).kind == "done" and slot.restarts == 1

    asyncio.run(_with_slot(tmp_path, body))


@pytest.mark.timeout(90)
def test_cancelling_the_running_attempt_kills_only_it(tmp_path: Path) -> None:
    async def body(slot: ExecutorSlot) -> None:
        plan = _plan(tmp_path)
        first = await slot.submit("job1", plan, ExecRun(_attempt(0)))
        second = await slot.submit("job1", plan, ExecRun(_attempt(1)))
        await _running_partition_0(tmp_path)
        assert slot.cancel(_attempt(0))
        done = await asyncio.gather(first, second, return_exceptions=True)
        assert type(done[0]) is ExecutorDied and done[0].cancelled
        assert type(done[1]) is Requeued

    asyncio.run(_with_slot(tmp_path, body))


@pytest.mark.timeout(90)
def test_a_smaller_window_for_slow_stages_keeps_attempts_with_the_agent(tmp_path: Path) -> None:
    """The agent hands a slow stage's executor only ``window_slow`` attempts: what
    it still holds can be stolen at once, unlike what the executor has queued."""

    async def body(slot: ExecutorSlot) -> None:
        plan = _plan(tmp_path)
        futures = [await slot.submit("job1", plan, ExecRun(_attempt(p))) for p in range(2)]
        assert not slot.can_take(slot.config.window_slow) and slot.can_take()
        replies = [await f for f in futures]
        assert all(r.kind == "done" for r in replies)

    asyncio.run(_with_slot(tmp_path, body))
