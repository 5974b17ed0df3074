"""The scheduler's soft state and the primitives every part of it uses.

``SchedulerBase`` holds the jobs, workers and live attempts and the small steps
shared by placement, speculation, recovery and the event handlers (``core``):
queueing a task, ending an attempt, counting a failure, proposing a command.
Each part is a class on top of it; ``core.Scheduler`` combines them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from lepton_ai.compute.job_state import ErrorInfo, JobCommand, JobFailedCmd, TaskOutcome
from lepton_ai.compute.plan import JobOptions, JobPlan
from lepton_ai.compute.scheduler.task_state import (
    ATTEMPT_ENDED,
    DISPATCHED,
    PENDING,
    RUNNING,
    Run,
    Task,
)
from lepton_ai.compute.scheduler_events import (
    Cancel,
    Propose,
    SchedulerAction,
    SchedulerConfig,
    TaskAttempt,
)
from lepton_ai.errors import InvariantError


@dataclass(eq=False)
class Job:
    job_id: str
    plan: JobPlan
    options: JobOptions
    tasks: list[list[Task]]
    done_count: list[int]  # per stage: tasks in state DONE
    durations: list[list[float]]
    proposed_count: list[int]  # per stage: tasks in state COMMITTING
    queue: deque[Task] = field(default_factory=deque)
    closing: bool = False  # JobFinished/JobFailed proposed
    medians: dict[int, tuple[int, float]] = field(default_factory=dict)  # stage -> (n, median)

    def stage_complete(self, stage: int) -> bool:
        return self.done_count[stage] == len(self.tasks[stage])

    def stage_ready(self, stage: int) -> bool:
        return stage == 0 or self.stage_complete(stage - 1)


@dataclass(eq=False)
class Worker:
    worker_id: str
    address: str
    slots: int
    free: list[int]
    executors: int = 1


def held_on(outcome: TaskOutcome, worker: str) -> bool:
    """Whether ``worker`` made or holds a replica of a map task's output."""
    return outcome.worker == worker or bool(
        outcome.outputs and worker in outcome.outputs[0].replicas
    )


