"""What the leading coordinator observes of the scheduler's work: the per-job task
timeline (``monitor.tasklog``) and the scheduler's Prometheus counters.

The coordinator calls it with the scheduler's own ``Dispatch`` actions and the task
reports it steps, before the scheduler sees them, so both views match what the
scheduler decided.
"""

from __future__ import annotations

import time

from lepton_ai.compute.scheduler_events import Dispatch, TaskFailed, TaskSucceeded
from lepton_ai.monitor import metrics
from lepton_ai.monitor.tasklog import Outcome, TaskLog

_FAILURE_OUTCOME: dict[str, Outcome] = {
    "user": "user_error",
    "cancelled": "cancelled",
}


class SchedulerMonitor:
    def __init__(self) -> None:
        self.tasklog = TaskLog()
        # Label children looked up once: ``labels()`` takes a lock and a dict lookup.
        self._dispatches = {
            k: metrics.TASK_DISPATCHES.labels(k) for k in ("first", "retry", "backup")
        }
        self._attempts = {
            k: metrics.TASK_ATTEMPTS.labels(k)
            for k in ("succeeded", "failed", "user_error", "cancelled")
        }

    def dispatched(self, d: Dispatch) -> None:
        kind = self.tasklog.dispatched(d.attempt, d.worker, d.speculative, time.time())
        self._dispatches[kind].inc()

    def task_ended(self, event: TaskSucceeded | TaskFailed) -> None:
        outcome: Outcome
        if isinstance(event, TaskSucceeded):
            outcome = "succeeded"
        else:
            outcome = _FAILURE_OUTCOME.get(event.kind, "failed")
        span = self.tasklog.ended(event.attempt, event.worker, outcome, time.time())
        if span is None:
            return
        self._attempts[outcome].inc()
        if outcome == "succeeded":
            stage = metrics.stage_label(span.stage)
            metrics.TASK_SECONDS.labels(stage).observe(span.ended - span.started)

    def job_submitted(self) -> None:
        metrics.JOBS_SUBMITTED.inc()
