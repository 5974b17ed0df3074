"""The coordinator's control-plane decisions, sans I/O (DESIGN.md section 4).

Beside the scheduler core (``compute.scheduler``), which decides what runs where,
this core decides what the coordinator's shell used to decide inline:

* which worker incarnations are members, and when one is lost (the phi-accrual
  detector's verdict, a closed connection, its node rejoining under a new id);
* a worker's task report (``messages.TaskReport``) as the scheduler's event,
  timed by the coordinator's clock (``task_event``);
* whether a fetch failure is news or already known (``FetchFailed.stale``);
* which finished jobs have outlived their retention;
* which events go on the timeline.

``ControlCore.step(event) -> list[ControlAction]``: monotonic time (``now``) and
wall time (``wall``) come in with the events, so a test or the simulator drives
it with a fake clock. The shell (``node.coordinator``) carries the actions out in
order: a ``RecordEvent`` is listed before the action it explains, so the
timeline reads cause first.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

import msgspec

from lepton_ai.compute.job_state import (
    ApplyResult,
    JobCommand,
    JobDeleted,
    JobFailedCmd,
    JobFinished,
    JobRecord,
    JobSubmitted,
    OutputLost,
    OutputRef,
)
from lepton_ai.compute.scheduler_events import (
    Cancel,
    Dispatch,
    FetchFailed,
    SchedulerEvent,
    TaskAttempt,
    TaskFailed,
    TaskStarted,
    TaskSucceeded,
)
from lepton_ai.monitor.events import EventKind
from lepton_ai.monitor.phi import PhiAccrualDetector, PhiConfig
from lepton_ai.node.messages import (
    FailedReport,
    StartedReport,
    SucceededReport,
    TaskReport,
)


@dataclass(frozen=True)
class ControlConfig:
    lost_workers_max: int = 10_000  # ids remembered so a lost incarnation cannot rejoin
    job_retention_s: float = 0.0  # finished jobs older than this are deleted (0: kept)
    expiry_interval_s: float = 1.0
    expiries_per_round_max: int = 1000
    phi: PhiConfig = field(default_factory=PhiConfig)


# -- events (inputs) ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkerJoining:
    """A worker incarnation asks to register."""

    worker: str
    name: str
    node: str  # its storage node's stable id ("" when it has none)
    pid: int
    address: str
    slots: int
    now: float


@dataclass(frozen=True, slots=True)
class WorkerHeard:
    """Any message from a member: a heartbeat for the failure detector."""

    worker: str
    now: float


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    worker: str


@dataclass(frozen=True, slots=True)
class CheckWorkers:
    """Periodic: lose the members the failure detector suspects."""

    now: float


@dataclass(frozen=True, slots=True)
class CheckExpiry:
    """Periodic, leader only: ``jobs`` is the applied state's job table."""

    wall: float
    jobs: Mapping[str, JobRecord]


@dataclass(frozen=True, slots=True)
class WorkerReport:
    """A task report from a member, as the worker sent it, heard at ``now``."""

    worker: str
    report: TaskReport
    now: float


@dataclass(frozen=True, slots=True)
class Dispatched:
    """The scheduler dispatched ``dispatch``."""

    dispatch: Dispatch
    now: float


@dataclass(frozen=True, slots=True)
class CancelIssued:
    """The scheduler cancelled an attempt."""

    cancel: Cancel


@dataclass(frozen=True, slots=True)
class CommandApplied:
    """A job command was applied to the replicated state (on any replica)."""

    command: JobCommand
    result: ApplyResult


ControlEvent = (
    WorkerJoining
    | WorkerHeard
    | ConnectionClosed
    | CheckWorkers
    | CheckExpiry
    | WorkerReport
    | Dispatched
    | CancelIssued
    | CommandApplied
)

# -- actions (outputs) -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecordEvent:
    kind: EventKind
    detail: str = ""
    job_id: str = ""
    # The time a logged command carries (0.0: now): every replica applying it then
    # records the same entry, and none is lost with a leader that died before
    # proposing its own timeline entry for it.
    t: float = 0.0


@dataclass(frozen=True, slots=True)
class AdmitWorker:
    worker: str


@dataclass(frozen=True, slots=True)
class RefuseWorker:
    worker: str


@dataclass(frozen=True, slots=True)
class LoseWorker:
    """Forget the incarnation: close its connection, tell the scheduler and storage."""

    worker: str
    why: str


