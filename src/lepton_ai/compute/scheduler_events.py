"""Inputs (events) and outputs (actions) of the sans-I/O scheduler core.

The driver (the coordinator program, node layer) turns what it hears into
events, calls ``Scheduler.step(event)`` and carries out the returned actions:

* ``Dispatch`` -> send the task to ``worker``'s executor ``slot``. The worker
  needs the job's plan (``JobRecord.plan`` in the state machine; send it once
  per worker and job). A shuffle-read task gets ``inputs``: for each map task
  ``m`` of the parent stage, ``inputs[m]`` is where its bucket for this
  partition lives (``OutputRef``; ``size_bytes == 0``: empty, nothing to fetch;
  ``addresses`` maps worker id -> shuffle server address).
* ``Propose`` -> submit ``encode_command(command)`` to the ``LogHost``; when it is
  applied, feed back ``Applied(command, result, now)``; if the submit fails
  (``Unavailable``), feed back ``ProposeFailed``; on ``NotLeader`` drop the
  scheduler (the new leader builds its own with ``Scheduler.from_state``).
* ``Cancel`` -> stop that attempt (kill its executor or discard its output).
  The worker must still end every dispatched attempt with a final report
  (``TaskSucceeded``/``TaskFailed``/``FetchFailed``; ``TaskFailed(kind="cancelled")``
  after a cancel): a slot is free again only when its attempt's report arrives
  (or the worker is lost).

Worker ids must be unique per worker *process incarnation* (a restarted agent
joins under a new id): outputs recorded under an id are assumed gone once that
id is lost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import msgspec

from lepton_ai.compute.job_state import ApplyResult, JobCommand, OutputRef

FailureKind = Literal["infra", "user", "cancelled"]


class TaskAttempt(msgspec.Struct, frozen=True):
    """One run of task (job_id, stage, partition). ``(epoch, attempt)`` is unique per
    leadership: ``epoch`` is the scheduler's (e.g. the leader's ballot or term)."""

    job_id: str
    stage: int
    partition: int
    epoch: int
    attempt: int


class RunningReport(msgspec.Struct, frozen=True):
    """An attempt a (re)joining worker is running in ``slot``."""

    attempt: TaskAttempt
    slot: int


# ------------------------------------------------------------------ events


class WorkerJoined(msgspec.Struct, frozen=True, tag=True):
    """A worker agent registered (or re-registered with a new leader) with ``slots``
    scheduler slots served by ``executors`` processes (0: one per slot). With
    fewer executors than slots, attempts wait in line at the worker; work
    stealing balances the line per executor."""

    worker: str
    address: str
    slots: int
    now: float
    running: list[RunningReport] = []
    executors: int = 0


class WorkerLost(msgspec.Struct, frozen=True, tag=True):
    """The failure detector declared ``worker`` dead: its attempts and outputs are gone."""

    worker: str
    now: float


class TaskStarted(msgspec.Struct, frozen=True, tag=True):
    """Optional: the executor began running the attempt (refines straggler timing)."""

    attempt: TaskAttempt
    worker: str
    now: float


class TaskSucceeded(msgspec.Struct, frozen=True, tag=True):
    """The attempt finished; ``outputs`` as in ``state.TaskFinished`` (one per bucket,
    or one inline result for a result task)."""

    attempt: TaskAttempt
    worker: str
    outputs: list[OutputRef]
    now: float


class TaskFailed(msgspec.Struct, frozen=True, tag=True):
    """The attempt ended without output.

    ``kind``: ``"infra"`` (executor died, I/O error, ...), ``"user"`` (user code
    raised; ``exc_type``/``message``/``traceback`` from the executor), or
    ``"cancelled"`` (after a ``Cancel``).
    """

    attempt: TaskAttempt
    worker: str
    kind: FailureKind
    now: float
    message: str = ""
    exc_type: str = ""
    traceback: str = ""


class FetchFailed(msgspec.Struct, frozen=True, tag=True):
    """The attempt (a shuffle reader) could not fetch input ``map_partition`` of stage
    ``map_stage`` from ``source_worker`` (gone, or the block is missing/corrupt).
    The attempt is over; the producing map task is re-run.

    ``stale`` is set by the host, never by a worker: the output was already known
    bad (its worker was declared lost, or another reader failed on it), so the
    failure is not counted against the reader's retries."""

    attempt: TaskAttempt
    worker: str
    map_stage: int
    map_partition: int
    source_worker: str
    now: float
    stale: bool = False


class Applied(msgspec.Struct, frozen=True, tag=True):
    """A job command was applied by the state machine (from any proposer)."""

    command: JobCommand
    result: ApplyResult
    now: float


class ProposeFailed(msgspec.Struct, frozen=True, tag=True):
    """A ``Propose`` could not be committed (no quorum in time); it is retried on a Tick."""

    command: JobCommand
    now: float


class Tick(msgspec.Struct, frozen=True, tag=True):
    """Time passes: speculation, end of the failover grace period. Call every ~100 ms."""

    now: float


SchedulerEvent = (
    WorkerJoined
    | WorkerLost
    | TaskStarted
    | TaskSucceeded
    | TaskFailed
    | FetchFailed
    | Applied
    | ProposeFailed
    | Tick
)


# ------------------------------------------------------------------ actions


class Dispatch(msgspec.Struct, frozen=True, tag=True):
    attempt: TaskAttempt
    worker: str
    slot: int
    inputs: list[OutputRef] = []
    addresses: dict[str, str] = {}
    speculative: bool = False


class Propose(msgspec.Struct, frozen=True, tag=True):
    """Order ``command`` through the log. ``urgent=False``: nothing waits on its commit
    (a ``TaskFinished`` that does not complete its stage: the attempt's slot freed on
    the report already), so the host may hold it a few ms to share a log slot with
    others; it must send held commands before any urgent one."""

    command: JobCommand
    urgent: bool = True


class Cancel(msgspec.Struct, frozen=True, tag=True):
    """Stop ``attempt``. ``queued_only`` (work stealing): drop it only if it has not
    started yet, reporting ``TaskFailed(kind="cancelled")``; if it already runs, ignore
    the request and let it finish (its report is then handled as usual). ``reason``
    (for the job's event timeline): set when the attempt is stopped because it
    failed (ran past ``task_timeout_s``), empty when it is merely not needed."""

    attempt: TaskAttempt
    worker: str
    queued_only: bool = False
    reason: str = ""


SchedulerAction = Dispatch | Propose | Cancel


@dataclass(frozen=True)
class SchedulerConfig:
    """Bounds and knobs of the scheduler core (times in seconds of the ``now`` clock)."""

    speculation_quantile: float = 0.75  # fraction of a stage done before backups start
    speculation_multiplier: float = 1.5  # straggler: running > multiplier x stage median
    speculation_min_s: float = 0.1  # never back up a task younger than this
    failover_grace_s: float = 1.0  # after from_state: wait for workers to report
    output_losses_max: int = 4  # per task: re-runs for lost output before the job fails
    jobs_max: int = 10_000  # jobs tracked at once (the state machine bounds them too)
    reproposals_max: int = 10_000  # failed proposals kept for retry on Tick
    # Work stealing: when slots are free and nothing is queued, ask the busiest
    # worker to give up attempts it has not started (newest first) until the loads
    # per executor differ by less than ``steal_imbalance_min``; the scheduler
    # re-places them.
    steal: bool = True
    steal_imbalance_min: int = 2  # attempts per executor more on the victim than the thief
