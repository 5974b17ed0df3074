"""The worker agent's task-running path (a mixin of ``WorkerAgent``).

From a ``RunTasks`` to the attempt's report:

* the job's plan is kept (bounded, most recent first) and each ``TaskOrder``
  waits in its executor's lane: scheduler slot ``s`` runs on executor
  ``s % executors``;
* a lane is fed to its executor while the executor's window has room (a shorter
  window for a stage whose tasks are slow here, so queued work can be stolen);
  the attempt's inputs are brought first (``agent_data``);
* the executor's ``ExecOutcome`` becomes the report (``outcome_report``, the one
  place), after its output was copied to other nodes if the job wants copies;
* reports wait in the outbox until the session sends them (``Reports``); the
  outbox survives a lost coordinator, bounded.

Queued attempts are reported started while what runs ahead of them is healthy,
so the scheduler does not take queueing for straggling.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import OrderedDict, deque
from typing import TYPE_CHECKING

from lepton_ai.compute.scheduler_events import FailureKind, RunningReport, TaskAttempt
from lepton_ai.errors import LeptonError
from lepton_ai.node.agent_data import DataPort
from lepton_ai.node.executor_slots import ExecutorDied, ExecutorSlot, Requeued
from lepton_ai.node.messages import (
    ExecOutcome,
    FailedReport,
    FetchFailedReport,
    RunTasks,
    StartedReport,
    SucceededReport,
    TaskOrder,
    TaskReport,
)
from lepton_ai.node.node_net import REPORT_BATCH_BYTES_MAX

if TYPE_CHECKING:
    from lepton_ai.node.agent_monitor import AgentMonitor

log = logging.getLogger("lepton_ai.worker")


class TaskRunner(DataPort):
    """Mixed into ``WorkerAgent``; the attributes below are the agent's."""

    slots: list[ExecutorSlot]
    sched_slots: int  # scheduler slots: executors x pipeline depth
    lanes: list[deque[TaskOrder]]  # per executor: orders not handed to it yet
    _lane_ready: list[asyncio.Event]
    _submitted: list[dict[TaskAttempt, TaskOrder]]  # per executor: handed, not answered
    plans: OrderedDict[str, bytes]
    outbox: list[TaskReport]
    _outbox_ready: asyncio.Event
    _generation: int  # the agent's incarnation: work of an earlier one is void
    _typical_s: dict[tuple[str, int], float]
    _finishing: set[asyncio.Task[None]]
    monitor: AgentMonitor

    # -- orders from the coordinator -------------------------------------------------
    def _take_tasks(self, msg: RunTasks) -> None:
        for blob in msg.plans:
            self.plans[blob.job_id] = blob.plan
            self.plans.move_to_end(blob.job_id)
            self._shuffle_replicas[blob.job_id] = blob.shuffle_replicas
        while len(self.plans) > self.config.plans_max:
            old, _ = self.plans.popitem(last=False)
            self._shuffle_replicas.pop(old, None)
        for d in msg.tasks:
            self._enqueue(d)

    def _drop_jobs(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            self.plans.pop(job_id, None)
            self._decoded.pop(job_id, None)
            self._shuffle_replicas.pop(job_id, None)
            self.store.delete_job(job_id)
        for slot in self.slots:
            slot.forget(job_ids)

    def _enqueue(self, d: TaskOrder) -> None:
        if not 0 <= d.slot < self.sched_slots or d.attempt.job_id not in self.plans:
            why = "no such slot" if d.attempt.job_id in self.plans else "plan not sent"
            self._report(FailedReport(d.attempt, "infra", why))
            return
        index = d.slot % len(self.slots)
        if len(self.lanes[index]) >= self.config.queued_tasks_max:
            self._report(FailedReport(d.attempt, "infra", "queue full"))
            return
        self.lanes[index].append(d)
        self._lane_ready[index].set()

    def _cancel(self, a: TaskAttempt, queued_only: bool = False) -> None:
        """Stop ``a``; with ``queued_only`` (the scheduler steals it for an idle
        node) only if it has not started: a running one is left to finish."""
        for lane in self.lanes:
            for d in lane:
                if d.attempt == a:
                    lane.remove(d)
                    self._report(FailedReport(a, "cancelled"))
                    return
        for slot, submitted in zip(self.slots, self._submitted, strict=True):
            if a in submitted:
                slot.cancel(a, queued_only)  # its reply (or the executor's death) reports it
                return

    # -- running tasks ---------------------------------------------------------------
    def _wake_lane(self, index: int) -> None:
        self._lane_ready[index].set()

    def _started(self, a: TaskAttempt) -> None:
        # It sat behind another attempt: tell the scheduler when it really
        # started, so queueing does not look like straggling.
        self._report(StartedReport(a))

    async def _slot_loop(self, index: int) -> None:
        """Feed executor ``index`` from its lane while its window has room."""
        slot, lane, ready = self.slots[index], self.lanes[index], self._lane_ready[index]
        while True:
            if not lane or not slot.can_take(self._window_for(lane[0].attempt)):
                ready.clear()
                await ready.wait()
                continue
            d = lane.popleft()
            generation = self._generation
            failed = await self._submit(index, d)
            if failed is not None and generation == self._generation:
                self._report(failed)

    def _window_for(self, a: TaskAttempt) -> int:
        """Attempts of ``a``'s stage to hand an executor at once: many while they
        are known to be short, few once they are slow (see ``ExecutorConfig``)."""
        ex = self.config.executor
        typical = self._typical_s.get((a.job_id, a.stage))
        return ex.window if typical is None or typical < ex.slow_task_s else ex.window_slow

    async def _submit(self, index: int, d: TaskOrder) -> TaskReport | None:
        """Hand ``d`` to its executor; a report only if it failed before getting there."""
        a = d.attempt
        plan = self.plans.get(a.job_id)
        if plan is None:
            return FailedReport(a, "infra", "plan forgotten")
        generation = self._generation
        missing = await self._bring_inputs(a, plan)
        if missing is not None:
            return FailedReport(a, "infra", missing)
        run = await self._gather_inputs(d)
        if isinstance(run, FetchFailedReport):
            return run
        if generation != self._generation:
            return None  # dispatched to a former incarnation
        future = await self.slots[index].submit(a.job_id, plan, run)
        self._submitted[index][a] = d
        future.add_done_callback(functools.partial(self._exec_done, index, d, generation))
        return None

    def _exec_done(
        self,
        index: int,
        d: TaskOrder,
        generation: int,
        future: asyncio.Future[ExecOutcome],
    ) -> None:
        a = d.attempt
        self._submitted[index].pop(a, None)
        if future.cancelled():
            return  # shutting down
        exc = future.exception()  # retrieved even when ignored: else asyncio logs it
        if generation != self._generation:
            return  # dispatched to a former incarnation
        report: TaskReport
        if isinstance(exc, Requeued):
            self.lanes[index].appendleft(d)  # never started: no failure to count
            self._lane_ready[index].set()
            return
        if isinstance(exc, ExecutorDied):
            kind: FailureKind = "cancelled" if exc.cancelled else "infra"
            report = FailedReport(a, kind, str(exc))
        elif exc is not None:
            raise AssertionError(f"unexpected failure of {a}: {exc!r}") from exc
        else:
            reply = future.result()
            self.monitor.executor_replied(reply)
            if reply.kind == "done":
                self._note_duration(a, reply.duration_s)
                if self._copies_wanted(d, reply):
                    self._finish_stored(d, reply, generation)
                    return
            report = outcome_report(d, reply)
        self._report(report)
        if a.job_id not in self.plans:
            # The job ended (DropJobs) while this attempt ran: what it just
            # wrote would otherwise outlive the job.
            self.store.delete_job(a.job_id)

    def _copies_wanted(self, d: TaskOrder, reply: ExecOutcome) -> bool:
        """A stored result to replicate, or a shuffle file the job wants copied."""
        if any(o.obj is not None for o in reply.outputs):
            return True
        shuffle = bool(reply.outputs) and reply.outputs[0].data is None
        return shuffle and self._shuffle_replicas.get(d.attempt.job_id, 1) > 1

    def _finish_stored(self, d: TaskOrder, reply: ExecOutcome, generation: int) -> None:
        """Copy the attempt's output to other nodes, then report the task done.

        A copy that fails leaves the output with fewer copies, never unreported:
        the scheduler waits for every attempt's report.
        """

        async def finish() -> None:
            outputs = list(reply.outputs)
            try:
                outputs = [await self._replicated(ref) for ref in outputs]
                if outputs and outputs[0].obj is None and outputs[0].data is None:
                    outputs = await self._copy_shuffle(d.attempt, outputs)
            except (OSError, LeptonError) as exc:
                log.warning("copies of %s's output failed: %s", d.attempt, exc)
            if generation == self._generation:
                self._report(SucceededReport(d.attempt, outputs))

        task = asyncio.get_running_loop().create_task(finish())
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

    def _running(self) -> list[RunningReport]:
        out = [RunningReport(d.attempt, d.slot) for sub in self._submitted for d in sub.values()]
        out.extend(RunningReport(d.attempt, d.slot) for lane in self.lanes for d in lane)
        return out

    def _refresh_queued(self) -> None:
        """Restart the scheduler's clock of attempts queued behind a healthy one.

        The scheduler times an attempt from its dispatch until ``TaskStarted``;
        an attempt waiting here behind another would look like a straggler near
        the end of a stage and get a backup for work that has not even started
        (and a backup that wins kills the executor to cancel the original). But
        behind a real straggler (running past ``straggler_factor`` x the typical
        duration of its stage here), the clock is left alone, so the scheduler's
        backups can move the waiting attempts to an idle node.
        """
        now = asyncio.get_running_loop().time()
        for slot, lane, submitted in zip(self.slots, self.lanes, self._submitted, strict=True):
            head = next(iter(slot.outstanding), None)
            if head is not None:
                typical = self._typical_s.get((head.job_id, head.stage))
                limit = self.config.straggler_factor * typical if typical is not None else 0.0
                if now - slot.running_since > max(limit, self.config.heartbeat_interval_s):
                    continue
            for d in lane:
                self._report(StartedReport(d.attempt))
            for a in submitted:
                if a != head:
                    self._report(StartedReport(a))

    def _note_duration(self, a: TaskAttempt, duration_s: float) -> None:
        key = (a.job_id, a.stage)
        old = self._typical_s.pop(key, None)
        # A moving average is enough to tell "a bit slower" from "stuck".
        self._typical_s[key] = duration_s if old is None else 0.8 * old + 0.2 * duration_s
        while len(self._typical_s) > self.config.plans_max:
            del self._typical_s[next(iter(self._typical_s))]

    # -- reports ---------------------------------------------------------------------
    def _take_batch(self) -> list[TaskReport]:
        """The oldest reports whose inline results fit one frame comfortably."""
        size = 0
        n = 0
        for rep in self.outbox:
            if isinstance(rep, SucceededReport):
                size += sum(len(o.data or b"") for o in rep.outputs)
            if n and size > REPORT_BATCH_BYTES_MAX:
                break
            n += 1
        batch = self.outbox[:n]
        del self.outbox[:n]
        return batch

    def _report(self, report: TaskReport) -> None:
        if len(self.outbox) >= self.config.outbox_reports_max:
            # The coordinator has been away long enough that it will re-dispatch
            # these anyway; dropping the oldest bounds memory.
            del self.outbox[: len(self.outbox) // 2]
        self.outbox.append(report)
        self._outbox_ready.set()


def outcome_report(order: TaskOrder, outcome: ExecOutcome) -> TaskReport:
    """The report of ``order``'s attempt for the coordinator, from its executor's outcome.

    The one place an outcome becomes a report. A corrupt shuffle input is the map
    output's fault, not the reader's: it is reported as a fetch failure of that
    map, so the scheduler re-makes it (an input the order never named is the
    executor's own failure).
    """
    a, kind = order.attempt, outcome.kind
    if kind == "done":
        return SucceededReport(a, outcome.outputs)
    if kind == "corrupt_input":
        m = outcome.map_partition
        if 0 <= m < len(order.inputs):
            return FetchFailedReport(a, a.stage - 1, m, order.inputs[m].worker)
        kind = "infra"
    return FailedReport(a, kind, outcome.message, outcome.exc_type, outcome.traceback)
