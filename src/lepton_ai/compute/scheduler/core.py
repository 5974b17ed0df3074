"""The sans-I/O scheduler core: events in, actions out (see ``scheduler_events``).

It decides where each task attempt runs, retries infrastructure failures, fails
a job on a user exception, re-runs map tasks whose output was lost, and starts
speculative backups of stragglers. It never writes durable state: facts go out
as ``Propose(command)`` and come back as ``Applied`` once the job state machine
(``job_state.py``) has applied them, in log order, so every decision that matters
after a failover is in the log. Everything else here is soft state, rebuilt by
``Scheduler.from_state`` plus the workers' ``WorkerJoined(running=...)`` reports.

Like Spark's DAGScheduler, a stage runs once its parent stage's outputs are
all present; unlike it, there is one linear chain of stages per job. Each task
moves through the states of ``task_state`` by its transition table; the parts
live in ``placement``, ``speculation`` and ``recovery``; this module dispatches
events and handles reports and applied commands.
"""

from __future__ import annotations

from collections.abc import Collection

from lepton_ai.compute.job_state import (
    ErrorInfo,
    JobDeleted,
    JobFailedCmd,
    JobFinished,
    JobState,
    JobSubmitted,
    TaskFinished,
    TaskOutcome,
)
from lepton_ai.compute.plan import decode_plan
from lepton_ai.compute.scheduler.base import Job
from lepton_ai.compute.scheduler.recovery import Recovery
from lepton_ai.compute.scheduler.speculation import Speculation
from lepton_ai.compute.scheduler.task_state import (
    COMMITTING,
    DONE,
    LOSS_APPLIED,
    LOSS_REJECTED,
    LOST,
    RESULT_APPLIED,
    RESULT_PROPOSED,
    RESULT_REJECTED,
    RESULT_REJECTED_RUNNING,
    UNFINISHED,
    Task,
)
from lepton_ai.compute.scheduler_events import (
    Applied,
    FetchFailed,
    ProposeFailed,
    SchedulerAction,
    SchedulerConfig,
    SchedulerEvent,
    TaskAttempt,
    TaskFailed,
    TaskStarted,
    TaskSucceeded,
    Tick,
    WorkerJoined,
    WorkerLost,
)