@dataclass(frozen=True, slots=True)
class Schedule:
    """Feed ``event`` to the scheduler core."""

    event: SchedulerEvent


@dataclass(frozen=True, slots=True)
class SendDispatch:
    """The dispatch's worker is a member: send it the task."""

    dispatch: Dispatch


@dataclass(frozen=True, slots=True)
class ExpireJob:
    """Propose ``JobDeleted``: through the log, so every replica forgets the job."""

    job_id: str


@dataclass(frozen=True, slots=True)
class JobOver:
    """The job finished or failed: wake its waiters, let the workers drop its plan."""

    job_id: str


ControlAction = (
    RecordEvent
    | AdmitWorker
    | RefuseWorker
    | LoseWorker
    | Schedule
    | SendDispatch
    | ExpireJob
    | JobOver
)


@dataclass(frozen=True, slots=True)
class Member:
    name: str
    node: str


class ControlCore:
    """The coordinator's membership, failure and retention decisions."""

    def __init__(self, config: ControlConfig) -> None:
        self.config = config
        self.phi = PhiAccrualDetector(config.phi)
        self.members: dict[str, Member] = {}
        self.lost: deque[str] = deque(maxlen=config.lost_workers_max)
        self.dispatch_counts: dict[tuple[str, int, int], int] = {}
        # Tasks whose queued attempt was taken back for an idle node (work stealing): their
        # next dispatch is a move, not a retry (nothing failed).
        self.stolen: set[tuple[str, int, int]] = set()
        # Shuffle inputs of dispatched readers (until their report) and outputs
        # already reported bad, to tell a stale fetch failure from a new one.
        self.reader_inputs: dict[TaskAttempt, list[OutputRef]] = {}
        self.bad_outputs: set[tuple[str, str, str]] = set()
        self.last_expiry = 0.0
        self.expiring: set[str] = set()  # JobDeleted proposed, not yet applied

    # -- terms -------------------------------------------------------------------------
    def new_term(self) -> None:
        """Each term's failure detector judges afresh: a worker an earlier leader (or
        this one, in an earlier term) declared lost re-registers, and its outputs are
        judged from the log (OutputLost) plus what it reports now."""
        self.phi = PhiAccrualDetector(self.config.phi)
        self.lost.clear()

    def end_term(self) -> None:
        """Leadership lost: the members re-register with the new leader."""
        self.members.clear()
        self.reader_inputs.clear()

    def phi_of(self, worker: str, now: float) -> float:
        return self.phi.phi(worker, now)

    # -- the step ----------------------------------------------------------------------
    def step(self, event: ControlEvent) -> list[ControlAction]:
        if isinstance(event, WorkerHeard):
            if event.worker in self.members:
                self.phi.heartbeat(event.worker, event.now)
            return []
        if isinstance(event, WorkerReport):
            return self._report(event)
        if isinstance(event, Dispatched):
            return self._dispatched(event.dispatch, event.now)
        if isinstance(event, CancelIssued):
            return self._cancelled(event.cancel)
        if isinstance(event, CommandApplied):
            return self._applied(event.command, event.result)
        if isinstance(event, WorkerJoining):
            return self._joining(event)
        if isinstance(event, ConnectionClosed):
            return self._lose(event.worker, "connection closed")
        if isinstance(event, CheckWorkers):
            return self._check_workers(event.now)
        return self._expire(event.wall, event.jobs)

    # -- membership --------------------------------------------------------------------
    def _joining(self, ev: WorkerJoining) -> list[ControlAction]:
        if ev.worker in self.lost or ev.worker in self.members or ev.slots <= 0:
            # A lost incarnation may hold stale attempts: it must rejoin as a new one.
            return [RefuseWorker(ev.worker)]
        actions: list[ControlAction] = []
        for old, m in list(self.members.items()):
            if ev.node and m.node == ev.node:
                # The node restarted before its old agent was found dead: that one is gone.
                actions += self._lose(old, f"its node {ev.node} rejoined as {ev.worker}")
        self.members[ev.worker] = Member(ev.name, ev.node)
        self.phi.heartbeat(ev.worker, ev.now)
        detail = f"{ev.name} ({ev.worker}) pid {ev.pid} at {ev.address}"
        return [*actions, AdmitWorker(ev.worker), RecordEvent(EventKind.WORKER_JOINED, detail)]

    def _check_workers(self, now: float) -> list[ControlAction]:
        actions: list[ControlAction] = []
        for worker in self.phi.suspects(now):
            if worker in self.members:
                phi = self.phi.phi(worker, now)
                last = self.phi.last_heartbeat(worker) or now
                actions += self._lose(worker, f"phi {phi:.1f}, silent {now - last:.2f} s")
        return actions

    def _lose(self, worker: str, why: str) -> list[ControlAction]:
        member = self.members.pop(worker, None)
        if member is None:
            return []  # lost already (a closed connection after a phi verdict)
        self.lost.append(worker)
        self.phi.remove(worker)
        detail = f"{member.name} ({worker}): {why}"
        return [RecordEvent(EventKind.WORKER_LOST, detail), LoseWorker(worker, why)]

    # -- tasks -------------------------------------------------------------------------
    def _dispatched(self, d: Dispatch, now: float) -> list[ControlAction]:
        a = d.attempt
        key = (a.job_id, a.stage, a.partition)
        n = self.dispatch_counts.get(key, 0) + 1
        self.dispatch_counts[key] = n
        actions: list[ControlAction] = []
        where = f"stage {a.stage} partition {a.partition}"
        if d.speculative:
            actions.append(
                RecordEvent(EventKind.BACKUP_LAUNCHED, f"{where} on {d.worker}", a.job_id)
            )
        elif key in self.stolen:
            self.stolen.discard(key)
            detail = f"{where} to idle {d.worker} (queued behind a slow task elsewhere)"
            actions.append(RecordEvent(EventKind.TASK_MOVED, detail, a.job_id))
        elif n > 1:
            detail = f"{where} (run {n}) on {d.worker}"
            actions.append(RecordEvent(EventKind.TASK_RESCHEDULED, detail, a.job_id))
        if d.worker not in self.members:
            # Lost between the scheduler's decision and now: report it as failed.
            actions.append(Schedule(TaskFailed(a, d.worker, "infra", now, "worker gone")))
            return actions
        if d.inputs:
            self.reader_inputs[a] = d.inputs
        actions.append(SendDispatch(d))
        return actions

    def _cancelled(self, c: Cancel) -> list[ControlAction]:
        if c.queued_only:
            a = c.attempt
            self.stolen.add((a.job_id, a.stage, a.partition))
        if not c.reason:
            return []
        a = c.attempt
        detail = f"stage {a.stage} partition {a.partition}: {c.reason}"
        return [RecordEvent(EventKind.TASK_TIMED_OUT, detail, a.job_id)]

    def _report(self, ev: WorkerReport) -> list[ControlAction]:
        rep = task_event(ev.report, ev.worker, ev.now)
        if isinstance(rep, TaskStarted):
            return [Schedule(rep)]
        inputs = self.reader_inputs.pop(rep.attempt, None)  # the attempt is over
        if isinstance(rep, TaskSucceeded):
            return [Schedule(rep)]
        if isinstance(rep, FetchFailed):
            return self._fetch_failed(rep, inputs)
        if rep.kind == "infra":
            member = self.members.get(ev.worker)
            on = member.name if member is not None else ev.worker
            a = rep.attempt
            detail = f"stage {a.stage} partition {a.partition} on {on}: {rep.message}"
            return [RecordEvent(EventKind.TASK_FAILED, detail, a.job_id), Schedule(rep)]
        return [Schedule(rep)]

    def _fetch_failed(self, ev: FetchFailed, inputs: list[OutputRef] | None) -> list[ControlAction]:
        """Pass a fetch failure on, marked stale when the output was known bad.

        A reader dispatched before an output was found bad still holds the old
        ref; when it fails on it too, the producer is already being re-made, and
        counting that against the reader's retries could fail a healthy job. The
        scheduler cannot tell (the report names the map task, not the output), so
        this core, which saw the dispatch, marks a second failure on the same
        output, or one on a worker already declared lost, as ``stale``.
        """
        job_id = ev.attempt.job_id
        block = None
        if inputs is not None and 0 <= ev.map_partition < len(inputs):
            # One map output serves every reader, each its own bucket: key on the
            # output (the block name without its ":bucket" suffix).
            block = inputs[ev.map_partition].block.rsplit(":", 1)[0]
        key = (job_id, ev.source_worker, block or "")
        stale = ev.source_worker in self.lost or (block is not None and key in self.bad_outputs)
        detail = f"stage {ev.map_stage} map {ev.map_partition} from {ev.source_worker}"
        if stale:
            marked = msgspec.structs.replace(ev, stale=True)
            return [
                RecordEvent(EventKind.FETCH_FAILED, detail + " (known bad)", job_id),
                Schedule(marked),
            ]
        if block is not None:
            self.bad_outputs.add(key)
        return [RecordEvent(EventKind.FETCH_FAILED, detail, job_id), Schedule(ev)]

    # -- applied commands and retention ------------------------------------------------
    def _applied(self, cmd: JobCommand, result: ApplyResult) -> list[ControlAction]:
        if isinstance(cmd, JobDeleted):
            self.expiring.discard(cmd.job_id)
        if not result.accepted:
            return []
        if isinstance(cmd, JobSubmitted):
            name = cmd.options.name or ""
            return [RecordEvent(EventKind.JOB_SUBMITTED, name, cmd.job_id, cmd.submitted_at)]
        if isinstance(cmd, OutputLost):
            detail = f"stage {cmd.stage} partition {cmd.partition}"
            return [RecordEvent(EventKind.OUTPUT_LOST, detail, cmd.job_id)]
        if isinstance(cmd, JobFailedCmd):
            what = (cmd.error.message.splitlines() or [""])[0]
            cancelled = cmd.error.kind == "cancelled"
            kind = EventKind.JOB_CANCELLED if cancelled else EventKind.JOB_FAILED
            ended = RecordEvent(kind, what, cmd.job_id, cmd.finished_at)
            return [ended, *self._job_over(cmd.job_id)]
        if isinstance(cmd, JobFinished):
            return [
                RecordEvent(EventKind.JOB_FINISHED, "", cmd.job_id, cmd.finished_at),
                *self._job_over(cmd.job_id),
            ]
        return []

    def _job_over(self, job_id: str) -> list[ControlAction]:
        for key in [k for k in self.dispatch_counts if k[0] == job_id]:
            del self.dispatch_counts[key]
        self.stolen = {k for k in self.stolen if k[0] != job_id}
        self.bad_outputs = {k for k in self.bad_outputs if k[0] != job_id}
        for attempt in [a for a in self.reader_inputs if a.job_id == job_id]:
            del self.reader_inputs[attempt]
        return [JobOver(job_id)]

    def _expire(self, wall: float, jobs: Mapping[str, JobRecord]) -> list[ControlAction]:
        """Finished jobs older than ``job_retention_s`` (0: keep), judged from the wall
        clock against the job's recorded times, at most once per ``expiry_interval_s``."""
        retention = self.config.job_retention_s
        if retention <= 0 or wall - self.last_expiry < self.config.expiry_interval_s:
            return []
        self.last_expiry = wall
        expired = [
            rec.job_id
            for rec in jobs.values()
            if rec.status != "running"
            and wall - (rec.finished_at or rec.submitted_at) > retention
            and rec.job_id not in self.expiring
        ][: self.config.expiries_per_round_max]
        actions: list[ControlAction] = []
        for job_id in expired:
            self.expiring.add(job_id)
            actions += [RecordEvent(EventKind.JOB_EXPIRED, f"older than {retention:g} s", job_id)]
            actions.append(ExpireJob(job_id))
        return actions


def task_event(
    report: TaskReport, worker: str, now: float
) -> TaskSucceeded | TaskStarted | TaskFailed | FetchFailed:
    """The scheduler's event for ``worker``'s report: the coordinator's clock times it
    (the scheduler compares it with its own ``now``; a worker's clock is another
    machine's), and ``worker`` is the member whose connection it came on.

    The one place a report becomes a core event; most common kinds first (every task
    reports its success, most their start).
    """
    if isinstance(report, SucceededReport):
        return TaskSucceeded(report.attempt, worker, report.outputs, now)
    if isinstance(report, StartedReport):
        return TaskStarted(report.attempt, worker, now)
    if isinstance(report, FailedReport):
        return TaskFailed(
            report.attempt,
            worker,
            report.kind,
            now,
            report.message,
            report.exc_type,
            report.traceback,
        )
    return FetchFailed(
        report.attempt,
        worker,
        report.map_stage,
        report.map_partition,
        report.source_worker,
        now,
    )
