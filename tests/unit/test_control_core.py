"""The coordinator's control core, driven with a fake clock (no sockets, no sleeps)."""

from __future__ import annotations

from lepton_ai.compute.job_state import (
    ApplyResult,
    ErrorInfo,
    JobDeleted,
    JobFailedCmd,
    JobFinished,
    JobRecord,
    JobStatus,
    JobSubmitted,
    OutputRef,
)
from lepton_ai.compute.plan import JobOptions
from lepton_ai.compute.scheduler_events import (
    Cancel,
    Dispatch,
    FetchFailed,
    TaskAttempt,
    TaskFailed,
    TaskStarted,
    TaskSucceeded,
)
from lepton_ai.monitor.phi import PhiConfig
from lepton_ai.node.control import (
    AdmitWorker,
    CancelIssued,
    CheckExpiry,
    CheckWorkers,
    CommandApplied,
    ConnectionClosed,
    ControlAction,
    ControlConfig,
    ControlCore,
    Dispatched,
    ExpireJob,
    JobOver,
    LoseWorker,
    RecordEvent,
    RefuseWorker,
    Schedule,
    SendDispatch,
    WorkerHeard,
    WorkerJoining,
    WorkerReport,
)
from lepton_ai.node.messages import (
    FailedReport,
    FetchFailedReport,
    StartedReport,
    SucceededReport,
)

BEAT_S = 0.1


def join(core: ControlCore, worker: str, now: float, node: str = "") -> list[ControlAction]:
    return core.step(WorkerJoining(worker, f"name-{worker}", node, 100, "h:1", 2, now))


def beat(core: ControlCore, worker: str, start: float, until: float) -> float:
    """Regular heartbeats from ``start`` to ``until``; the time of the last one."""
    t = start
    while t <= until + 1e-9:
        core.step(WorkerHeard(worker, t))
        t += BEAT_S
    return t - BEAT_S


def losses(actions: list[ControlAction]) -> list[LoseWorker]:
    return [a for a in actions if isinstance(a, LoseWorker)]


def kinds(actions: list[ControlAction]) -> list[str]:
    return [a.kind for a in actions if isinstance(a, RecordEvent)]


def scheduled(actions: list[ControlAction]) -> list[object]:
    return [a.event for a in actions if isinstance(a, Schedule)]


def attempt(job: str = "j1", stage: int = 1, partition: int = 0, n: int = 0) -> TaskAttempt:
    return TaskAttempt(job, stage, partition, 1, n)


# -- membership and failure detection ---------------------------------------------------


def test_a_worker_joins_once_and_a_lost_incarnation_cannot_rejoin() -> None:
    core = ControlCore(ControlConfig())
    actions = join(core, "w1", 0.0)
    assert AdmitWorker("w1") in actions and kinds(actions) == ["worker_joined"]
    assert join(core, "w1", 0.1) == [RefuseWorker("w1")]  # already a member
    lost = core.step(ConnectionClosed("w1"))
    assert losses(lost) == [LoseWorker("w1", "connection closed")]
    assert kinds(lost) == ["worker_lost"] and isinstance(lost[0], RecordEvent)  # cause first
    assert core.step(ConnectionClosed("w1")) == []  # lost once
    assert join(core, "w1", 0.2) == [RefuseWorker("w1")]
    assert core.step(WorkerJoining("w2", "n", "", 1, "h:2", 0, 0.3)) == [RefuseWorker("w2")]


def test_a_node_rejoining_under_a_new_id_loses_its_old_incarnation() -> None:
    core = ControlCore(ControlConfig())
    join(core, "w1", 0.0, node="node-a")
    join(core, "w2", 0.0, node="node-b")
    actions = join(core, "w3", 1.0, node="node-a")
    assert losses(actions) == [LoseWorker("w1", "its node node-a rejoined as w3")]
    assert actions.index(LoseWorker("w1", "its node node-a rejoined as w3")) < actions.index(
        AdmitWorker("w3")
    )
    assert set(core.members) == {"w2", "w3"}


