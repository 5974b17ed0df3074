"""Recovery: lost workers and outputs, fetch failures, rebuilding after a failover.

A map output is needed while a later stage still reads it. When its last copy
is gone (its worker and every replica lost, or a reader's fetch failed), the
scheduler proposes ``OutputLost`` and re-runs the task once that applies. After a
leader change ``restore`` rebuilds the soft state from the applied job state;
the workers' ``WorkerJoined(running=...)`` reports give back their attempts.
"""

from __future__ import annotations

from collections.abc import Collection

from lepton_ai.compute.job_state import ErrorInfo, JobState, OutputLost
from lepton_ai.compute.plan import decode_plan
from lepton_ai.compute.scheduler.base import Job, SchedulerBase, Worker, held_on
from lepton_ai.compute.scheduler.task_state import (
    DONE,
    LOSS_PROPOSED,
    RESTORED,
    UNFINISHED,
    Run,
    Task,
)
from lepton_ai.compute.scheduler_events import FetchFailed, TaskAttempt, WorkerJoined


class Recovery(SchedulerBase):
    def _restore(self, state: JobState, now: float, expected_workers: Collection[str]) -> None:
        """Rebuild the running jobs from the applied ``state`` (see ``Scheduler.from_state``)."""
        self._expected = set(expected_workers)
        for rec in sorted(state.jobs.values(), key=lambda r: r.seq):
            if rec.status != "running":
                continue
            job = self._add_job(rec.job_id, decode_plan(rec.plan), rec.options)
            for s, stage in enumerate(rec.outcomes):
                for p, outcome in enumerate(stage):
                    if outcome is not None:
                        task = job.tasks[s][p]
                        task.to(RESTORED)
                        task.outcome = outcome
                        job.done_count[s] += 1
                        job.durations[s].append(outcome.duration_s)
            self._enqueue_ready(job)
            self._expected.update(
                o.worker for stage in rec.outcomes[:-1] for o in stage if o is not None
            )
        self._grace_until = now + self.config.failover_grace_s
        self._grace_checked = False

    # ------------------------------------------------------------------ lost outputs

    def _fetch_failed(self, ev: FetchFailed) -> None:
        self._release(ev.attempt, ev.worker)
        found = self._task_of(ev.attempt)
        if found is None:
            return
        job, reader = found
        if ev.map_stage != reader.stage - 1 or not (
            0 <= ev.map_partition < len(job.tasks[ev.map_stage])
        ):
            self._count_failure(job, reader, "fetch failure names a bad input", ev.now)
            return
        producer = job.tasks[ev.map_stage][ev.map_partition]
        outcome = producer.outcome
        if producer.state is DONE and outcome is not None and held_on(outcome, ev.source_worker):
            # Also when stale: if the output is still recorded where it was lost,
            # re-making it is the only way on (re-queuing the reader would fetch
            # from the dead worker again, for ever).
            self._invalidate(job, producer, ev.now)
            if self._runnable(job, reader):
                self._enqueue(job, reader)
        elif ev.stale:
            if self._runnable(job, reader):
                self._enqueue(job, reader)  # the output is being re-made: just wait
        else:
            # Stale (the output was already re-made) or naming the wrong worker: count it
            # against the reader, so a fetch that keeps failing cannot loop for ever.
            what = f"fetch of stage {ev.map_stage} map {ev.map_partition} failed"
            self._count_failure(job, reader, f"{what} from {ev.source_worker}", ev.now)

    def _invalidate(self, job: Job, task: Task, now: float) -> None:
        """The task's recorded output is gone: propose OutputLost and stop counting it done."""
        outcome = task.outcome
        if outcome is None or task.state is not DONE or job.closing:
            return
        task.losses += 1
        if task.losses > self.config.output_losses_max:
            limit = self.config.output_losses_max
            msg = f"output lost {task.losses} times (output_losses_max={limit})"
            self._fail_job(job, ErrorInfo("lost", msg, task.stage, task.partition), now)
            return
        task.to(LOSS_PROPOSED)
        job.done_count[task.stage] -= 1
        self._propose(
            OutputLost(job.job_id, task.stage, task.partition, outcome.epoch, outcome.attempt)
        )

    def _invalidate_worker_outputs(self, worker: str, now: float) -> None:
        """Outputs stored on a lost worker: re-run the ones a later stage still needs.

        Stage s's outputs are needed iff its consumer s+1 is needed and incomplete
        (the result stage is needed while the job runs). Walking down from the
        top, losing stage s+1's outputs makes s's outputs needed again: a cascade.
        Outputs nobody will read again (e.g. once all results are in) are left alone.
        """
        for job in list(self._jobs.values()):
            consumer_needed = True
            for s in range(len(job.tasks) - 2, -1, -1):
                consumer_needed = consumer_needed and not job.stage_complete(s + 1)
                if not consumer_needed:
                    break
                for task in job.tasks[s]:
                    out = task.outcome
                    lost = out is not None and held_on(out, worker) and self._holder(out) is None
                    if task.state is DONE and lost:  # no live copy left
                        self._invalidate(job, task, now)

    def _check_grace(self, now: float) -> None:
        """Once, when the failover grace ends: outputs on workers still absent are lost."""
        if not self._grace_checked and self._grace_over(now):
            self._grace_checked = True
            known = set(self._workers)
            gone = {
                t.outcome.worker
                for job in self._jobs.values()
                for stage in job.tasks[:-1]
                for t in stage
                if t.outcome is not None
                and t.outcome.worker not in known
                and self._holder(t.outcome) is None
            }
            for worker in sorted(gone):
                self._invalidate_worker_outputs(worker, now)

    # ------------------------------------------------------------------ workers

    def _worker_joined(self, ev: WorkerJoined) -> None:
        if ev.slots < 0 or not ev.worker:
            raise ValueError(f"bad WorkerJoined: {ev.worker!r} with {ev.slots} slots")
        busy: dict[int, TaskAttempt] = {}
        for rep in ev.running:
            if 0 <= rep.slot < ev.slots:
                busy[rep.slot] = rep.attempt
        old = self._workers.get(ev.worker)
        if old is not None:
            # Re-registration: our attempts there that it no longer reports are gone.
            for run in [r for r in self._runs.values() if r.worker == ev.worker]:
                if busy.get(run.slot) != run.attempt:
                    self._lose_run(run, "executor lost while its worker re-registered", ev.now)
        executors = ev.executors if 0 < ev.executors <= ev.slots else max(ev.slots, 1)
        w = Worker(ev.worker, ev.address, ev.slots, [], executors)
        self._workers[ev.worker] = w
        taken = {r.slot for r in self._runs.values() if r.worker == ev.worker}
        for slot, attempt in busy.items():
            if slot in taken:
                continue
            taken.add(slot)
            self._adopt(attempt, ev.worker, slot, ev.now)
        w.free = [s for s in range(ev.slots - 1, -1, -1) if s not in taken]

    def _adopt(self, attempt: TaskAttempt, worker: str, slot: int, now: float) -> None:
        """A worker reports an attempt we did not dispatch (failover): track or cancel it."""
        run = Run(attempt, worker, slot, now, speculative=False)
        found = self._task_of(attempt)
        if found is None or found[1].state not in UNFINISHED:
            self._runs[attempt] = run  # holds its slot until the worker reports it ended
            self._cancel(run)
            return
        self._add_run(found[1], run)

    def _lose_run(self, run: Run, why: str, now: float) -> None:
        self._runs.pop(run.attempt, None)
        found = self._task_of(run.attempt)
        if found is None:
            return
        job, task = found
        self._drop_run(task, run)
        if not run.cancelled:
            self._count_failure(job, task, why, now)

    def _worker_lost(self, worker: str, now: float) -> None:
        self._workers.pop(worker, None)
        for run in [r for r in self._runs.values() if r.worker == worker]:
            self._lose_run(run, f"worker {worker} lost", now)
        self._invalidate_worker_outputs(worker, now)
