"""What a coordinator exports for monitoring: the leader's per-job task timeline
(``monitor.tasklog``) and the coordinator's Prometheus metrics.

The coordinator calls ``dispatched`` with the scheduler's own ``Dispatch`` actions
and ``observers`` with the task reports it steps, before the scheduler sees them,
so both views match what the scheduler decided. This is on the leader's path of
every task (~2 µs of it per task; ``benchmarks/metrics_cost_bench.py``), so it only
touches the task log's span and plain counters. Counters are plain ints (see
``monitor.metrics``); gauges are read from the coordinator's state at scrape time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import HistogramMetricFamily, Metric

from lepton_ai.compute.scheduler_events import (
    Dispatch,
    TaskFailed,
    TaskStarted,
    TaskSucceeded,
    WorkerLost,
)
from lepton_ai.monitor import metrics as m
from lepton_ai.monitor.events import EventKind
from lepton_ai.monitor.tasklog import DispatchKind, Outcome, TaskLog

if TYPE_CHECKING:
    from lepton_ai.consensus.driver import ReplicaDriver
    from lepton_ai.node.coordinator import Coordinator

_FAILURE_OUTCOME: dict[str, Outcome] = {"user": "user_error", "cancelled": "cancelled"}
_OUTCOMES: tuple[Outcome, ...] = ("succeeded", "failed", "user_error", "cancelled", "lost")
_KINDS: tuple[DispatchKind, ...] = ("first", "retry", "backup")


class CoordinatorMonitor:
    def __init__(self, coordinator: Coordinator, enabled: bool = True) -> None:
        self.c = coordinator
        self.enabled = enabled  # False: LEPTON_METRICS=0 (monitor.metrics.enabled_from_env)
        self.tasklog = TaskLog()
        self.jobs_submitted = 0
        self.dispatches: dict[DispatchKind, int] = dict.fromkeys(_KINDS, 0)
        self.attempts: dict[Outcome, int] = dict.fromkeys(_OUTCOMES, 0)
        self.task_seconds: dict[str, m.Histo] = {}  # by stage label
        self._stage_histo: dict[int, m.Histo] = {}  # the same, by stage number
        self.commit_seconds = m.Histo(m.CONSENSUS_BUCKETS_S)
        self.events: dict[str, int] = {}  # by kind (a bounded vocabulary)
        # The scheduler inputs it records, by exact type: the coordinator looks each
        # event up here (one dict probe per step, no isinstance chain); none when off.
        self.observers: dict[type, Callable[[Any], None]] = (
            {
                TaskStarted: self._started,
                TaskSucceeded: self._succeeded,
                TaskFailed: self._failed,
                WorkerLost: self._worker_lost,
            }
            if enabled
            else {}
        )

    # -- hot path (the coordinator's event loop) ------------------------------------------
    def dispatched(self, d: Dispatch) -> None:
        if self.enabled:
            kind = self.tasklog.dispatched(d.attempt, d.worker, d.speculative, time.time())
            self.dispatches[kind] += 1

    def _started(self, event: TaskStarted) -> None:
        self.tasklog.started(event.attempt, time.time())

    def _worker_lost(self, event: WorkerLost) -> None:
        self.attempts["lost"] += self.tasklog.worker_lost(event.worker, time.time())

    def _succeeded(self, event: TaskSucceeded) -> None:
        span = self.tasklog.ended(event.attempt, event.worker, "succeeded", time.time())
        if span is not None:  # None: a second report of the same attempt
            self.attempts["succeeded"] += 1
            stage = event.attempt.stage
            histo = self._stage_histo.get(stage) or self._new_stage_histo(stage)
            histo.observe(span.ended - span.started)

    def _failed(self, event: TaskFailed) -> None:
        outcome = _FAILURE_OUTCOME.get(event.kind, "failed")
        if self.tasklog.ended(event.attempt, event.worker, outcome, time.time()) is not None:
            self.attempts[outcome] += 1

    def _new_stage_histo(self, stage: int) -> m.Histo:
        label = m.stage_label(stage)  # stages past the label bound share one histogram
        histo = self.task_seconds.get(label)
        if histo is None:
            histo = self.task_seconds[label] = m.Histo(m.TASK_BUCKETS_S)
        self._stage_histo[stage] = histo
        return histo

    def job_submitted(self) -> None:
        self.jobs_submitted += 1

    def committed(self, seconds: float) -> None:
        self.commit_seconds.observe(seconds)

    def event(self, kind: EventKind) -> None:
        self.events[kind] = self.events.get(kind, 0) + 1

    # -- scrape time ----------------------------------------------------------------------
    def collect(self) -> Iterator[Metric]:
        yield from self._counters()
        yield from self._cluster_gauges()
        yield from self._storage_gauges()
        yield from self._serving_gauges()

    def _counters(self) -> Iterator[Metric]:
        yield m.gauge(
            "lepton_coordinator_leading", "1 while this coordinator leads", self.c.leading
        )
        yield m.counter(
            "lepton_jobs_submitted", "Jobs accepted while this coordinator led", self.jobs_submitted
        )
        yield m.labelled_counter(
            "lepton_task_dispatches",
            "Task attempts dispatched: first run, retry after a failure, speculative backup",
            "kind",
            self.dispatches.items(),
        )
        yield m.labelled_counter(
            "lepton_task_attempts",
            "Task attempts ended, by outcome (user_error: the user's code raised)",
            "outcome",
            self.attempts.items(),
        )
        family = HistogramMetricFamily(
            "lepton_task_duration_seconds",
            "A successful attempt's time from its start at the worker to its report, by stage",
            labels=["stage"],
        )
        for stage, histo in sorted(self.task_seconds.items()):
            histo.add_to(family, [stage])
        yield family
        yield m.histogram(
            "lepton_paxos_commit_seconds",
            "A coordinator command's time from proposal to applied (its consensus round)",
            self.commit_seconds,
        )
        yield m.labelled_counter(
            "lepton_events",
            "Timeline events this coordinator recorded",
            "kind",
            self.events.items(),
        )

    def _cluster_gauges(self) -> Iterator[Metric]:
        c = self.c
        now = time.monotonic()
        views = list(c.workers.values())
        yield m.gauge("lepton_workers", "Worker nodes registered (at the leader)", len(views))
        states: dict[str, int] = {}
        for v in views:
            for e in v.executors:
                states[e.state] = states.get(e.state, 0) + 1
        yield m.labelled_gauge(
            "lepton_executors", "Executor processes by state", "state", _rows(states)
        )
        yield m.labelled_gauge(
            "lepton_node_phi",
            "The failure detector's suspicion of each worker node (phi accrual)",
            "node",
            (([v.name], c.phi.phi(v.worker_id, now)) for v in views),
        )
        jobs: dict[str, int] = {}
        for rec in c.machine.jobs.state.jobs.values():
            jobs[rec.status] = jobs.get(rec.status, 0) + 1
        yield m.labelled_gauge(
            "lepton_jobs", "Jobs kept by the cluster, by status", "status", _rows(jobs)
        )

    def _storage_gauges(self) -> Iterator[Metric]:
        views = [v for v in self.c.workers.values() if v.storage is not None]
        yield m.labelled_gauge(
            "lepton_storage_used_bytes",
            "Bytes each node's object store holds",
            "node",
            (([v.node or v.name], v.storage.used_bytes) for v in views if v.storage),
        )
        yield m.labelled_gauge(
            "lepton_storage_capacity_bytes",
            "Capacity of each node's object store",
            "node",
            (([v.node or v.name], v.storage.capacity_bytes) for v in views if v.storage),
        )
        state = self.c.storage.state
        live = set(self.c.storage.live_views())
        # Only the leader knows which nodes are live; a follower reports 0.
        under, lost = state.copies_down(live) if self.c.leading else (0, 0)
        yield m.gauge("lepton_objects", "Objects in the storage layer", state.total_objects)
        yield m.gauge(
            "lepton_objects_under_replicated",
            "Objects with a copy on a node that is down, not yet re-replicated (at the leader)",
            under,
        )
        yield m.gauge(
            "lepton_objects_unavailable", "Objects with no live copy (at the leader)", lost
        )

    def _serving_gauges(self) -> Iterator[Metric]:
        specs = self.c.machine.deployments.specs
        desired = [([name], spec.replicas) for name, spec in sorted(specs.items())]
        yield m.labelled_gauge(
            "lepton_deployment_replicas_desired",
            "Replicas each deployment asks for",
            "deployment",
            desired,
        )
        ready: dict[str, int] = dict.fromkeys(specs, 0)
        for v in self.c.workers.values():
            for r in v.replicas:
                if r.state == "ready" and r.deployment in ready:
                    ready[r.deployment] += 1
        yield m.labelled_gauge(
            "lepton_deployment_replicas_ready",
            "Replicas of each deployment that answer (as their nodes report)",
            "deployment",
            _rows(ready),
        )


def _rows(counts: dict[str, int]) -> list[tuple[list[str], float]]:
    return [([k], v) for k, v in sorted(counts.items())]


def paxos_metrics(driver: ReplicaDriver) -> Callable[[], Iterator[Metric]]:
    """The replica's Multi-Paxos gauges and counters, read at scrape time."""

    def collect() -> Iterator[Metric]:
        core = driver.core
        yield m.gauge(
            "lepton_paxos_leader", "1 while this replica is the Paxos leader", core.is_leader
        )
        yield m.gauge("lepton_paxos_commit_index", "Highest log slot known chosen", core.commit)
        yield m.gauge("lepton_paxos_applied_index", "Highest log slot applied", core.applied)
        yield m.gauge(
            "lepton_paxos_log_entries",
            "Log entries kept since the last snapshot",
            max(0, core.log.last - core.log.snapshot.slot),
        )
        yield m.gauge(
            "lepton_paxos_wal_bytes", "Size of the write-ahead log", driver.storage.wal_bytes
        )
        yield m.counter(
            "lepton_paxos_leader_changes",
            "Times the leader this replica knows of changed (to another or to none)",
            driver.leader_changes,
        )
        t = driver.timings  # the seed's T' terms (consensus/timings.py)
        yield m.histogram(
            "lepton_paxos_propose_seconds",
            "p: a command's wait at the leader for its slot",
            t.propose,
        )
        yield m.histogram(
            "lepton_paxos_decide_seconds", "d: a slot's Accept sent to it known chosen", t.decide
        )
        yield m.histogram(
            "lepton_paxos_apply_seconds", "u: applying one command to the state machine", t.apply
        )
        yield m.histogram(
            "lepton_paxos_election_seconds", "e: no leader known to a leader known", t.election
        )
        stats = driver.storage.stats
        yield m.counter("lepton_paxos_fsyncs", "Log fdatasyncs", stats.syncs)
        yield m.histogram(
            "lepton_paxos_fsync_seconds", "Time of a log append that synced", stats.sync_seconds
        )

    return collect