def test_a_silent_worker_is_lost_by_phi_and_a_flapping_one_is_lost_once() -> None:
    core = ControlCore(ControlConfig())
    join(core, "w1", 0.0)
    join(core, "w2", 0.0)
    last = beat(core, "w1", 0.1, 10.0)
    beat(core, "w2", 0.1, 10.0)
    assert core.step(CheckWorkers(last + 0.3)) == []
    # w1 flaps: silent long enough to be suspected, then heard again too late.
    beat(core, "w2", last + BEAT_S, last + 3.0)
    actions = core.step(CheckWorkers(last + 3.0))
    assert [a.worker for a in losses(actions)] == ["w1"]
    assert "phi" in losses(actions)[0].why and "silent 3.00 s" in losses(actions)[0].why
    assert core.step(WorkerHeard("w1", last + 3.1)) == []  # a late message changes nothing
    beat(core, "w2", last + 3.0 + BEAT_S, last + 6.0)
    assert core.step(CheckWorkers(last + 6.0)) == []  # not lost twice, w2 kept
    assert join(core, "w1", last + 3.2) == [RefuseWorker("w1")]  # must rejoin as new
    assert AdmitWorker("w1b") in join(core, "w1b", last + 3.2)


def test_a_phi_spike_that_recovers_loses_nobody() -> None:
    config = ControlConfig(phi=PhiConfig())
    core = ControlCore(config)
    join(core, "w1", 0.0)
    last = beat(core, "w1", 0.1, 10.0)
    # A pause that raises phi, then heartbeats again before the threshold.
    pause_end = last + 0.35
    assert 0.0 < core.phi_of("w1", pause_end) < config.phi.threshold
    assert core.step(CheckWorkers(pause_end)) == []
    last = beat(core, "w1", pause_end, pause_end + 5.0)
    assert core.phi_of("w1", last + 0.05) < 1.0
    assert core.step(CheckWorkers(last + 0.05)) == []
    assert "w1" in core.members


def test_a_new_term_forgets_the_lost_and_ending_one_forgets_the_members() -> None:
    core = ControlCore(ControlConfig())
    join(core, "w1", 0.0)
    core.step(ConnectionClosed("w1"))
    join(core, "w2", 0.0)
    core.end_term()
    assert core.members == {}
    core.new_term()
    assert AdmitWorker("w1") in join(core, "w1", 1.0)  # a new leader judges afresh


# -- dispatches and reports -------------------------------------------------------------


def test_dispatches_count_reruns_and_a_dispatch_to_a_gone_worker_fails() -> None:
    core = ControlCore(ControlConfig())
    join(core, "w1", 0.0)
    first = core.step(Dispatched(Dispatch(attempt(n=0), "w1", 0), 1.0))
    assert first == [SendDispatch(Dispatch(attempt(n=0), "w1", 0))]
    again = core.step(Dispatched(Dispatch(attempt(n=1), "w1", 0), 2.0))
    assert kinds(again) == ["task_rescheduled"] and "(run 2)" in str(again[0])
    backup = core.step(Dispatched(Dispatch(attempt(n=2), "w1", 1, speculative=True), 3.0))
    assert kinds(backup) == ["backup_launched"]
    gone = core.step(Dispatched(Dispatch(attempt(partition=5), "w9", 0), 4.0))
    assert scheduled(gone) == [TaskFailed(attempt(partition=5), "w9", "infra", 4.0, "worker gone")]
    timed_out = core.step(CancelIssued(Cancel(attempt(), "w1", reason="ran past 5 s")))
    assert kinds(timed_out) == ["task_timed_out"]
    assert core.step(CancelIssued(Cancel(attempt(), "w1", queued_only=True))) == []


