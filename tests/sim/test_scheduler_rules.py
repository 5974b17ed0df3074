"""Scripted scenarios for single scheduler rules: speculation, locality, retries, failover."""

from __future__ import annotations

import operator
from collections import deque

from lepton_ai.compute.api import DistributedTask
from lepton_ai.compute.plan import JobOptions, decode_plan
from lepton_ai.compute.scheduler import Scheduler
from lepton_ai.compute.scheduler_events import (
    Applied,
    Cancel,
    Dispatch,
    Propose,
    RunningReport,
    SchedulerAction,
    SchedulerConfig,
    SchedulerEvent,
    TaskFailed,
    TaskSucceeded,
    Tick,
    WorkerJoined,
    WorkerLost,
)
from lepton_ai.compute.state import (
    JobFailedCmd,
    JobFinished,
    JobStateMachine,
    JobSubmitted,
    OutputLost,
    OutputRef,
    TaskFinished,
)
from lepton_ai.compute.tasks import run_task


class _Runner:
    def submit_plan(self, plan: bytes, options: object) -> str:
        raise AssertionError


T = DistributedTask(_Runner())
MAP_ONLY = T.parallelize(range(40), 4).map(lambda x: x + 1).plan_bytes("count")
SHUFFLE = T.parallelize(range(40), 2).map(lambda x: (x % 3, x)).reduce_by_key(operator.add, 2)
SHUFFLE_PLAN = SHUFFLE.plan_bytes()


class Driver:
    """Applies proposals at once and feeds them back; collects the other actions."""

    def __init__(self, sched: Scheduler, sm: JobStateMachine | None = None) -> None:
        self.sched = sched
        self.sm = sm or JobStateMachine()
        self.dispatched: list[Dispatch] = []
        self.cancelled: list[Cancel] = []
        self.proposed: list[object] = []

    def step(self, event: SchedulerEvent) -> None:
        pending: deque[SchedulerEvent] = deque([event])
        while pending:
            for action in self.sched.step(pending.popleft()):
                self._act(action, pending, event.now)

    def _act(self, action: SchedulerAction, pending: deque[SchedulerEvent], now: float) -> None:
        if isinstance(action, Dispatch):
            self.dispatched.append(action)
        elif isinstance(action, Cancel):
            self.cancelled.append(action)
        elif isinstance(action, Propose):
            self.proposed.append(action.command)
            result = self.sm.apply_command(action.command)
            pending.append(Applied(action.command, result, now))

    def submit(self, job: str, plan: bytes, options: JobOptions | None = None) -> None:
        cmd = JobSubmitted(job, plan, options or JobOptions())
        self.step(Applied(cmd, self.sm.apply_command(cmd), 0.0))

    def succeed(self, d: Dispatch, now: float) -> None:
        plan = decode_plan(self.sm.job(d.attempt.job_id).plan)  # type: ignore[union-attr]
        out = run_task(plan, d.attempt.stage, d.attempt.partition, [b"" for _ in d.inputs])
        if out.result is not None:
            refs = [OutputRef(d.worker, "", len(out.result), out.result)]
        else:
            refs = [OutputRef(d.worker, f"blk{i}", 100 + i) for i in range(len(out.buckets or []))]
        self.step(TaskSucceeded(d.attempt, d.worker, refs, now))


def _started(config: SchedulerConfig | None = None) -> Driver:
    drv = Driver(Scheduler(config or SchedulerConfig(), epoch=1))
    drv.step(WorkerJoined("w1", "a1", 4, 0.0))
    drv.step(WorkerJoined("w2", "a2", 2, 0.0))
    return drv


def test_straggler_gets_one_backup_and_first_result_wins() -> None:
    drv = _started()
    drv.submit("j", MAP_ONLY)
    first = list(drv.dispatched)
    assert len(first) == 4
    for d in first[:2]:
        drv.succeed(d, 1.0)
    drv.step(Tick(3.0))
    assert len(drv.dispatched) == 4  # only 50% done: no backup yet
    drv.succeed(first[2], 1.0)
    drv.step(Tick(1.4))
    assert len(drv.dispatched) == 4  # 1.4 s < 1.5 x median (1.0 s)
    drv.step(Tick(1.6))
    assert len(drv.dispatched) == 5
    backup = drv.dispatched[-1]
    assert backup.speculative and backup.attempt.partition == first[3].attempt.partition
    assert backup.worker != first[3].worker or len({d.worker for d in first}) == 1
    drv.step(Tick(5.0))
    assert len(drv.dispatched) == 5  # at most one backup per task
    drv.succeed(backup, 5.1)
    assert [c.attempt for c in drv.cancelled] == [first[3].attempt]
    drv.succeed(first[3], 5.2)  # the loser reports late: ignored
    finished = [c for c in drv.proposed if isinstance(c, TaskFinished)]
    assert len(finished) == 4
    assert any(isinstance(c, JobFinished) for c in drv.proposed)
    assert drv.sm.job("j").result() == 40  # type: ignore[union-attr]


