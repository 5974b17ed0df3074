"""Placement: which queued task runs on which worker's slot, and work stealing.

Balance before locality: a task goes to the worker with the fewest attempts per
executor, and of those to the one holding most of its input bytes. When slots
are free and nothing is queued, attempts still waiting in a busy worker's lanes
are moved to the idle one (``Cancel(queued_only=True)``).
"""

from __future__ import annotations

import msgspec

from lepton_ai.compute.job_state import OutputRef
from lepton_ai.compute.scheduler.base import Job, SchedulerBase, Worker
from lepton_ai.compute.scheduler.task_state import RUNNING, Run, Task
from lepton_ai.compute.scheduler_events import Cancel, Dispatch, TaskAttempt
from lepton_ai.errors import InvariantError


class Placement(SchedulerBase):
    def _schedule(self, now: float) -> None:
        if not self._workers or not self._grace_over(now):
            return
        free = self.free_slots()
        for job in list(self._jobs.values()):
            while free > 0 and job.queue:
                task = job.queue.popleft()
                task.queued = False
                if not self._runnable(job, task):
                    continue  # stale entry; re-queued when it becomes runnable
                thief = self._workers.get(task.steal_to or "")
                worker = thief if thief is not None and thief.free else None
                worker = worker or self._pick_worker(job, task, exclude=None)
                if worker is None:
                    self._enqueue(job, task)
                    return
                self._dispatch(job, task, worker, now, speculative=False)
                free -= 1
        if free > 0 and self.config.steal:
            self._steal()

    def _steal(self) -> None:
        """Slots are free and nothing is queued: move unstarted attempts to them.

        Workers line up the attempts of their scheduler slots behind the running
        one (``pipeline_depth``), so at the end of a stage, or behind a slow task,
        one node can hold waiting work while another idles. The busiest worker
        (live attempts per executor) is asked (``Cancel(queued_only=True)``) to
        give up its newest attempts, the least likely to have started; one that
        did start is left to finish. A given-up attempt comes back as
        ``TaskFailed("cancelled")`` and is queued again, for the idle worker.
        No attempt is duplicated, so first-result-wins is untouched.
        """
        loads = dict.fromkeys(self._workers, 0)
        room = {wid: len(w.free) for wid, w in self._workers.items()}
        movable: dict[str, list[Run]] = {}
        for run in self._runs.values():
            if run.cancelled or run.worker not in loads:
                continue
            if run.stolen_for is not None:
                if run.stolen_for in loads:  # on its way to the thief: count it there
                    loads[run.stolen_for] += 1
                    room[run.stolen_for] -= 1
                continue
            loads[run.worker] += 1
            if not run.speculative:
                movable.setdefault(run.worker, []).append(run)
        execs = {wid: w.executors for wid, w in self._workers.items()}
        for wid in list(movable):
            if loads[wid] <= execs[wid]:
                del movable[wid]  # nothing waits there: every attempt runs
            else:
                movable[wid].sort(key=lambda r: (r.attempt.epoch, r.attempt.attempt))
        gap = self.config.steal_imbalance_min
        # The busiest movable worker, kept while neither ``loads`` nor ``movable``
        # change: a thief that cannot take from it leaves both as they were, so the
        # next thief would find the same one. Re-finding it for every thief cost
        # O(workers^2) per call, on every step near the end of a stage
        # (benchmarks/sim_scale_bench.py).
        busiest: str | None = None
        for thief in sorted(room, key=lambda wid: -room[wid]):
            while room[thief] > 0 and movable:
                if busiest is None:
                    busiest = max(movable, key=lambda wid: loads[wid] / execs[wid])
                victim = busiest
                # Per executor, the victim must lead by ``gap`` (cross-multiplied).
                if loads[victim] * execs[thief] < (loads[thief] + gap) * execs[victim]:
                    break
                busiest = None  # an attempt is taken from ``movable`` below
                run = movable[victim].pop()
                if not movable[victim] or loads[victim] - 1 <= execs[victim]:
                    del movable[victim]
                found = self._task_of(run.attempt)
                if found is None or len(found[1].runs) != 1 or found[1].state is not RUNNING:
                    continue
                run.stolen_for = thief
                found[1].steal_to = thief
                loads[victim] -= 1
                loads[thief] += 1
                room[thief] -= 1
                self._out.append(Cancel(run.attempt, run.worker, queued_only=True))

    def _input_bytes_by_worker(self, job: Job, task: Task) -> dict[str, int]:
        sizes: dict[str, int] = {}
        if task.stage == 0:
            return sizes
        for parent in job.tasks[task.stage - 1]:
            if parent.outcome is not None:
                ref = parent.outcome.outputs[task.partition]
                for holder in (ref.worker, *ref.replicas):
                    sizes[holder] = sizes.get(holder, 0) + ref.size_bytes
        return sizes

    def _pick_worker(
        self, job: Job, task: Task, exclude: str | None, idle_executor: bool = False
    ) -> Worker | None:
        """A worker with a free slot: the one with the fewest attempts per executor
        (they wait in line there), and of those the one holding most input bytes.

        Balance before locality: a reducer waiting behind others on the node that
        holds its input loses more than fetching it costs (the merge tasks of a
        reduce tree would otherwise all line up on one node while another idles).
        """
        candidates = [
            w
            for w in self._workers.values()
            if w.free
            and w.worker_id != exclude
            and (not idle_executor or w.slots - len(w.free) < w.executors)
        ]
        if not candidates:
            return None
        sizes = self._input_bytes_by_worker(job, task)
        return max(
            candidates,
            key=lambda w: (-(w.slots - len(w.free)) / w.executors, sizes.get(w.worker_id, 0)),
        )

    def _inputs(self, job: Job, task: Task) -> tuple[list[OutputRef], dict[str, str]]:
        if task.stage == 0:
            return [], {}
        refs: list[OutputRef] = []
        for parent in job.tasks[task.stage - 1]:
            if parent.outcome is None:
                raise InvariantError(
                    f"dispatching shuffle reader {job.job_id}/{task.stage}/{task.partition}"
                    f" before its input from map {parent.partition} exists"
                )
            ref = parent.outcome.outputs[task.partition]
            holder = self._holder(parent.outcome)
            if holder is not None and holder != ref.worker:
                ref = msgspec.structs.replace(ref, worker=holder)  # read the replica
            refs.append(ref)
        addresses = {
            r.worker: self._workers[r.worker].address for r in refs if r.worker in self._workers
        }
        return refs, addresses

    def _dispatch(
        self, job: Job, task: Task, worker: Worker, now: float, speculative: bool
    ) -> None:
        slot = worker.free.pop()
        self._next_attempt += 1
        attempt = TaskAttempt(
            job.job_id, task.stage, task.partition, self.epoch, self._next_attempt
        )
        run = Run(attempt, worker.worker_id, slot, now, speculative)
        self._add_run(task, run)
        task.steal_to = None
        inputs, addresses = self._inputs(job, task)
        self._out.append(Dispatch(attempt, worker.worker_id, slot, inputs, addresses, speculative))