def test_a_queued_attempt_taken_for_an_idle_node_is_a_move_not_a_retry() -> None:
    """Work stealing re-dispatches a task nothing failed: the timeline says it moved."""
    core = ControlCore(ControlConfig())
    join(core, "w1", 0.0)
    join(core, "w2", 0.0)
    core.step(Dispatched(Dispatch(attempt(n=0), "w1", 0), 1.0))
    core.step(CancelIssued(Cancel(attempt(n=0), "w1", queued_only=True)))
    moved = core.step(Dispatched(Dispatch(attempt(n=1), "w2", 0), 2.0))
    assert kinds(moved) == ["task_moved"] and "to idle w2" in str(moved[0])
    # A later re-run of the same task after a real failure is a reschedule again.
    again = core.step(Dispatched(Dispatch(attempt(n=2), "w1", 0), 3.0))
    assert kinds(again) == ["task_rescheduled"] and "(run 3)" in str(again[0])


def test_reports_are_timed_by_the_coordinator_and_infra_failures_recorded() -> None:
    """A report carries neither a time nor a worker: the scheduler's event gets the
    coordinator's clock and the worker whose connection it came on."""
    core = ControlCore(ControlConfig())
    join(core, "w1", 0.0)
    started = core.step(WorkerReport("w1", StartedReport(attempt()), 5.0))
    assert scheduled(started) == [TaskStarted(attempt(), "w1", 5.0)]
    out = [OutputRef("w1", "result", 2, b"ok")]
    done = core.step(WorkerReport("w1", SucceededReport(attempt(), out), 6.0))
    assert scheduled(done) == [TaskSucceeded(attempt(), "w1", out, 6.0)]
    failed = core.step(WorkerReport("w1", FailedReport(attempt(), "infra", "oom"), 7.0))
    assert kinds(failed) == ["task_failed"] and "on name-w1: oom" in str(failed[0])
    assert scheduled(failed) == [TaskFailed(attempt(), "w1", "infra", 7.0, "oom")]
    raised = FailedReport(attempt(), "user", "boom", "ValueError", "Traceback ...")
    user = core.step(WorkerReport("w1", raised, 8.0))
    assert kinds(user) == []  # the replicated coordinator records user failures itself
    assert scheduled(user) == [
        TaskFailed(attempt(), "w1", "user", 8.0, "boom", "ValueError", "Traceback ...")
    ]


def _reader(core: ControlCore, reader: TaskAttempt, maps: dict[int, tuple[str, str]]) -> None:
    """Dispatch ``reader`` with inputs: map partition -> (holder, block)."""
    inputs = [OutputRef(w, b, 10) for _, (w, b) in sorted(maps.items())]
    core.step(Dispatched(Dispatch(reader, "w3", 0, inputs=inputs), 1.0))


def _fetch(core: ControlCore, reader: TaskAttempt, part: int, holder: str) -> FetchFailed:
    report = FetchFailedReport(reader, 0, part, holder)
    out = scheduled(core.step(WorkerReport("w3", report, 2.0)))
    assert len(out) == 1 and isinstance(out[0], FetchFailed)
    assert (out[0].worker, out[0].map_stage, out[0].map_partition) == ("w3", 0, part)
    return out[0]


def test_fetch_failures_are_blamed_on_the_right_holder_and_repeats_are_stale() -> None:
    core = ControlCore(ControlConfig())
    for w in ("w1", "w2", "w3"):
        join(core, w, 0.0)
    maps = {0: ("w1", "j1/0/0:0"), 1: ("w2", "j1/0/1:0")}
    r0, r1, r2 = attempt(partition=0), attempt(partition=1), attempt(partition=2)
    for r in (r0, r1, r2):
        _reader(core, r, {p: (w, b[:-1] + str(r.partition)) for p, (w, b) in maps.items()})
    # The first failure on w2's output counts; a second reader failing on the same
    # output (another bucket of it) is stale; one on w1's output is news again.
    first = _fetch(core, r0, 1, "w2")
    assert not first.stale and first.source_worker == "w2" and first.now == 2.0
    assert _fetch(core, r1, 1, "w2").stale
    assert not _fetch(core, r2, 0, "w1").stale


