"""A task's life in the scheduler: explicit states, one transition table, one way to move.

The scheduler used to keep a task's life in flags (``outcome``, ``lost_pending``,
``proposed``, ``runs``); only these combinations of them can occur, and each is
now one state:

=============  =========  ============  ========  ======  =========================
state          outcome    lost_pending  proposed  runs    meaning
=============  =========  ============  ========  ======  =========================
PENDING        None       no            no        none    to run (queued or waiting
                                                          for its parent stage)
RUNNING        None       no            no        1-2     attempts live (2: a backup)
COMMITTING     None       no            yes       0-2     a result is proposed
                                                          (``TaskFinished``), not yet
                                                          applied; live runs are the
                                                          losers, cancelled on apply
DONE           set        no            no        none    its output is recorded and
                                                          believed available
LOST           set        yes           no        none    its output is gone:
                                                          ``OutputLost`` proposed; it
                                                          re-runs once that applies
=============  =========  ============  ========  ======  =========================

Every other combination is impossible: the log accepts one result per output
generation and the scheduler proposes one only for a task without one; a loss is
proposed only for a recorded output; nothing dispatches a task that has a result.

There is no FAILED task state: a failed attempt sends its task back to PENDING
(a retry), and a task past ``max_retries`` fails its *job* (``JobFailed``), whose
tasks are dropped when that applies. The other per-task fields stay orthogonal to
the state on purpose: ``queued`` marks membership of the job's queue, which is
cleaned lazily (a stale entry is skipped when popped, so any state may carry it);
``backup_launched`` latches one backup per task per leadership; ``steal_to`` is a
placement hint for the next dispatch; ``failures``/``losses`` are counters.

Every state change goes through :meth:`Task.to`, which looks the step up in
``TRANSITIONS`` (an index into a tuple: no hashing, no allocation) and raises
``InvariantError`` with the task's recent history when it is not there. Like h11's
``_state.py`` and dask's ``WorkerState`` transitions, the table is the spec.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, NamedTuple

from lepton_ai.compute.job_state import TaskOutcome
from lepton_ai.compute.scheduler_events import TaskAttempt
from lepton_ai.errors import InvariantError

HISTORY_MAX: Final = 16  # transitions an InvariantError reports, per task


class TaskState(enum.IntEnum):
    """Where a task is in its life (see the module docstring for the flags it replaces)."""

    PENDING = 0
    RUNNING = 1
    COMMITTING = 2
    DONE = 3
    LOST = 4


class TaskEvent(enum.IntEnum):
    """What happened to a task, as far as its state goes."""

    DISPATCHED = 0  # an attempt was placed: dispatched, a backup, or adopted after failover
    ATTEMPT_ENDED = 1  # its last live attempt ended (failed, lost, cancelled, timed out, ...)
    RESULT_PROPOSED = 2  # an attempt succeeded: TaskFinished proposed
    RESULT_REJECTED = 3  # the log rejected the pending result; no attempt is live
    RESULT_REJECTED_RUNNING = 4  # ... and an attempt is still live
    RESULT_APPLIED = 5  # a TaskFinished for it was applied (accepted) from the log
    RESTORED = 6  # rebuilt after a failover with the result the log holds
    LOSS_PROPOSED = 7  # its recorded output is gone: OutputLost proposed
    LOSS_APPLIED = 8  # an OutputLost for it was applied (accepted)
    LOSS_REJECTED = 9  # the log rejected the pending OutputLost (a stale report)


# Module-level names for the hot path: on Python 3.11 ``TaskState.RUNNING`` goes
# through the enum's metaclass, several times the cost of a global lookup.
PENDING, RUNNING, COMMITTING, DONE, LOST = TaskState
(
    DISPATCHED,
    ATTEMPT_ENDED,
    RESULT_PROPOSED,
    RESULT_REJECTED,
    RESULT_REJECTED_RUNNING,
    RESULT_APPLIED,
    RESTORED,
    LOSS_PROPOSED,
    LOSS_APPLIED,
    LOSS_REJECTED,
) = TaskEvent
UNFINISHED: Final = frozenset((PENDING, RUNNING))  # no result proposed or recorded

TRANSITIONS: Final[Mapping[tuple[TaskState, TaskEvent], TaskState]] = MappingProxyType(
    {
        (PENDING, DISPATCHED): RUNNING,
        (RUNNING, DISPATCHED): RUNNING,  # a speculative backup, or a second adopted attempt
        (RUNNING, ATTEMPT_ENDED): PENDING,  # retried (or the job fails past max_retries)
        # From RUNNING: the usual way (a backup or original may still run: it is cancelled
        # once the result applies). From PENDING: an attempt no longer live succeeded (an
        # earlier leader's, or one given up: timed out, lost in a re-registration).
        (PENDING, RESULT_PROPOSED): COMMITTING,
        (RUNNING, RESULT_PROPOSED): COMMITTING,
        (COMMITTING, RESULT_REJECTED): PENDING,
        (COMMITTING, RESULT_REJECTED_RUNNING): RUNNING,
        # From PENDING or RUNNING: an earlier leader's result, applied from the log (or
        # ours, after a rejected result of an earlier leader ended COMMITTING early).
        # From DONE or LOST it would be a second result for one output: not allowed.
        (PENDING, RESULT_APPLIED): DONE,
        (RUNNING, RESULT_APPLIED): DONE,
        (COMMITTING, RESULT_APPLIED): DONE,
        (PENDING, RESTORED): DONE,
        (DONE, LOSS_PROPOSED): LOST,
        (DONE, LOSS_APPLIED): PENDING,  # proposed by an earlier leader
        (LOST, LOSS_APPLIED): PENDING,
        (LOST, LOSS_REJECTED): DONE,
    }
)


class Step(NamedTuple):
    """One allowed transition; the table's entries double as history records."""

    source: TaskState
    event: TaskEvent
    target: TaskState

    def __str__(self) -> str:
        return f"{self.source.name} -{self.event.name}-> {self.target.name}"