class Scheduler(Speculation, Recovery):
    """``step(event) -> list[action]``; one instance per leadership term (``epoch``)."""

    @classmethod
    def from_state(
        cls,
        state: JobState,
        now: float,
        *,
        epoch: int,
        config: SchedulerConfig | None = None,
        expected_workers: Collection[str] = (),
    ) -> Scheduler:
        """Rebuild after a failover from the applied state (new leader, new ``epoch``).

        Feed ``Applied`` only for commands applied after ``state``. Dispatch waits
        for workers to re-join and report their running attempts: until every
        expected worker (``expected_workers`` plus those holding recorded outputs)
        and at least one worker has joined, or ``failover_grace_s`` has passed.
        Then outputs on workers that never re-joined count as lost.
        """
        sched = cls(config, epoch=epoch)
        sched._restore(state, now, expected_workers)
        return sched

    # ------------------------------------------------------------------ API

    def step(self, event: SchedulerEvent) -> list[SchedulerAction]:
        """Handle one event; return the actions to carry out, in order."""
        self._out = []
        if isinstance(event, Tick):
            self._tick(event.now)
        elif isinstance(event, Applied):
            self._applied(event)
        elif isinstance(event, TaskSucceeded):
            self._succeeded(event)
        elif isinstance(event, TaskFailed):
            self._failed(event)
        elif isinstance(event, FetchFailed):
            self._fetch_failed(event)
        elif isinstance(event, TaskStarted):
            run = self._runs.get(event.attempt)
            if run is not None and run.worker == event.worker:
                run.start = event.now
        elif isinstance(event, WorkerJoined):
            self._worker_joined(event)
        elif isinstance(event, WorkerLost):
            self._worker_lost(event.worker, event.now)
        elif isinstance(event, ProposeFailed):
            if len(self._reproposals) < self.config.reproposals_max:
                self._reproposals.append(event.command)
        else:
            raise TypeError(f"not a scheduler event: {type(event).__name__}")
        self._check_grace(event.now)
        self._schedule(event.now)
        if isinstance(event, Tick):
            self._speculate(event.now)
        out, self._out = self._out, []
        return out

    def jobs(self) -> list[str]:
        """Ids of the jobs being scheduled (running, not yet closed)."""
        return list(self._jobs)

    def running(self) -> list[tuple[TaskAttempt, str, int]]:
        """(attempt, worker, slot) of every attempt occupying a slot."""
        return [(r.attempt, r.worker, r.slot) for r in self._runs.values()]

    # ------------------------------------------------------------------ reports

    def _succeeded(self, ev: TaskSucceeded) -> None:
        found = self._task_of(ev.attempt)
        if found is None or found[1].state not in UNFINISHED:
            self._release(ev.attempt, ev.worker)
            return  # a backup or a retry lost the race (or the job closes): output discarded
        job, task = found
        spec = job.plan.stages[task.stage]
        ok = (
            len(ev.outputs) == 1 and (ev.outputs[0].data is None) != (ev.outputs[0].obj is None)
            if spec.is_result
            else spec.shuffle_write is not None
            and len(ev.outputs) == spec.shuffle_write.num_buckets
        )
        if not ok:
            self._release(ev.attempt, ev.worker)
            self._count_failure(job, task, "worker reported malformed outputs", ev.now)
            return
        # Straight on to COMMITTING, also when this was its last live attempt (checking
        # first is the same: releasing an attempt changes neither the job nor the checks).
        run = self._release(ev.attempt, ev.worker, settle=False)
        task.to(RESULT_PROPOSED)
        job.proposed_count[task.stage] += 1
        duration = ev.now - run.start if run is not None else 0.0
        a = ev.attempt
        # Urgent only once no other task of the stage is left to report (its commit
        # starts the next stage or ends the job); the host may batch the others.
        stage_left = len(job.tasks[task.stage]) - job.done_count[task.stage]
        self._propose(
            TaskFinished(
                a.job_id, a.stage, a.partition, a.epoch, a.attempt, ev.worker, ev.outputs, duration
            ),
            urgent=job.proposed_count[task.stage] >= stage_left,
        )

    def _failed(self, ev: TaskFailed) -> None:
        run = self._release(ev.attempt, ev.worker)
        found = self._task_of(ev.attempt)
        if found is None:
            return
        job, task = found
        if run is None or ev.kind == "cancelled":
            if self._runnable(job, task):
                self._enqueue(job, task)
            return
        if ev.kind == "user" and not job.options.retry_exceptions:
            error = ErrorInfo(
                "user", ev.message, task.stage, task.partition, ev.exc_type, ev.traceback
            )
            self._fail_job(job, error, ev.now)
            return
        what = f"{ev.exc_type}: {ev.message}" if ev.exc_type else ev.message or ev.kind
        self._count_failure(job, task, what, ev.now)

    # ------------------------------------------------------------------ applied commands

    def _applied(self, ev: Applied) -> None:
        cmd = ev.command
        if isinstance(cmd, JobSubmitted):
            if ev.result.accepted and cmd.job_id not in self._jobs:
                self._enqueue_ready(self._add_job(cmd.job_id, decode_plan(cmd.plan), cmd.options))
            return
        if isinstance(cmd, (JobFinished, JobFailedCmd, JobDeleted)):
            if ev.result.accepted:
                self._close_job(cmd.job_id)
            elif cmd.job_id in self._jobs and not isinstance(cmd, JobDeleted):
                self._jobs[cmd.job_id].closing = False  # re-checked on the next Tick
            return
        job = self._jobs.get(cmd.job_id)
        if job is None:
            return
        if not (0 <= cmd.stage < len(job.tasks)) or not (
            0 <= cmd.partition < len(job.tasks[cmd.stage])
        ):
            return
        task = job.tasks[cmd.stage][cmd.partition]
        if isinstance(cmd, TaskFinished):
            self._applied_task_finished(job, task, cmd, ev)
        else:
            self._applied_output_lost(job, task, ev.result.accepted)

    def _applied_task_finished(self, job: Job, task: Task, cmd: TaskFinished, ev: Applied) -> None:
        if not ev.result.accepted:
            # Ours, or an earlier leader's for the same task: either ends COMMITTING. If
            # ours is still in flight, it later applies as an earlier leader's would
            # (RESULT_APPLIED from PENDING/RUNNING) or is rejected too.
            if task.state is COMMITTING:
                job.proposed_count[task.stage] -= 1
                task.to(RESULT_REJECTED_RUNNING if task.runs else RESULT_REJECTED)
            if self._runnable(job, task):
                self._enqueue(job, task)
            return
        if task.state is COMMITTING:
            job.proposed_count[task.stage] -= 1
        task.to(RESULT_APPLIED)  # InvariantError from DONE or LOST: a second result
        task.outcome = TaskOutcome(cmd.epoch, cmd.attempt, cmd.worker, cmd.outputs, cmd.duration_s)
        job.done_count[task.stage] += 1
        job.durations[task.stage].append(cmd.duration_s)
        for run in task.runs:
            self._cancel(run)  # the backup or original that lost; its slot frees on its report
        task.runs.clear()
        is_map = task.stage < len(job.tasks) - 1
        if is_map and self._holder(task.outcome) is None and self._grace_over(ev.now):
            self._invalidate(job, task, ev.now)  # recorded on a worker that is already gone
            return
        if job.stage_complete(task.stage):
            self._stage_completed(job, task.stage, ev.now)

    def _stage_completed(self, job: Job, stage: int, now: float) -> None:
        """All outputs of ``stage`` are present: start the next stage, or finish the job.

        Called on the transition only, so the work is O(partitions) once per stage
        (plus once per re-completion after a lost output), never per task.
        """
        if stage == len(job.tasks) - 1:
            if not job.closing:
                job.closing = True
                self._propose(JobFinished(job.job_id, now))
            return
        for task in job.tasks[stage + 1]:
            if self._runnable(job, task):
                self._enqueue(job, task)

    def _applied_output_lost(self, job: Job, task: Task, accepted: bool) -> None:
        state = task.state
        if accepted:
            if state is DONE or state is LOST:
                if state is DONE:
                    job.done_count[task.stage] -= 1  # proposed by an earlier leader
                task.to(LOSS_APPLIED)
                task.outcome = None
            if self._runnable(job, task):
                self._enqueue(job, task)
        elif state is LOST:
            task.to(LOSS_REJECTED)
            job.done_count[task.stage] += 1

    # ------------------------------------------------------------------ time

    def _tick(self, now: float) -> None:
        while self._reproposals:
            self._propose(self._reproposals.popleft())
        if any(j.options.task_timeout_s is not None for j in self._jobs.values()):
            self._expire_timeouts(now)
        for job in list(self._jobs.values()):
            last = len(job.tasks) - 1
            if not job.closing and job.stage_complete(last):
                self._stage_completed(job, last, now)  # a rejected JobFinished: try again