class SchedulerBase:
    """The state of one leadership term's scheduler (``epoch``) and its shared steps."""

    def __init__(self, config: SchedulerConfig | None = None, *, epoch: int = 0) -> None:
        self.config = config or SchedulerConfig()
        self.epoch = epoch
        self._jobs: dict[str, Job] = {}
        self._workers: dict[str, Worker] = {}
        self._runs: dict[TaskAttempt, Run] = {}
        self._next_attempt = 0
        self._grace_until = float("-inf")
        self._grace_checked = True
        self._expected: set[str] = set()
        self._reproposals: deque[JobCommand] = deque()
        self._out: list[SchedulerAction] = []

    def free_slots(self) -> int:
        """Slots free over all workers."""
        return sum(len(w.free) for w in self._workers.values())

    # ------------------------------------------------------------------ jobs

    def _add_job(self, job_id: str, plan: JobPlan, options: JobOptions) -> Job:
        if len(self._jobs) >= self.config.jobs_max:
            raise InvariantError(f"scheduler tracks more than jobs_max={self.config.jobs_max} jobs")
        tasks = [
            [Task(job_id, s.stage_id, p) for p in range(s.num_partitions)] for s in plan.stages
        ]
        job = Job(
            job_id=job_id,
            plan=plan,
            options=options,
            tasks=tasks,
            done_count=[0] * len(plan.stages),
            durations=[[] for _ in plan.stages],
            proposed_count=[0] * len(plan.stages),
        )
        self._jobs[job_id] = job
        return job

    def _enqueue(self, job: Job, task: Task) -> None:
        if not task.queued:
            task.queued = True
            job.queue.append(task)

    def _runnable(self, job: Job, task: Task) -> bool:
        return not job.closing and task.state is PENDING and job.stage_ready(task.stage)

    def _enqueue_ready(self, job: Job) -> None:
        for stage in job.tasks:
            for task in stage:
                if self._runnable(job, task):
                    self._enqueue(job, task)

    def _propose(self, cmd: JobCommand, urgent: bool = True) -> None:
        self._out.append(Propose(cmd, urgent))

    def _fail_job(self, job: Job, error: ErrorInfo, now: float) -> None:
        if not job.closing:
            job.closing = True
            self._propose(JobFailedCmd(job.job_id, error, now))

    def _close_job(self, job_id: str) -> None:
        job = self._jobs.pop(job_id, None)
        if job is None:
            return
        for stage in job.tasks:
            for task in stage:
                for run in task.runs:
                    self._cancel(run)
                task.runs.clear()  # the job and its tasks are dropped: no transition

    def _count_failure(self, job: Job, task: Task, what: str, now: float) -> None:
        """One more failed attempt of ``task``: retry it, or fail the job past max_retries."""
        task.failures += 1
        if task.failures > job.options.max_retries:
            limit = job.options.max_retries
            msg = f"task failed {task.failures} times (max_retries={limit}); last: {what}"
            self._fail_job(job, ErrorInfo("infra", msg, task.stage, task.partition), now)
            return
        if self._runnable(job, task):
            self._enqueue(job, task)

    # ------------------------------------------------------------------ attempts

    def _add_run(self, task: Task, run: Run) -> None:
        """``run`` is a live attempt of ``task`` (PENDING or RUNNING, else InvariantError)."""
        self._runs[run.attempt] = run
        task.runs.append(run)
        task.to(DISPATCHED)

    @staticmethod
    def _drop_run(task: Task, run: Run, settle: bool = True) -> None:
        """``run`` is no longer live: a RUNNING task left with none is PENDING again
        (unless ``settle`` is false: the caller moves the task on itself)."""
        if run in task.runs:
            task.runs.remove(run)
            if settle and not task.runs and task.state is RUNNING:
                task.to(ATTEMPT_ENDED)

    def _cancel(self, run: Run) -> None:
        if not run.cancelled:
            run.cancelled = True
            self._out.append(Cancel(run.attempt, run.worker))

    def _release(self, attempt: TaskAttempt, worker: str, settle: bool = True) -> Run | None:
        """End ``attempt``: free its slot; return its run if it was live (not cancelled).

        ``settle``: as for ``_drop_run``."""
        run = self._runs.get(attempt)
        if run is None or run.worker != worker:
            return None  # unknown (an old leader's attempt) or already ended
        del self._runs[attempt]
        w = self._workers.get(run.worker)
        if w is not None:
            w.free.append(run.slot)
        job = self._jobs.get(attempt.job_id)
        if job is not None:
            self._drop_run(job.tasks[attempt.stage][attempt.partition], run, settle)
        return None if run.cancelled else run

    def _task_of(self, attempt: TaskAttempt) -> tuple[Job, Task] | None:
        job = self._jobs.get(attempt.job_id)
        if job is None or job.closing:
            return None
        if not (0 <= attempt.stage < len(job.tasks)):
            return None
        stage = job.tasks[attempt.stage]
        if not (0 <= attempt.partition < len(stage)):
            return None
        return job, stage[attempt.partition]

    # ------------------------------------------------------------------ workers, time

    def _holder(self, outcome: TaskOutcome) -> str | None:
        """A live worker holding a map task's output: where it was made, else a live
        replica (``shuffle_replicas``), else None (the output is lost)."""
        if outcome.worker in self._workers:
            return outcome.worker
        replicas = outcome.outputs[0].replicas if outcome.outputs else []
        return next((w for w in replicas if w in self._workers), None)

    def _grace_over(self, now: float) -> bool:
        """Whether the failover grace has ended; once ended it stays ended.

        Latched: "every expected worker has re-joined" turns false again when one of
        them dies, and a result it reported to the old leader may still be applied
        from the log after that. With the grace "back on", such an output would be
        recorded on a dead worker without anyone judging it lost, and its readers
        would fetch from the dead worker for ever (the demo's failover hang).
        """
        if now >= self._grace_until:
            return True
        if self._workers and self._expected <= self._workers.keys():
            self._grace_until = float("-inf")
            return True
        return False