# ``_NEXT[state][event]``: the Step, or None when the table does not allow it.
_NEXT: Final = tuple(
    tuple(Step(s, e, TRANSITIONS[s, e]) if (s, e) in TRANSITIONS else None for e in TaskEvent)
    for s in TaskState
)


@dataclass(eq=False, slots=True)
class Run:
    """A live attempt: it occupies ``slot`` on ``worker`` until its report arrives."""

    attempt: TaskAttempt
    worker: str
    slot: int
    start: float
    speculative: bool
    cancelled: bool = False
    stolen_for: str | None = None  # a queued_only Cancel asked for it to move to this worker


@dataclass(eq=False, slots=True)
class Task:
    """One partition of one stage of a job, as the scheduler tracks it."""

    job_id: str
    stage: int
    partition: int
    state: TaskState = PENDING  # change it only with ``to``
    outcome: TaskOutcome | None = None  # the recorded result: set in DONE and LOST
    queued: bool = False
    runs: list[Run] = field(default_factory=list)  # live (not cancelled) attempts
    failures: int = 0
    losses: int = 0
    backup_launched: bool = False
    steal_to: str | None = None  # given up by a busy worker for this idle one: place it there
    history: list[Step] = field(default_factory=list)  # recent transitions, oldest first

    def to(self, event: TaskEvent) -> None:
        """Take the transition for ``event``; InvariantError if the table lacks it."""
        step = _NEXT[self.state][event]
        if step is None:
            raise self._invalid(event)
        self.state = step.target
        history = self.history
        history.append(step)  # a shared table entry: nothing is allocated per call
        if len(history) > 2 * HISTORY_MAX:
            del history[:HISTORY_MAX]  # trimmed once per HISTORY_MAX transitions

    def recent(self) -> list[str]:
        """The last ``HISTORY_MAX`` transitions, oldest first, as text."""
        return [str(step) for step in self.history[-HISTORY_MAX:]]

    def _invalid(self, event: TaskEvent) -> InvariantError:
        recent = self.recent()
        where = f"{self.job_id}/{self.stage}/{self.partition}"
        return InvariantError(
            f"task {where}: {event.name} is not allowed in state {self.state.name}"
            f" (last {len(recent)} transitions: {'; '.join(recent) or 'none'})",
            history=recent,
        )
