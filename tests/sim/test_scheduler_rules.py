"""Scripted scenarios for single scheduler rules: speculation, locality, retries, failover."""

from __future__ import annotations

import operator
from collections import deque

from lepton_ai.compute.api import DistributedTask
from lepton_ai.compute.job_state import (
    JobFailedCmd,
    JobFinished,
    JobStateMachine,
    JobSubmitted,
    OutputLost,
    OutputRef,
    TaskFinished,
)
from lepton_ai.compute.plan import JobOptions, decode_plan
from lepton_ai.compute.run_task import run_task
from lepton_ai.compute.scheduler import Scheduler
from lepton_ai.compute.scheduler_events import (
    Applied,
    Cancel,
    Dispatch,
    FetchFailed,
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
    drv = _started(SchedulerConfig(steal=False))  # only the backup's cancels below
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


EIGHT = T.parallelize(range(80), 8).map(lambda x: x + 1).plan_bytes("count")


def _pipelined() -> Driver:
    """Two workers, one executor each with 4 scheduler slots (pipeline depth 4)."""
    drv = Driver(Scheduler(SchedulerConfig(speculation_min_s=100.0), epoch=1))
    drv.step(WorkerJoined("w1", "a1", 4, 0.0, [], 1))
    drv.step(WorkerJoined("w2", "a2", 4, 0.0, [], 1))
    return drv


def test_idle_worker_steals_attempts_queued_behind_a_slow_one() -> None:
    drv = _pipelined()
    drv.submit("j", EIGHT)
    first = list(drv.dispatched)
    assert sorted(d.worker for d in first) == ["w1"] * 4 + ["w2"] * 4  # balanced per executor
    on_w1 = [d for d in first if d.worker == "w1"]
    for d in (d for d in first if d.worker == "w2"):
        drv.succeed(d, 0.2)  # w2 is done while w1 still runs its first attempt
    steals = [c for c in drv.cancelled if c.queued_only]
    # Newest first, until the loads per executor are within one: w1 4 -> 2, w2 0 -> 2.
    assert [c.attempt for c in steals] == [d.attempt for d in on_w1[:1:-1]]
    assert all(c.worker == "w1" for c in steals) and len(drv.dispatched) == 8
    drv.step(Tick(0.3))
    assert len([c for c in drv.cancelled if c.queued_only]) == 2  # asked once, not again
    # w1 had not started them: they come back cancelled and go to w2, the thief.
    for c in steals:
        drv.step(TaskFailed(c.attempt, "w1", "cancelled", 0.3))
    moved = drv.dispatched[8:]
    assert [d.worker for d in moved] == ["w2", "w2"]
    assert {d.attempt.partition for d in moved} == {c.attempt.partition for c in steals}
    assert not any(d.speculative for d in moved)
    for d in on_w1[:2] + moved:
        drv.succeed(d, 1.0)
    finished = [c for c in drv.proposed if isinstance(c, TaskFinished)]
    assert len(finished) == 8 and len({c.partition for c in finished}) == 8
    assert drv.sm.job("j").result() == 80  # type: ignore[union-attr]


def test_a_steal_that_finds_the_attempt_started_changes_nothing() -> None:
    drv = _pipelined()
    drv.submit("j", EIGHT)
    first = list(drv.dispatched)
    for d in (d for d in first if d.worker == "w2"):
        drv.succeed(d, 0.2)
    steals = [c for c in drv.cancelled if c.queued_only]
    assert steals
    # The agent had already started them: it ignores the request and they finish
    # there; nothing is re-dispatched and every result is taken exactly once.
    for d in (d for d in first if d.worker == "w1"):
        drv.succeed(d, 1.0)
        drv.succeed(d, 1.1)  # a duplicated report is discarded
    assert len(drv.dispatched) == 8
    finished = [c for c in drv.proposed if isinstance(c, TaskFinished)]
    assert sorted(c.partition for c in finished) == list(range(8))
    assert drv.sm.job("j").status == "finished"  # type: ignore[union-attr]


def test_stealing_does_not_move_work_between_equally_loaded_workers() -> None:
    drv = _pipelined()
    drv.submit("j", EIGHT)
    first = list(drv.dispatched)
    w1 = [d for d in first if d.worker == "w1"]
    w2 = [d for d in first if d.worker == "w2"]
    drv.succeed(w1[0], 0.1)
    drv.succeed(w2[0], 0.1)
    drv.succeed(w2[1], 0.2)  # w1: 3 left, w2: 2 left: within one per executor
    assert not [c for c in drv.cancelled if c.queued_only]


ONE_TASK = T.parallelize(range(10), 1).map(lambda x: x * 2).plan_bytes("reduce")


def test_a_hung_attempt_is_killed_at_the_task_timeout_and_retried() -> None:
    drv = _pipelined()  # a single-task stage: no median, so speculation never helps
    drv.submit("j", ONE_TASK, JobOptions(task_timeout_s=2.0))
    (hung,) = drv.dispatched
    drv.step(Tick(1.9))
    assert drv.cancelled == [] and len(drv.dispatched) == 1
    drv.step(Tick(2.1))
    (kill,) = drv.cancelled
    assert (kill.attempt, kill.worker, kill.queued_only) == (hung.attempt, hung.worker, False)
    assert "task_timeout_s=2" in kill.reason  # shown in the job's events
    (retry,) = drv.dispatched[1:]
    assert retry.attempt.partition == 0 and not retry.speculative
    drv.step(TaskFailed(hung.attempt, hung.worker, "cancelled", 2.2))  # its slot frees
    drv.succeed(retry, 2.5)
    assert drv.sm.job("j").result() == 90  # type: ignore[union-attr]
    drv.step(Tick(10.0))
    assert len(drv.cancelled) == 1  # finished work is never timed out


def test_always_hanging_task_fails_the_job_naming_partition_and_timeout() -> None:
    drv = _pipelined()
    drv.submit("j", EIGHT, JobOptions(task_timeout_s=1.0, max_retries=2))
    for d in list(drv.dispatched):
        if d.attempt.partition != 5:
            drv.succeed(d, 0.1)
    now = 0.1
    while not any(isinstance(c, JobFailedCmd) for c in drv.proposed) and now < 20:
        now += 0.25
        drv.step(Tick(now))
        for c in drv.cancelled:
            drv.step(TaskFailed(c.attempt, c.worker, "cancelled", now))
        drv.cancelled.clear()
    (failed,) = [c for c in drv.proposed if isinstance(c, JobFailedCmd)]
    assert 3.0 <= now <= 4.0  # three attempts of ~1 s each (max_retries=2)
    assert (failed.error.kind, failed.error.stage, failed.error.partition) == ("infra", 0, 5)
    text = str(failed.error.to_exception())
    assert "task_timeout_s=1" in text and "partition 5" in text and "max_retries=2" in text


def test_only_the_attempt_at_the_head_of_an_executor_lane_is_timed() -> None:
    drv = Driver(Scheduler(SchedulerConfig(speculation_min_s=100.0, steal=False), epoch=1))
    drv.step(WorkerJoined("w1", "a1", 4, 0.0, [], 1))  # one executor, four attempts in line
    drv.submit("j", T.parallelize(range(4), 4).plan_bytes("count"), JobOptions(task_timeout_s=2.0))
    first = list(drv.dispatched)
    assert len(first) == 4
    drv.step(Tick(2.5))  # all four look 2.5 s old, but only the head can be running
    assert [c.attempt for c in drv.cancelled] == [first[0].attempt]
    drv.step(Tick(4.0))  # the others' clocks restarted at 2.5 s, when the head was killed
    assert len(drv.cancelled) == 1
    drv.step(Tick(4.6))
    assert [c.attempt for c in drv.cancelled] == [first[0].attempt, first[1].attempt]


def test_only_the_stage_completing_task_finished_is_urgent() -> None:
    """A TaskFinished may wait to share a log slot unless every other unfinished task
    of its stage has already proposed its own: then its commit ends the stage."""
    sched = Scheduler(SchedulerConfig(steal=False), epoch=1)
    sm = JobStateMachine()
    sched.step(WorkerJoined("w1", "a1", 4, 0.0))
    cmd = JobSubmitted("j", SHUFFLE_PLAN, JobOptions())
    dispatched = [
        a for a in sched.step(Applied(cmd, sm.apply_command(cmd), 0.0)) if isinstance(a, Dispatch)
    ]
    assert [d.attempt.stage for d in dispatched] == [0, 0]

    def report(d: Dispatch, now: float) -> list[Propose]:
        plan = decode_plan(SHUFFLE_PLAN)
        out = run_task(plan, d.attempt.stage, d.attempt.partition, [b"" for _ in d.inputs])
        if out.result is not None:
            refs = [OutputRef(d.worker, "", len(out.result), out.result)]
        else:
            refs = [OutputRef(d.worker, f"b{i}", 10) for i in range(len(out.buckets or []))]
        acts = sched.step(TaskSucceeded(d.attempt, d.worker, refs, now))
        return [a for a in acts if isinstance(a, Propose)]

    def apply(p: Propose, now: float) -> list[Dispatch]:
        acts = sched.step(Applied(p.command, sm.apply_command(p.command), now))
        return [a for a in acts if isinstance(a, Dispatch)]

    # Both map tasks report before either commit: the first may wait, the second not.
    first, second = report(dispatched[0], 1.0), report(dispatched[1], 1.1)
    assert [p.urgent for p in first + second] == [False, True]
    assert apply(first[0], 1.2) == []  # the stage is not complete yet
    readers = apply(second[0], 1.3)
    assert sorted(d.attempt.partition for d in readers) == [0, 1]
    # Reducers report one at a time, each committed before the next reports.
    p0 = report(readers[0], 2.0)
    assert [p.urgent for p in p0] == [False]
    apply(p0[0], 2.1)
    p1 = report(readers[1], 2.2)
    assert [p.urgent for p in p1] == [True]
    closing = sched.step(Applied(p1[0].command, sm.apply_command(p1[0].command), 2.3))
    assert [(type(a.command), a.urgent) for a in closing if isinstance(a, Propose)] == [
        (JobFinished, True)
    ]


def test_output_of_a_worker_lost_after_the_grace_is_re_made_when_its_result_lands_late() -> None:
    """The demo's old hang: the grace ends (both workers re-joined), one of them dies,
    then a result it reported to the old leader is applied from the log. Its output
    is already gone; it must be re-made, not handed to the reducers for ever."""
    plan_bytes = (
        T.parallelize(range(40), 4).map(lambda x: (x % 3, x)).reduce_by_key(operator.add, 2)
    ).plan_bytes()
    old = Driver(Scheduler(SchedulerConfig(steal=False), epoch=1))
    old.step(WorkerJoined("w1", "a1", 2, 0.0))
    old.step(WorkerJoined("w2", "a2", 2, 0.0))
    old.submit("j", plan_bytes)
    on_w1 = [d for d in old.dispatched if d.worker == "w1"]
    on_w2 = [d for d in old.dispatched if d.worker == "w2"]
    old.succeed(on_w1[0], 0.5)
    old.succeed(on_w2[0], 0.5)  # both workers hold a recorded output: both are expected
    late = on_w2[1]
    new = Driver(Scheduler.from_state(old.sm.state, 10.0, epoch=2), old.sm)
    running = [RunningReport(on_w1[1].attempt, on_w1[1].slot)]
    new.step(WorkerJoined("w1", "a1", 2, 10.1, running))
    new.step(WorkerJoined("w2", "a2", 2, 10.1))  # every expected worker is back: grace over
    new.step(WorkerLost("w2", 10.2))
    # The old leader's TaskFinished for the dead worker's map commits only now.
    plan = decode_plan(plan_bytes)
    buckets = run_task(plan, 0, late.attempt.partition, []).buckets or []
    refs = [OutputRef("w2", f"blk{i}", 100) for i in range(len(buckets))]
    a = late.attempt
    cmd = TaskFinished("j", a.stage, a.partition, a.epoch, a.attempt, "w2", refs, 0.5)
    new.step(Applied(cmd, new.sm.apply_command(cmd), 10.3))
    new.step(Tick(20.0))  # long after the grace period
    new.succeed(on_w1[1], 20.1)  # the last map still on a live worker: its stage looks done
    lost = {c.partition for c in new.proposed if isinstance(c, OutputLost)}
    assert lost == {on_w2[0].attempt.partition, a.partition}
    assert not [d for d in new.dispatched if d.attempt.stage == 1]  # no reader of a lost output
    redo = {d.attempt.partition for d in new.dispatched if d.attempt.stage == 0}
    assert lost <= redo


def test_a_stale_fetch_failure_re_makes_an_output_still_recorded_and_is_not_counted() -> None:
    drv = _started(SchedulerConfig(steal=False))
    drv.submit("j", SHUFFLE_PLAN, JobOptions(max_retries=0))  # any counted failure fails it
    for d in list(drv.dispatched):
        drv.succeed(d, 0.5)
    readers = [d for d in drv.dispatched if d.attempt.stage == 1]
    assert readers
    src = readers[0].inputs[0].worker
    # The host marks it stale (say the source worker was declared lost), yet the
    # scheduler still records map 0 there: re-make it rather than re-run the reader.
    r = readers[0].attempt
    drv.step(FetchFailed(r, readers[0].worker, 0, 0, src, 0.6, stale=True))
    assert [c for c in drv.proposed if isinstance(c, OutputLost) and c.partition == 0]
    r2 = readers[1].attempt
    drv.step(FetchFailed(r2, readers[1].worker, 0, 0, src, 0.6, stale=True))
    assert len([c for c in drv.proposed if isinstance(c, OutputLost)]) == 1
    assert drv.sm.job("j").status == "running"  # type: ignore[union-attr]


def test_a_map_output_with_a_live_replica_survives_its_worker_and_is_read_there() -> None:
    drv = _started()
    drv.step(WorkerJoined("w3", "a3", 2, 0.0))
    drv.submit("j", SHUFFLE_PLAN)
    maps = list(drv.dispatched)
    assert len(maps) == 2

    def replica_of(worker: str) -> str:
        return next(w for w in ("w1", "w2", "w3") if w != worker)

    for d in maps:  # each map's shuffle file was copied to one other worker
        refs = [
            OutputRef(d.worker, f"blk{i}", 100 + i, replicas=[replica_of(d.worker)])
            for i in range(2)
        ]
        drv.step(TaskSucceeded(d.attempt, d.worker, refs, 0.5))
    assert len(drv.dispatched) == 4  # the two readers
    lost = maps[0].worker
    drv.step(WorkerLost(lost, 1.0))
    # No map output is re-made: each still has a live copy ...
    assert not [c for c in drv.proposed if isinstance(c, OutputLost)]
    assert not [d for d in drv.dispatched[4:] if d.attempt.stage == 0]
    # ... and readers dispatched from now on read the replica.
    for d in drv.dispatched[4:]:
        assert all(ref.worker != lost and ref.worker in d.addresses for ref in d.inputs)
    # Losing the replica's holder too loses the output: only then is it re-made.
    drv.step(WorkerLost(replica_of(lost), 2.0))
    remade = {c.partition for c in drv.proposed if isinstance(c, OutputLost)}
    assert maps[0].attempt.partition in remade
