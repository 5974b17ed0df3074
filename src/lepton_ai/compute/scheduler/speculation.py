"""Slow attempts: speculative backups of stragglers, and ``task_timeout_s``.

A straggler (running longer than ``speculation_multiplier`` x its stage's median,
once ``speculation_quantile`` of the stage is done) gets one backup, only on an
idle executor; the first result wins and the loser is cancelled when the winner
is applied. An attempt past its job's ``task_timeout_s`` is killed and retried.
"""

from __future__ import annotations

from lepton_ai.compute.scheduler.base import Job
from lepton_ai.compute.scheduler.placement import Placement
from lepton_ai.compute.scheduler.task_state import RUNNING, Run
from lepton_ai.compute.scheduler_events import Cancel


class Speculation(Placement):
    def _expire_timeouts(self, now: float) -> None:
        """Kill attempts running past their job's ``task_timeout_s``; retry them.

        Scheduler slot s of a worker runs on its executor s % executors, one
        attempt at a time: only the oldest live attempt of each such lane can be
        running, so only it is timed (the others only wait in line; their clock
        restarts when the one ahead of them is killed). A killed attempt counts
        as an infrastructure failure; its slot frees when its report arrives.
        """
        heads: dict[tuple[str, int], Run] = {}
        for run in self._runs.values():
            w = self._workers.get(run.worker)
            if run.cancelled or w is None:
                continue
            lane = (run.worker, run.slot % w.executors)
            head = heads.get(lane)
            if head is None or run.start < head.start:
                heads[lane] = run
        for (worker, executor), run in heads.items():
            found = self._task_of(run.attempt)
            limit = found[0].options.task_timeout_s if found is not None else None
            if found is None or limit is None or now - run.start <= limit:
                continue
            job, task = found
            what = f"attempt ran longer than task_timeout_s={limit:g} on {worker}"
            run.cancelled = True
            self._out.append(Cancel(run.attempt, worker, reason=what))  # kills its executor
            self._drop_run(task, run)
            execs = self._workers[worker].executors
            for other in self._runs.values():
                if other.worker == worker and other.slot % execs == executor:
                    other.start = max(other.start, now)
            self._count_failure(job, task, what, now)

    def _speculate(self, now: float) -> None:
        thresholds: dict[tuple[str, int], float | None] = {}
        for run in list(self._runs.values()):
            if run.cancelled or run.speculative:
                continue
            found = self._task_of(run.attempt)
            if found is None:
                continue
            job, task = found
            if not job.options.speculation or task.backup_launched or len(task.runs) != 1:
                continue
            if task.state is not RUNNING or not job.stage_ready(task.stage):
                continue  # its result is in, or its inputs were lost: no backup reads them
            key = (job.job_id, task.stage)
            if key not in thresholds:
                thresholds[key] = self._straggler_threshold(job, task.stage)
            limit = thresholds[key]
            if limit is None or now - run.start <= limit:
                continue
            # Only onto an executor with nothing to do: a backup lined up behind
            # other attempts would start no sooner than the original ends.
            worker = self._pick_worker(
                job, task, exclude=run.worker, idle_executor=True
            ) or self._pick_worker(job, task, exclude=None, idle_executor=True)
            if worker is None:
                return  # no idle executor anywhere
            task.backup_launched = True
            self._dispatch(job, task, worker, now, speculative=True)

    def _straggler_threshold(self, job: Job, stage: int) -> float | None:
        n = len(job.tasks[stage])
        durations = job.durations[stage]
        if n < 2 or not durations or job.done_count[stage] < self.config.speculation_quantile * n:
            return None
        cached = job.medians.get(stage)
        if cached is None or cached[0] != len(durations):
            # Sorted in place (their order means nothing): the next call then sorts a
            # sorted run plus the few durations added since, which Timsort merges in
            # about linear time, where sorting a copy cost O(n log n) on every Tick.
            durations.sort()
            ordered = durations
            mid = len(ordered) // 2
            median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
            cached = (len(durations), median)
            job.medians[stage] = cached
        return max(self.config.speculation_multiplier * cached[1], self.config.speculation_min_s)
