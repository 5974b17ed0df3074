"""The cluster's timeline vocabulary: every kind of event, in one place.

An event is one line of a timeline (``node.messages.Event``: wall-clock ``t``,
``kind``, ``detail``, ``job_id``). Its kind says

* whether the leader **replicates** it through the Paxos log, so that every
  coordinator (and so a client after a failover) shows it; the others are local to
  the process that saw them (a coordinator's own start, a follower's step down);
* its **phase** in the story a timeline tells: a *fault* (something died or was
  killed), its *detection*, the *healing* that followed, a job's *progress*, or
  *info*. The dashboard, ``lepton top`` and the demo colour events by phase.

On the wire ``kind`` stays a string: a client of another version, or a program
recording its own kinds (``record_event``), must not break decoding; an unknown
kind reads as phase "info", not replicated.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

Phase = Literal["fault", "detection", "healing", "progress", "info"]


class EventKind(StrEnum):
    # -- members --------------------------------------------------------------------
    COORDINATOR_STARTED = "coordinator_started"
    LEADER = "leader"  # this coordinator won an election (local; see LEADER_ELECTED)
    LEADER_ELECTED = "leader_elected"  # from the log: every replica shows it
    STEP_DOWN = "step_down"
    NOT_LEADER = "not_leader"
    COORDINATOR_REMOVED = "coordinator_removed"
    STANDBY_PROMOTED = "standby_promoted"
    STANDBY_STARTED = "standby_started"
    WORKER_JOINED = "worker_joined"
    WORKER_LOST = "worker_lost"
    EXECUTOR_DIED = "executor_died"
    EXECUTOR_START_FAILED = "executor_start_failed"
    # -- the supervisor (LocalCluster / lepton cluster up) and fault injection ---------
    FAULT_INJECTED = "fault_injected"
    MEMBER_RESTARTED = "member_restarted"
    RESTARTED = "restarted"  # cluster.restart(): by hand
    RESTART_FAILED = "restart_failed"
    CRASH_LOOP = "crash_loop"
    MEMBER_GONE = "member_gone"
    # -- jobs and tasks ---------------------------------------------------------------
    JOB_SUBMITTED = "job_submitted"
    JOB_FINISHED = "job_finished"
    JOB_FAILED = "job_failed"
    JOB_CANCELLED = "job_cancelled"
    JOB_EXPIRED = "job_expired"
    TASK_FAILED = "task_failed"
    TASK_TIMED_OUT = "task_timed_out"
    TASK_RESCHEDULED = "task_rescheduled"
    TASK_MOVED = "task_moved"
    BACKUP_LAUNCHED = "backup_launched"
    FETCH_FAILED = "fetch_failed"
    OUTPUT_LOST = "output_lost"
    COST_CALIBRATED = "cost_calibrated"  # lepton estimate job's calibration
    # -- storage ----------------------------------------------------------------------
    REPLICA_COPY = "replica_copy"
    REPLICA_CORRUPT = "replica_corrupt"
    REPLICA_COPY_FAILED = "replica_copy_failed"
    DATA_LOST = "data_lost"
    # -- serving ----------------------------------------------------------------------
    DEPLOYMENT_CHANGED = "deployment_changed"
    REPLICA_PLACED = "replica_placed"
    REPLICA_REMOVED = "replica_removed"
    REPLICA_LOST = "replica_lost"
    UNSCHEDULABLE = "unschedulable"
    ROLLOUT_DONE = "rollout_done"
    AUTOSCALED = "autoscaled"
    # -- alerts -----------------------------------------------------------------------
    ALERT_RAISED = "alert_raised"
    ALERT_CLEARED = "alert_cleared"

    @property
    def replicated(self) -> bool:
        """The leader puts it in the log, so every coordinator shows it."""
        return self in _REPLICATED

    @property
    def phase(self) -> Phase:
        return _PHASES.get(self, "info")


_REPLICATED = frozenset(
    {
        EventKind.WORKER_JOINED,
        EventKind.WORKER_LOST,
        EventKind.TASK_RESCHEDULED,
        EventKind.TASK_MOVED,
        EventKind.BACKUP_LAUNCHED,
        EventKind.TASK_FAILED,
        EventKind.FETCH_FAILED,
        EventKind.JOB_EXPIRED,
        EventKind.OUTPUT_LOST,
        EventKind.COORDINATOR_REMOVED,
        EventKind.STANDBY_PROMOTED,
        EventKind.DEPLOYMENT_CHANGED,
        EventKind.REPLICA_PLACED,
        EventKind.REPLICA_REMOVED,
        EventKind.REPLICA_LOST,
        EventKind.UNSCHEDULABLE,
        EventKind.ROLLOUT_DONE,
        EventKind.AUTOSCALED,
        EventKind.ALERT_RAISED,
        EventKind.ALERT_CLEARED,
    }
)
# LEADER_ELECTED is in the log too, as its own command (``node.replicated``), and a
# job's submission and end (JOB_SUBMITTED, JOB_FINISHED, JOB_FAILED, JOB_CANCELLED)
# are derived from the log's own commands on every replica, stamped with the time
# the command carries: each replica shows the same entry, and a leader dying before
# it could propose a separate entry loses nothing.

_PHASES: dict[EventKind, Phase] = {
    EventKind.FAULT_INJECTED: "fault",
    EventKind.WORKER_LOST: "detection",
    EventKind.EXECUTOR_DIED: "detection",
    EventKind.EXECUTOR_START_FAILED: "fault",
    EventKind.CRASH_LOOP: "fault",
    EventKind.MEMBER_GONE: "fault",
    EventKind.RESTART_FAILED: "fault",
    EventKind.DATA_LOST: "fault",
    EventKind.REPLICA_CORRUPT: "detection",
    EventKind.REPLICA_COPY_FAILED: "detection",
    EventKind.REPLICA_LOST: "detection",
    EventKind.TASK_FAILED: "detection",
    EventKind.TASK_TIMED_OUT: "detection",
    EventKind.FETCH_FAILED: "detection",
    EventKind.OUTPUT_LOST: "detection",
    EventKind.STEP_DOWN: "detection",
    EventKind.COORDINATOR_REMOVED: "detection",
    EventKind.ALERT_RAISED: "detection",
    EventKind.UNSCHEDULABLE: "detection",
    EventKind.LEADER_ELECTED: "healing",
    EventKind.MEMBER_RESTARTED: "healing",
    EventKind.RESTARTED: "healing",
    EventKind.WORKER_JOINED: "healing",
    EventKind.STANDBY_PROMOTED: "healing",
    EventKind.STANDBY_STARTED: "healing",
    EventKind.TASK_RESCHEDULED: "healing",
    EventKind.TASK_MOVED: "healing",
    EventKind.BACKUP_LAUNCHED: "healing",
    EventKind.REPLICA_COPY: "healing",
    EventKind.REPLICA_PLACED: "healing",
    EventKind.ALERT_CLEARED: "healing",
    EventKind.JOB_SUBMITTED: "progress",
    EventKind.JOB_FINISHED: "progress",
    EventKind.JOB_FAILED: "fault",  # a user's job failing is what they must see in red
    EventKind.JOB_CANCELLED: "progress",
    EventKind.ROLLOUT_DONE: "progress",
}


def phase_of(kind: str) -> Phase:
    """The phase of a kind read off the wire (unknown kinds: "info")."""
    try:
        return EventKind(kind).phase
    except ValueError:
        return "info"
