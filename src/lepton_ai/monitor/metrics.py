"""The Prometheus metrics of the cluster's processes (prometheus-client).

Every lepton process is its own Prometheus target, so the metrics live in the
process's default registry, which also carries prometheus-client's ``process_*``
(CPU, memory, open files) and ``python_*`` families. Counters and histograms are
module-level and updated where things happen (shells only: the pure cores stay
free of I/O and of this module); gauges of state that already exists somewhere
(workers, jobs, phi, storage, deployments, the Paxos log) are read at scrape time
by a collector, so keeping them costs nothing between scrapes.

Label values are bounded sets: an outcome, a stage index capped at
``STAGE_LABELS_MAX``, an event kind, or a member/deployment id of which a
cluster has few (bounded by the coordinator's own member and deployment limits).
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

STAGE_LABELS_MAX = 8  # stages past this share one label value ("8+")

# Seconds: a trivial task is ~1 ms at the leader; a long one minutes.
TASK_BUCKETS_S = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 3600.0)
# Seconds: a Paxos commit on one host is ~0.5 ms; fsync 0.1-20 ms; an election ~0.3 s.
CONSENSUS_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)

# -- the scheduler (the leading coordinator) -------------------------------------------
JOBS_SUBMITTED = Counter("lepton_jobs_submitted", "Jobs accepted (while this coordinator led)")
TASK_DISPATCHES = Counter(
    "lepton_task_dispatches",
    "Task attempts dispatched, by kind: first run, retry after a failure, speculative backup",
    ["kind"],
)
TASK_ATTEMPTS = Counter(
    "lepton_task_attempts",
    "Task attempts ended, by outcome (user_error: the user's code raised)",
    ["outcome"],
)
TASK_SECONDS = Histogram(
    "lepton_task_duration_seconds",
    "A successful attempt's time from dispatch to its report at the leader, by stage",
    ["stage"],
    buckets=TASK_BUCKETS_S,
)
EVENTS = Counter("lepton_events", "Timeline events recorded by this process, by kind", ["kind"])

# -- consensus -------------------------------------------------------------------------
COMMIT_SECONDS = Histogram(
    "lepton_paxos_commit_seconds",
    "A coordinator command's time from proposal to applied (the leader's Multi-Paxos round)",
    buckets=CONSENSUS_BUCKETS_S,
)
FSYNC_SECONDS = Histogram(
    "lepton_paxos_fsync_seconds",
    "Time of the replica's log fdatasync (accepted entries and promises)",
    buckets=CONSENSUS_BUCKETS_S,
)
LEADER_CHANGES = Counter(
    "lepton_paxos_leader_changes", "Times this replica saw the leader change (or none)"
)

# -- a worker node ---------------------------------------------------------------------
EXEC_TASKS = Counter(
    "lepton_executor_tasks", "Tasks run by this node's executors, by outcome", ["outcome"]
)
EXEC_SECONDS = Histogram(
    "lepton_executor_task_seconds",
    "A task's run time inside its executor (reading input, user code, writing output)",
    buckets=TASK_BUCKETS_S,
)
SHUFFLE_BYTES_SERVED = Counter(
    "lepton_shuffle_bytes_served", "Shuffle and object bytes this node's data port sent"
)


def stage_label(stage: int) -> str:
    return str(stage) if stage < STAGE_LABELS_MAX else f"{STAGE_LABELS_MAX}+"