def test_reducers_prefer_the_worker_holding_their_input() -> None:
    drv = _started()
    drv.submit("j", SHUFFLE_PLAN)
    maps = list(drv.dispatched)
    for d in maps:
        drv.succeed(d, 0.5)
    reducers = drv.dispatched[len(maps) :]
    assert len(reducers) == 2
    holders = {d.worker for d in maps}
    if len(holders) == 1:
        assert all(r.worker in holders for r in reducers)
    for r in reducers:
        assert len(r.inputs) == 2 and all(ref.size_bytes > 0 for ref in r.inputs)
        assert set(r.addresses) <= {"w1", "w2"}


def test_lost_worker_requeues_attempts_and_invalidates_needed_outputs() -> None:
    drv = _started()
    drv.submit("j", SHUFFLE_PLAN)
    maps = list(drv.dispatched)
    for d in maps:
        drv.succeed(d, 0.5)
    lost = maps[0].worker
    n_before = len(drv.dispatched)
    drv.step(WorkerLost(lost, 1.0))
    losses = [c for c in drv.proposed if isinstance(c, OutputLost)]
    assert {(c.stage, c.partition) for c in losses} == {
        (0, d.attempt.partition) for d in maps if d.worker == lost
    }
    rerun = [d for d in drv.dispatched[n_before:] if d.attempt.stage == 0]
    assert rerun and all(d.worker != lost for d in rerun)


def test_infrastructure_failures_are_retried_up_to_max_retries() -> None:
    drv = _started()
    drv.submit("j", MAP_ONLY, JobOptions(max_retries=2))
    for i in range(3):
        victim = next(d for d in reversed(drv.dispatched) if d.attempt.partition == 0)
        drv.step(TaskFailed(victim.attempt, victim.worker, "infra", float(i), "executor died"))
    failed = [c for c in drv.proposed if isinstance(c, JobFailedCmd)]
    assert len(failed) == 1 and failed[0].error.kind == "infra"
    assert "max_retries=2" in failed[0].error.message
    assert drv.sm.job("j").status == "failed"  # type: ignore[union-attr]


def test_failover_rebuilds_waits_for_reports_and_adopts_running_attempts() -> None:
    old = Driver(Scheduler(SchedulerConfig(), epoch=1))
    old.step(WorkerJoined("w1", "a1", 1, 0.0))
    old.step(WorkerJoined("w2", "a2", 1, 0.0))
    old.submit("j", SHUFFLE_PLAN)
    maps = list(old.dispatched)
    old.succeed(maps[0], 0.5)  # one map output recorded on maps[0].worker
    new = Driver(
        Scheduler.from_state(old.sm.state, 10.0, epoch=2, config=SchedulerConfig()), old.sm
    )
    survivor = maps[1]
    new.step(
        WorkerJoined(
            survivor.worker, "a", 4, 10.1, [RunningReport(survivor.attempt, survivor.slot)]
        )
    )
    assert new.dispatched == []  # grace period: wait for reports
    new.step(Tick(11.5))  # after the grace: nothing to re-dispatch, the map is still running
    assert maps[0].worker != survivor.worker
    assert [c for c in new.proposed if isinstance(c, OutputLost)]  # its worker never came back
    assert [d for d in new.dispatched if d.attempt.partition == maps[0].attempt.partition]
    assert not [d for d in new.dispatched if d.attempt.partition == survivor.attempt.partition]
    new.succeed(survivor, 12.0)  # the old leadership's attempt reports to the new leader
    assert any(
        isinstance(c, TaskFinished) and c.epoch == 1 and c.partition == survivor.attempt.partition
        for c in new.proposed
    )


def test_grace_ends_early_once_expected_workers_rejoin_and_bad_events_are_refused() -> None:
    import pytest

    sm = JobStateMachine()
    cmd = JobSubmitted("j", MAP_ONLY, JobOptions())
    sm.apply_command(cmd)
    sched = Scheduler.from_state(sm.state, 0.0, epoch=3, expected_workers=["w1", "w2"])
    drv = Driver(sched, sm)
    drv.step(WorkerJoined("w1", "a1", 2, 0.1))
    assert drv.dispatched == []  # w2 still expected
    drv.step(WorkerJoined("w2", "a2", 2, 0.2))
    assert len(drv.dispatched) == 4 and all(d.attempt.epoch == 3 for d in drv.dispatched)
    with pytest.raises(TypeError):
        sched.step("tick")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        sched.step(WorkerJoined("w3", "a3", -1, 0.3))
    assert sched.free_slots() == 0 and len(sched.running()) == 4 and sched.jobs() == ["j"]
