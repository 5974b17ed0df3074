"""The coordinator's messages to its workers: the scheduler's dispatches and cancels,
batched per worker and sent once per burst of steps.

A step often dispatches many tasks at once (a stage starts, a worker joins): one
``RunTasks`` per worker per loop turn instead of one message per task. The
scheduler's ``Dispatch`` becomes the wire's ``TaskOrder`` here (``task_order``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from lepton_ai.compute.job_state import JobStateMachine
from lepton_ai.compute.scheduler_events import Cancel, Dispatch, TaskAttempt
from lepton_ai.node.coord_client_api import WorkerView
from lepton_ai.node.messages import CancelTasks, JobPlanBlob, RunTasks, TaskOrder


class Outbox:
    def __init__(
        self,
        workers: dict[str, WorkerView],
        jobs: JobStateMachine,
        gone: Callable[[str, TaskAttempt], None],
    ) -> None:
        self.workers = workers  # the coordinator's members (shared, not copied)
        self.jobs = jobs
        self.gone = gone  # (worker, attempt) batched for a worker lost before the flush
        self._tasks: dict[str, RunTasks] = {}
        # (worker, queued_only) -> attempts to cancel, sent after the dispatches of
        # the same loop turn: a steal of an attempt dispatched in this turn must
        # reach the worker after the attempt itself.
        self._cancels: dict[tuple[str, bool], list[TaskAttempt]] = {}
        self._flush_scheduled = False

    def dispatch(self, d: Dispatch) -> None:
        """Queue ``d`` for its worker (a member), with the job's plan the first time."""
        a = d.attempt
        view = self.workers[d.worker]
        batch = self._tasks.setdefault(d.worker, RunTasks([], []))
        if a.job_id not in view.plans_sent:
            rec = self.jobs.job(a.job_id)
            if rec is not None:
                replicas = rec.options.shuffle_replicas
                batch.plans.append(JobPlanBlob(a.job_id, rec.plan, replicas))
                view.plans_sent.add(a.job_id)
        batch.tasks.append(task_order(d))

    def cancel(self, c: Cancel) -> None:
        self._cancels.setdefault((c.worker, c.queued_only), []).append(c.attempt)

    def clear(self) -> None:
        self._tasks.clear()
        self._cancels.clear()

    def flush_soon(self) -> None:
        """After this loop turn's steps: one flush for all they queued."""
        if (self._tasks or self._cancels) and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        tasks, self._tasks = self._tasks, {}
        cancels, self._cancels = self._cancels, {}
        for worker_id, batch in tasks.items():
            view = self.workers.get(worker_id)
            if view is None:
                for order in batch.tasks:
                    self.gone(worker_id, order.attempt)
                continue
            view.conn.send_nowait(batch)
        for (worker_id, queued_only), attempts in cancels.items():
            view = self.workers.get(worker_id)
            if view is not None:  # a lost worker's attempts are void already
                view.conn.send_nowait(CancelTasks(attempts, queued_only))


def task_order(d: Dispatch) -> TaskOrder:
    """What the worker needs of ``d``: not ``worker`` (it is the receiver) nor
    ``speculative`` (a backup runs like any attempt)."""
    return TaskOrder(d.attempt, d.slot, d.inputs, d.addresses)
