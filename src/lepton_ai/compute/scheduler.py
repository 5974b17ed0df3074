"""The sans-I/O scheduler core: events in, actions out (see ``scheduler_events``).

It decides where each task attempt runs, retries infrastructure failures, fails
a job on a user exception, re-runs map tasks whose output was lost, and starts
speculative backups of stragglers. It never writes durable state: facts go out
as ``Propose(command)`` and come back as ``Applied`` once the job state machine
(``state.py``) has applied them, in log order, so every decision that matters
after a failover is in the log. Everything else here is soft state, rebuilt by
``Scheduler.from_state`` plus the workers' ``WorkerJoined(running=...)`` reports.

Like Spark's DAGScheduler, a stage runs once its parent stage's outputs are
all present; unlike it, there is one linear chain of stages per job.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field

import msgspec

from lepton_ai.compute.plan import JobOptions, JobPlan, decode_plan
from lepton_ai.compute.scheduler_events import (
    Applied,
    Cancel,
    Dispatch,
    FetchFailed,
    Propose,
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
from lepton_ai.compute.state import (
    ErrorInfo,
    JobCommand,
    JobDeleted,
    JobFailedCmd,
    JobFinished,
    JobState,
    JobSubmitted,
    OutputLost,
    OutputRef,
    TaskFinished,
    TaskOutcome,
)


@dataclass(eq=False)
class _Run:
    attempt: TaskAttempt
    worker: str
    slot: int
    start: float
    speculative: bool
    cancelled: bool = False
    stolen_for: str | None = None  # a queued_only Cancel asked for it to move to this worker


@dataclass(eq=False)
class _Task:
    stage: int
    partition: int
    outcome: TaskOutcome | None = None
    lost_pending: bool = False  # OutputLost proposed, not applied yet
    proposed: bool = False  # TaskFinished proposed, not applied yet
    queued: bool = False
    runs: list[_Run] = field(default_factory=list)  # live (not cancelled) attempts
    failures: int = 0
    losses: int = 0
    backup_launched: bool = False
    steal_to: str | None = None  # given up by a busy worker for this idle one: place it there

    @property
    def done(self) -> bool:
        return self.outcome is not None and not self.lost_pending


@dataclass(eq=False)
class _Job:
    job_id: str
    plan: JobPlan
    options: JobOptions
    tasks: list[list[_Task]]
    done_count: list[int]
    durations: list[list[float]]
    proposed_count: list[int]  # per stage: tasks with a TaskFinished proposed, not applied
    queue: deque[_Task] = field(default_factory=deque)
    closing: bool = False  # JobFinished/JobFailed proposed
    medians: dict[int, tuple[int, float]] = field(default_factory=dict)  # stage -> (n, median)

    def stage_complete(self, stage: int) -> bool:
        return self.done_count[stage] == len(self.tasks[stage])

    def stage_ready(self, stage: int) -> bool:
        return stage == 0 or self.stage_complete(stage - 1)


@dataclass(eq=False)
class _Worker:
    worker_id: str
    address: str
    slots: int
    free: list[int]
    executors: int = 1


class Scheduler:
    """``step(event) -> list[action]``; one instance per leadership term (``epoch``)."""

    def __init__(self, config: SchedulerConfig | None = None, *, epoch: int = 0) -> None:
        self.config = config or SchedulerConfig()
        self.epoch = epoch
        self._jobs: dict[str, _Job] = {}
        self._workers: dict[str, _Worker] = {}
        self._runs: dict[TaskAttempt, _Run] = {}
        self._next_attempt = 0
        self._grace_until = float("-inf")
        self._grace_checked = True
        self._expected: set[str] = set()
        self._reproposals: deque[JobCommand] = deque()
        self._out: list[SchedulerAction] = []

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
        sched._expected = set(expected_workers)
        for rec in sorted(state.jobs.values(), key=lambda r: r.seq):
            if rec.status != "running":
                continue
            job = sched._add_job(rec.job_id, decode_plan(rec.plan), rec.options)
            for s, stage in enumerate(rec.outcomes):
                for p, outcome in enumerate(stage):
                    if outcome is not None:
                        job.tasks[s][p].outcome = outcome
                        job.done_count[s] += 1
                        job.durations[s].append(outcome.duration_s)
            sched._enqueue_ready(job)
            sched._expected.update(
                o.worker for stage in rec.outcomes[:-1] for o in stage if o is not None
            )
        sched._grace_until = now + sched.config.failover_grace_s
        sched._grace_checked = False
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

    def free_slots(self) -> int:
        return sum(len(w.free) for w in self._workers.values())

    # ------------------------------------------------------------------ jobs

    def _add_job(self, job_id: str, plan: JobPlan, options: JobOptions) -> _Job:
        if len(self._jobs) >= self.config.jobs_max:
            raise AssertionError(f"scheduler tracks more than jobs_max={self.config.jobs_max} jobs")
        tasks = [[_Task(s.stage_id, p) for p in range(s.num_partitions)] for s in plan.stages]
        job = _Job(
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

    def _enqueue(self, job: _Job, task: _Task) -> None:
        if not task.queued:
            task.queued = True
            job.queue.append(task)

    def _runnable(self, job: _Job, task: _Task) -> bool:
        return (
            not job.closing
            and task.outcome is None
            and not task.proposed
            and not task.runs
            and job.stage_ready(task.stage)
        )

    def _enqueue_ready(self, job: _Job) -> None:
        for stage in job.tasks:
            for task in stage:
                if self._runnable(job, task):
                    self._enqueue(job, task)

    def _propose(self, cmd: JobCommand, urgent: bool = True) -> None:
        self._out.append(Propose(cmd, urgent))

    @staticmethod  # keeps ``proposed_count`` in step with the tasks' flags
    def _set_proposed(job: _Job, task: _Task, proposed: bool) -> None:
        if task.proposed != proposed:
            task.proposed = proposed
            job.proposed_count[task.stage] += 1 if proposed else -1

    def _fail_job(self, job: _Job, error: ErrorInfo, now: float) -> None:
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
                task.runs.clear()

    def _cancel(self, run: _Run) -> None:
        if not run.cancelled:
            run.cancelled = True
            self._out.append(Cancel(run.attempt, run.worker))

    # ------------------------------------------------------------------ placement

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
        movable: dict[str, list[_Run]] = {}
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
        # O(workers^2) per call, on every step near the end of a stage.
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
                if found is None or len(found[1].runs) != 1 or found[1].proposed:
                    continue
                run.stolen_for = thief
                found[1].steal_to = thief
                loads[victim] -= 1
                loads[thief] += 1
                room[thief] -= 1
                self._out.append(Cancel(run.attempt, run.worker, queued_only=True))

    def _input_bytes_by_worker(self, job: _Job, task: _Task) -> dict[str, int]:
        sizes: dict[str, int] = {}
        if task.stage == 0:
            return sizes
        for parent in job.tasks[task.stage - 1]:
            if parent.outcome is not None:
                ref = parent.outcome.outputs[task.partition]
                for holder in (ref.worker, *ref.replicas):
                    sizes[holder] = sizes.get(holder, 0) + ref.size_bytes
        return sizes

    def _holder(self, outcome: TaskOutcome) -> str | None:
        """A live worker holding a map task's output: where it was made, else a live
        replica (``shuffle_replicas``), else None (the output is lost)."""
        if outcome.worker in self._workers:
            return outcome.worker
        replicas = outcome.outputs[0].replicas if outcome.outputs else []
        return next((w for w in replicas if w in self._workers), None)

    def _pick_worker(
        self, job: _Job, task: _Task, exclude: str | None, idle_executor: bool = False
    ) -> _Worker | None:
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

    def _inputs(self, job: _Job, task: _Task) -> tuple[list[OutputRef], dict[str, str]]:
        if task.stage == 0:
            return [], {}
        refs: list[OutputRef] = []
        for parent in job.tasks[task.stage - 1]:
            if parent.outcome is None:
                raise AssertionError("dispatching a shuffle reader before its inputs exist")
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
        self, job: _Job, task: _Task, worker: _Worker, now: float, speculative: bool
    ) -> None:
        slot = worker.free.pop()
        self._next_attempt += 1
        attempt = TaskAttempt(
            job.job_id, task.stage, task.partition, self.epoch, self._next_attempt
        )
        run = _Run(attempt, worker.worker_id, slot, now, speculative)
        self._runs[attempt] = run
        task.runs.append(run)
        task.steal_to = None
        inputs, addresses = self._inputs(job, task)
        self._out.append(Dispatch(attempt, worker.worker_id, slot, inputs, addresses, speculative))

    def _release(self, attempt: TaskAttempt, worker: str) -> _Run | None:
        """End ``attempt``: free its slot; return its run if it was live (not cancelled)."""
        run = self._runs.get(attempt)
        if run is None or run.worker != worker:
            return None  # unknown (an old leader's attempt) or already ended
        del self._runs[attempt]
        w = self._workers.get(run.worker)
        if w is not None:
            w.free.append(run.slot)
        job = self._jobs.get(attempt.job_id)
        if job is not None:
            task = job.tasks[attempt.stage][attempt.partition]
            if run in task.runs:
                task.runs.remove(run)
        return None if run.cancelled else run

    def _task_of(self, attempt: TaskAttempt) -> tuple[_Job, _Task] | None:
        job = self._jobs.get(attempt.job_id)
        if job is None or job.closing:
            return None
        if not (0 <= attempt.stage < len(job.tasks)):
            return None
        stage = job.tasks[attempt.stage]
        if not (0 <= attempt.partition < len(stage)):
            return None
        return job, stage[attempt.partition]

    # ------------------------------------------------------------------ reports

    def _succeeded(self, ev: TaskSucceeded) -> None:
        run = self._release(ev.attempt, ev.worker)
        found = self._task_of(ev.attempt)
        if found is None:
            return
        job, task = found
        if task.outcome is not None or task.proposed:
            return  # a backup or a retry lost the race: its output is discarded
        spec = job.plan.stages[task.stage]
        ok = (
            len(ev.outputs) == 1 and (ev.outputs[0].data is None) != (ev.outputs[0].obj is None)
            if spec.is_result
            else spec.shuffle_write is not None
            and len(ev.outputs) == spec.shuffle_write.num_buckets
        )
        if not ok:
            self._count_failure(job, task, "worker reported malformed outputs", ev.now)
            return
        self._set_proposed(job, task, True)
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

    def _count_failure(self, job: _Job, task: _Task, what: str, now: float) -> None:
        """One more failed attempt of ``task``: retry it, or fail the job past max_retries."""
        task.failures += 1
        if task.failures > job.options.max_retries:
            limit = job.options.max_retries
            msg = f"task failed {task.failures} times (max_retries={limit}); last: {what}"
            self._fail_job(job, ErrorInfo("infra", msg, task.stage, task.partition), now)
            return
        if self._runnable(job, task):
            self._enqueue(job, task)

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
        if producer.done and outcome is not None and _held_on(outcome, ev.source_worker):
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

    def _invalidate(self, job: _Job, task: _Task, now: float) -> None:
        """The task's recorded output is gone: propose OutputLost and stop counting it done."""
        outcome = task.outcome
        if outcome is None or task.lost_pending or job.closing:
            return
        task.losses += 1
        if task.losses > self.config.output_losses_max:
            limit = self.config.output_losses_max
            msg = f"output lost {task.losses} times (output_losses_max={limit})"
            self._fail_job(job, ErrorInfo("lost", msg, task.stage, task.partition), now)
            return
        task.lost_pending = True
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
                    lost = out is not None and _held_on(out, worker) and self._holder(out) is None
                    if task.done and out is not None and lost:  # no live copy left
                        self._invalidate(job, task, now)

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
        w = _Worker(ev.worker, ev.address, ev.slots, [], executors)
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
        run = _Run(attempt, worker, slot, now, speculative=False)
        self._runs[attempt] = run
        found = self._task_of(attempt)
        if found is None or found[1].outcome is not None or found[1].proposed:
            self._cancel(run)
            return
        found[1].runs.append(run)

    def _lose_run(self, run: _Run, why: str, now: float) -> None:
        self._runs.pop(run.attempt, None)
        found = self._task_of(run.attempt)
        if found is None:
            return
        job, task = found
        if run in task.runs:
            task.runs.remove(run)
        if not run.cancelled:
            self._count_failure(job, task, why, now)

    def _worker_lost(self, worker: str, now: float) -> None:
        self._workers.pop(worker, None)
        for run in [r for r in self._runs.values() if r.worker == worker]:
            self._lose_run(run, f"worker {worker} lost", now)
        self._invalidate_worker_outputs(worker, now)

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

    def _applied_task_finished(
        self, job: _Job, task: _Task, cmd: TaskFinished, ev: Applied
    ) -> None:
        if not ev.result.accepted:
            self._set_proposed(job, task, False)
            if self._runnable(job, task):
                self._enqueue(job, task)
            return
        if task.outcome is not None:
            raise AssertionError(
                f"state accepted a second result for {job.job_id}/{cmd.stage}/{cmd.partition}"
            )
        self._set_proposed(job, task, False)
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

    def _stage_completed(self, job: _Job, stage: int, now: float) -> None:
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

    def _applied_output_lost(self, job: _Job, task: _Task, accepted: bool) -> None:
        if accepted:
            if task.outcome is not None and not task.lost_pending:
                job.done_count[task.stage] -= 1  # proposed by an earlier leader
            task.outcome = None
            task.lost_pending = False
            if self._runnable(job, task):
                self._enqueue(job, task)
        elif task.lost_pending:
            task.lost_pending = False
            if task.outcome is not None:
                job.done_count[task.stage] += 1

    # ------------------------------------------------------------------ time

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

    def _tick(self, now: float) -> None:
        while self._reproposals:
            self._propose(self._reproposals.popleft())
        if any(j.options.task_timeout_s is not None for j in self._jobs.values()):
            self._expire_timeouts(now)
        for job in list(self._jobs.values()):
            last = len(job.tasks) - 1
            if not job.closing and job.stage_complete(last):
                self._stage_completed(job, last, now)  # a rejected JobFinished: try again

    def _expire_timeouts(self, now: float) -> None:
        """Kill attempts running past their job's ``task_timeout_s``; retry them.

        Scheduler slot s of a worker runs on its executor s % executors, one
        attempt at a time: only the oldest live attempt of each such lane can be
        running, so only it is timed (the others only wait in line; their clock
        restarts when the one ahead of them is killed). A killed attempt counts
        as an infrastructure failure; its slot frees when its report arrives.
        """
        heads: dict[tuple[str, int], _Run] = {}
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
            if run in task.runs:
                task.runs.remove(run)
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
            if task.outcome is not None or task.proposed or not job.stage_ready(task.stage):
                continue  # finished, or its inputs were lost: no backup reads them
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

    def _straggler_threshold(self, job: _Job, stage: int) -> float | None:
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


def _held_on(outcome: TaskOutcome, worker: str) -> bool:
    """Whether ``worker`` made or holds a replica of a map task's output."""
    return outcome.worker == worker or bool(
        outcome.outputs and worker in outcome.outputs[0].replicas
    )