def test_a_fetch_failure_on_a_lost_holder_is_stale() -> None:
    core = ControlCore(ControlConfig())
    for w in ("w1", "w3"):
        join(core, w, 0.0)
    reader = attempt(partition=0)
    _reader(core, reader, {0: ("w1", "j1/0/0:0")})
    lost = core.step(ConnectionClosed("w1"))
    assert losses(lost) == [LoseWorker("w1", "connection closed")]
    actions = core.step(WorkerReport("w3", FetchFailedReport(reader, 0, 0, "w1"), 2.0))
    assert kinds(actions) == ["fetch_failed"] and "(known bad)" in str(actions[0])
    assert scheduled(actions)[0].stale  # type: ignore[attr-defined]


# -- applied commands and expiry --------------------------------------------------------


def test_applied_commands_record_events_and_end_jobs() -> None:
    core = ControlCore(ControlConfig())
    ok = ApplyResult(True)
    sub = core.step(CommandApplied(JobSubmitted("j1", b"", JobOptions(name="n")), ok))
    assert sub == [RecordEvent("job_submitted", "n", "j1")]
    assert (
        core.step(CommandApplied(JobSubmitted("j1", b"", JobOptions()), ApplyResult(False))) == []
    )
    core.step(Dispatched(Dispatch(attempt("j2"), "w1", 0), 1.0))
    finished = core.step(CommandApplied(JobFinished("j2"), ok))
    assert finished == [RecordEvent("job_finished", "", "j2"), JobOver("j2")]
    assert core.dispatch_counts == {}
    failed = core.step(CommandApplied(JobFailedCmd("j3", ErrorInfo("user", "bad\nmore")), ok))
    assert failed == [RecordEvent("job_failed", "bad", "j3"), JobOver("j3")]
    empty = core.step(CommandApplied(JobFailedCmd("j4", ErrorInfo("infra", "")), ok))
    assert empty == [RecordEvent("job_failed", "", "j4"), JobOver("j4")]


def _record(job_id: str, status: JobStatus, submitted: float, finished: float) -> JobRecord:
    return JobRecord(job_id, 0, b"", JobOptions(), status, [], submitted, finished)


def test_jobs_expire_at_the_right_time_on_a_fake_wall_clock() -> None:
    core = ControlCore(ControlConfig(job_retention_s=60.0, expiry_interval_s=1.0))
    jobs = {
        "old": _record("old", "finished", 900.0, 1000.0),
        "failed": _record("failed", "failed", 1010.0, 0.0),  # no finish time: its submit
        "running": _record("running", "running", 0.0, 0.0),
    }
    assert core.step(CheckExpiry(1060.0, jobs)) == []  # exactly the retention: kept
    assert core.step(CheckExpiry(1060.5, jobs)) == []  # within the check interval
    actions = core.step(CheckExpiry(1061.0, jobs))
    assert actions == [RecordEvent("job_expired", "older than 60 s", "old"), ExpireJob("old")]
    # Proposed but not applied yet: not proposed again.
    assert core.step(CheckExpiry(1062.0, jobs)) == []
    later = core.step(CheckExpiry(1071.0, jobs))
    assert [a.job_id for a in later if isinstance(a, ExpireJob)] == ["failed"]
    # Once applied, the job is gone from the table; a failed delete would let it retry.
    core.step(CommandApplied(JobDeleted("old"), ApplyResult(False, "log unavailable")))
    assert ExpireJob("old") in core.step(CheckExpiry(1080.0, jobs))


def test_expiry_is_off_without_retention_and_bounded_per_round() -> None:
    jobs = {f"j{i}": _record(f"j{i}", "finished", 0.0, 1.0) for i in range(5)}
    assert ControlCore(ControlConfig()).step(CheckExpiry(1e9, jobs)) == []
    core = ControlCore(ControlConfig(job_retention_s=1.0, expiries_per_round_max=2))
    first = [a.job_id for a in core.step(CheckExpiry(100.0, jobs)) if isinstance(a, ExpireJob)]
    second = [a.job_id for a in core.step(CheckExpiry(101.0, jobs)) if isinstance(a, ExpireJob)]
    assert first == ["j0", "j1"] and second == ["j2", "j3"]
