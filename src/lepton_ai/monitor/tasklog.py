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

Outcome = Literal["running", "succeeded", "failed", "user_error", "cancelled"]
DispatchKind = Literal["first", "retry", "backup"]


class TaskSpan(msgspec.Struct, frozen=True):
    """One attempt of one task. Times are wall-clock seconds at the leader: from
    dispatch to the report's arrival (``ended`` is 0.0 while it runs)."""

    stage: int
    partition: int
    attempt: int
    worker: str
    started: float
    ended: float = 0.0
    outcome: Outcome = "running"
    speculative: bool = False


@dataclass
class _JobSpans:
    spans: OrderedDict[tuple[int, int, int, int], TaskSpan] = field(default_factory=OrderedDict)
    dropped: int = 0  # attempts pushed out by SPANS_PER_JOB_MAX
    # (stage, partition) of every task dispatched: a job's task count is bounded by its
    # plan's partitions, so this is too.
    tasks: set[tuple[int, int]] = field(default_factory=set)


class TaskLog:
    def __init__(
        self, spans_per_job_max: int = SPANS_PER_JOB_MAX, jobs_max: int = JOBS_MAX
    ) -> None:
        self.spans_per_job_max = spans_per_job_max
        self.jobs_max = jobs_max
        self._jobs: OrderedDict[str, _JobSpans] = OrderedDict()

    def dispatched(
        self, a: TaskAttempt, worker: str, speculative: bool, now: float
    ) -> DispatchKind:
        """Open the attempt's span; says whether it is the task's first run, a retry
        or a speculative backup."""
        job = self._job(a.job_id)
        span = TaskSpan(a.stage, a.partition, a.attempt, worker, now, speculative=speculative)
        job.spans[_key(a)] = span
        if len(job.spans) > self.spans_per_job_max:
            job.spans.popitem(last=False)
            job.dropped += 1
        task = (a.stage, a.partition)
        if speculative:
            return "backup"
        if task in job.tasks:
            return "retry"
        job.tasks.add(task)
        return "first"

    def ended(self, a: TaskAttempt, worker: str, outcome: Outcome, now: float) -> TaskSpan | None:
        """Close the attempt's span (one it never saw start — a report of the previous
        leader's term — starts and ends at ``now``). Returns the closed span, or None
        for a second report of an attempt already closed."""
        job = self._job(a.job_id)
        old = job.spans.get(_key(a))
        if old is None:
            span = TaskSpan(a.stage, a.partition, a.attempt, worker, now, now, outcome)
        elif old.outcome != "running":
            return None  # a duplicate report: the first one counts
        else:
            span = msgspec.structs.replace(old, ended=now, outcome=outcome)
        job.spans[_key(a)] = span
        return span

    def spans(self, job_id: str) -> tuple[list[TaskSpan], int]:
        """The job's attempts in dispatch order and how many were dropped."""
        job = self._jobs.get(job_id)
        if job is None:
            return [], 0
        return list(job.spans.values()), job.dropped

    def forget(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)

    def _job(self, job_id: str) -> _JobSpans:
        job = self._jobs.get(job_id)
        if job is None:
            job = self._jobs[job_id] = _JobSpans()
            if len(self._jobs) > self.jobs_max:
                self._jobs.popitem(last=False)
        else:
            self._jobs.move_to_end(job_id)
        return job


def _key(a: TaskAttempt) -> tuple[int, int, int, int]:
    return (a.stage, a.partition, a.epoch, a.attempt)
