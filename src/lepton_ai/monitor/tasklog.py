"""Which node ran which task attempt, and when: the leader's per-job task timeline.

A pure, bounded record fed by the coordinator shell from the scheduler's own
``Dispatch`` actions and the ``TaskSucceeded``/``TaskFailed`` events it steps, so it
sees exactly what the scheduler decided (backups, retries, cancellations) and never
a second opinion. It is the leader's soft state: a new leader starts it afresh (the
attempts of the old term that were still running show up once they report), which is
enough for the dashboard's timeline chart and ``job.report()``'s measured terms.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal

import msgspec

from lepton_ai.compute.scheduler_events import TaskAttempt

SPANS_PER_JOB_MAX = 20_000  # the attempts of one job kept (oldest dropped first)
JOBS_MAX = 64  # jobs kept; the least recently touched go first

Outcome = Literal["running", "succeeded", "failed", "user_error", "cancelled", "lost"]
DispatchKind = Literal["first", "retry", "backup"]


class TaskSpan(msgspec.Struct, frozen=True):
    """One attempt of one task. Times are wall-clock seconds at the leader:
    ``dispatched``, ``started`` (when its worker last said it began running: an
    attempt queued at a worker behind others starts later than its dispatch) and
    the report's arrival (``ended``, 0.0 while it runs). ``lost``: its worker was
    declared dead before it reported."""

    stage: int
    partition: int
    attempt: int
    worker: str
    started: float
    ended: float = 0.0
    outcome: Outcome = "running"
    speculative: bool = False
    dispatched: float = 0.0


class Span(msgspec.Struct, gc=False):
    """The mutable record the log keeps per attempt: the leader updates it in place at
    start and end, and builds ``TaskSpan``s only when asked. ``gc=False``: it holds
    only scalars and a scalar struct, so it can never be part of a reference cycle, and
    the collector need not walk the tens of thousands a busy leader keeps (tracked,
    their collections were a third of this bookkeeping's cost per task)."""

    attempt: TaskAttempt
    worker: str
    dispatched: float
    started: float
    ended: float = 0.0
    outcome: Outcome = "running"
    speculative: bool = False

    def frozen(self) -> TaskSpan:
        a = self.attempt
        return TaskSpan(
            a.stage,
            a.partition,
            a.attempt,
            self.worker,
            self.started,
            self.ended,
            self.outcome,
            self.speculative,
            self.dispatched,
        )


@dataclass
class _JobSpans:
    # Keyed by the attempt itself (a frozen scalar struct: hashing it builds no key).
    spans: OrderedDict[TaskAttempt, Span] = field(default_factory=OrderedDict)
    dropped: int = 0  # attempts pushed out by SPANS_PER_JOB_MAX
    # stage << 32 | partition of every task dispatched: a job's task count is bounded by
    # its plan's partitions, so this is too. (An int: no tuple per dispatch.)
    tasks: set[int] = field(default_factory=set)
    running: int = 0  # spans still "running": a lost worker's are looked for only here


class TaskLog:
    def __init__(
        self, spans_per_job_max: int = SPANS_PER_JOB_MAX, jobs_max: int = JOBS_MAX
    ) -> None:
        self.spans_per_job_max = spans_per_job_max
        self.jobs_max = jobs_max
        self._jobs: OrderedDict[str, _JobSpans] = OrderedDict()
        self._last: tuple[str, _JobSpans] | None = None  # the job touched last (MRU)

    def dispatched(
        self, a: TaskAttempt, worker: str, speculative: bool, now: float
    ) -> DispatchKind:
        """Open the attempt's span; says whether it is the task's first run, a retry
        or a speculative backup."""
        job = self._job(a.job_id)
        spans = job.spans
        spans[a] = Span(a, worker, now, now, speculative=speculative)
        job.running += 1
        if len(spans) > self.spans_per_job_max:
            _, old = spans.popitem(last=False)
            if old.outcome == "running":
                job.running -= 1
            job.dropped += 1
        if speculative:
            return "backup"
        task = a.stage << 32 | a.partition
        if task in job.tasks:
            return "retry"
        job.tasks.add(task)
        return "first"

    def ended(self, a: TaskAttempt, worker: str, outcome: Outcome, now: float) -> Span | None:
        """Close the attempt's span (one it never saw start — a report of the previous
        leader's term — starts and ends at ``now``). Returns the closed span, or None
        for a second report of an attempt already closed."""
        job = self._job(a.job_id)
        span = job.spans.get(a)
        if span is None:
            span = job.spans[a] = Span(a, worker, now, now)
        elif span.outcome != "running":
            return None  # a duplicate report (or one after its worker was lost)
        else:
            job.running -= 1
        span.ended, span.outcome = now, outcome
        return span

    def started(self, a: TaskAttempt, now: float) -> None:
        """Its worker says the attempt (re)started running now (it sat queued)."""
        job = self._jobs.get(a.job_id)
        span = None if job is None else job.spans.get(a)
        if span is not None and span.outcome == "running":
            span.started = now

    def worker_lost(self, worker: str, now: float) -> int:
        """Close the lost worker's running attempts as "lost"; returns how many. A scan
        of the jobs with attempts running (rare, and bounded by the spans kept) spares
        the hot path an index of running attempts by worker."""
        lost = 0
        for job in self._jobs.values():
            if not job.running:
                continue
            for span in job.spans.values():
                if span.outcome == "running" and span.worker == worker:
                    span.ended, span.outcome = now, "lost"
                    job.running -= 1
                    lost += 1
        return lost

    def spans(self, job_id: str) -> tuple[list[TaskSpan], int]:
        """The job's attempts in dispatch order and how many were dropped."""
        job = self._jobs.get(job_id)
        if job is None:
            return [], 0
        return [span.frozen() for span in job.spans.values()], job.dropped

    def forget(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)
        if self._last is not None and self._last[0] == job_id:
            self._last = None

    def _job(self, job_id: str) -> _JobSpans:
        last = self._last
        if last is not None and last[0] == job_id:
            return last[1]  # already the most recently used
        job = self._jobs.get(job_id)
        if job is None:
            job = self._jobs[job_id] = _JobSpans()
            if len(self._jobs) > self.jobs_max:
                self.forget(next(iter(self._jobs)))
        else:
            self._jobs.move_to_end(job_id)
        self._last = (job_id, job)
        return job
