"""What the dashboard and ``lepton top`` show, as plain dicts: ``DashboardSource``.

``ClusterSource`` reads it through the client API of a running cluster
(``lep.connect`` or a ``LocalCluster``). The client follows the Paxos leader by
itself, so a dashboard served anywhere shows the leader's view. Each section
(members, jobs, events, deployments, storage) is fetched on its own: one that
fails (no leader for a moment, a call past its deadline) is reported under
``errors`` and the others are still shown, since a dashboard is most needed
while something is broken.

The calls are synchronous; the web app runs them on worker threads behind a
shared cache (``dashboard.SnapshotCache``), ``lepton top`` calls them directly.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from lepton_ai.errors import LeptonError
from lepton_ai.monitor.rates import Rates, annotate
from lepton_ai.node.client import check_reply
from lepton_ai.node.messages import Deployments, GetDeployments
from lepton_ai.node.state_file import read_state
from lepton_ai.wire.http_auth import http_token

T = TypeVar("T")

JOBS_MAX = 50  # most recent jobs in a snapshot
EVENTS_MAX = 200  # most recent timeline events in a snapshot
STAGE_JOBS_MAX = 4  # running jobs whose per-stage progress is fetched per snapshot
TASKS_MAX = 5000  # task attempts of one job sent to the timeline chart
UNDER_REPLICATED_SHOWN_MAX = 20  # object keys listed by name in the storage panel
FSCK_LIMIT = 100  # objects the storage check lists per category
DEPLOYMENTS_TIMEOUT_S = 10.0
# Extra per-member or per-deployment facts shown when the cluster reports them
# (newer coordinators add them; older ones do not).
MEMBER_EXTRAS = (
    "phi",
    "paxos",
    "commit_index",
    "commit_latency_ms",
    "epoch",
    "last_exit",
    "metrics",
    "serve",
)
DEPLOYMENT_EXTRAS = ("requests_per_s", "latency_ms", "latency_p50_ms", "latency_p99_ms", "inflight")
# What a failing section may raise: the cluster cannot answer (LeptonError,
# including Unavailable), a reply of an unexpected shape, or a lost connection.
SECTION_ERRORS = (LeptonError, KeyError, ValueError, OSError, TimeoutError)


_Dicts = list[dict[str, Any]]


class DashboardSource(Protocol):
    """The cluster's state for the dashboard, as JSON-ready dicts."""

    def snapshot(self) -> dict[str, Any]:
        """Members, jobs, events, deployments, storage, Paxos; ``errors`` per section."""
        ...

    def job_tasks(self, job_id: str) -> list[dict[str, Any]] | None:
        """One job's task attempts (stage, partition, attempt, worker, started, ended,
        outcome, speculative), or None when the cluster cannot tell."""
        ...

    def close(self) -> None:
        """Release what reading the cluster holds (kept-alive connections)."""
        ...


class ClusterSource:
    """A ``DashboardSource`` over a cluster handle (``Cluster`` or ``LocalCluster``).

    ``state_file``: the file of the ``lepton cluster up`` that started the cluster,
    if it was found that way; its supervisor's restart counts are merged in (a
    handle from ``lep.connect`` does not see them otherwise)."""

    def __init__(
        self,
        cluster: Any,
        *,
        state_file: str | None = None,
        jobs_max: int = JOBS_MAX,
        events_max: int = EVENTS_MAX,
    ) -> None:
        self.cluster = cluster
        self.state_file = state_file
        self.jobs_max = jobs_max
        self.events_max = events_max
        self._rates: Rates | None = None  # counters' previous readings, for rates

    # -- the snapshot ------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        errors: dict[str, str] = {}
        started = time.monotonic()
        no_status: dict[str, Any] = {"leader": None, "members": []}
        status = _section("members", errors, self._status, no_status)
        events: _Dicts = _section("events", errors, self._events, [])
        jobs: _Dicts = _section("jobs", errors, lambda: self._jobs(events), [])
        deployments: _Dicts = _section("deployments", errors, self._deployments, [])
        members: _Dicts = status["members"]
        storage: dict[str, Any] | None = _section(
            "storage", errors, lambda: self._storage(members), None
        )
        links: dict[str, Any] = _section("links", errors, self._links, {})
        snap = {
            "fetched_at": time.time(),
            "fetch_ms": round((time.monotonic() - started) * 1000, 1),
            "address": self.cluster.address,
            "leader": status["leader"],
            "members": status["members"],
            "paxos": paxos_view(status, events),
            "jobs": jobs,
            "events": events,
            "deployments": deployments,
            "storage": storage,
            "links": links,
            "features": {"job_tasks": self._tasks_call() is not None},
            "errors": errors,
        }
        _section("rates", errors, lambda: annotate(snap, self._read_rates(members)), None)
        return snap

    def _read_rates(self, members: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
        """Requests/s and latency per deployment, the leader's commit index and
        latency: from the balancers' and coordinators' /metrics (monitor.rates)."""
        if self._rates is None:
            tls = getattr(self.cluster, "tls", None)
            self._rates = Rates(verify=tls.client if tls is not None else True, bearer=http_token())
        scheme = "https" if getattr(self.cluster, "tls", None) is not None else "http"
        urls = [
            f"{scheme}://{m['metrics']}/metrics"
            for m in members
            if m.get("role") == "coordinator" and m.get("metrics")
        ]
        urls += [f"{m['serve']}/metrics" for m in members if m.get("serve")]
        return self._rates.read(urls)

    def _status(self) -> dict[str, Any]:
        status: dict[str, Any] = self.cluster.status()
        members = [member_view(m) for m in status.get("members", [])]
        if self.state_file is not None:
            _merge_supervised(self.state_file, members)
        return {"leader": status.get("leader"), "members": members}

    def _events(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = self.cluster.events()
        return events[-self.events_max :]

    def _jobs(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        jobs = sorted(self.cluster.jobs(), key=lambda j: j.get("submitted_at", 0.0), reverse=True)
        out = [job_view(j) for j in jobs[: self.jobs_max]]
        add_event_durations(out, events)
        running = [j for j in out if j["status"] == "running"][:STAGE_JOBS_MAX]
        for job in running:
            tasks = self.job_tasks(job["job_id"])
            if tasks is not None:
                job["stages"] = stage_progress(tasks)
        return out

    def _deployments(self) -> list[dict[str, Any]]:
        reply = check_reply(self.cluster.client.request(GetDeployments(""), DEPLOYMENTS_TIMEOUT_S))
        if not isinstance(reply, Deployments):
            raise LeptonError(f"unexpected reply {type(reply).__name__} to GetDeployments")
        return [deployment_view(info) for info in reply.deployments]

    def _storage(self, members: list[dict[str, Any]]) -> dict[str, Any]:
        # quick: a full fsck reads every object in the log, twice a second while
        # anyone watches; the index finds those a down node held.
        return storage_view(self.cluster.storage.fsck(FSCK_LIMIT, quick=True), members)

    def _links(self) -> dict[str, Any]:
        """The cluster's own dashboard and /metrics URLs, where it serves them (each
        on its own: no leader known for a moment must not hide the other)."""
        links: dict[str, Any] = {}
        for name in ("dashboard_url", "metrics_urls"):
            try:
                value = getattr(self.cluster, name, None)
            except SECTION_ERRORS:
                continue
            if value:
                links[name] = value if isinstance(value, str) else list(value)
        return links

    def close(self) -> None:
        if self._rates is not None:
            self._rates.close()

    # -- task timeline -----------------------------------------------------------
    def _tasks_call(self) -> Callable[[str], list[dict[str, Any]]] | None:
        call = getattr(self.cluster, "job_tasks", None)
        return call if callable(call) else None

    def job_tasks(self, job_id: str) -> list[dict[str, Any]] | None:
        call = self._tasks_call()
        if call is None:
            return None
        try:
            tasks = call(job_id)
        except NotImplementedError:
            return None  # an older cluster: the chart stays hidden
        return mark_retries([task_view(t) for t in tasks[-TASKS_MAX:]])


def _section(name: str, errors: dict[str, str], fetch: Callable[[], T], default: T) -> T:
    """``fetch()``, or ``default`` with the reason under ``errors[name]``: the page
    shows what it could get and says what it could not."""
    try:
        return fetch()
    except SECTION_ERRORS as exc:
        errors[name] = f"{type(exc).__name__}: {exc}"
        return default


# ---------------------------------------------------------------- the views


def member_view(m: dict[str, Any]) -> dict[str, Any]:
    view = {
        "role": m.get("role", ""),
        "id": str(m.get("id", "")),
        "node": m.get("node", ""),
        "pid": m.get("pid", 0),
        "address": m.get("address", ""),
        "health": m.get("health", ""),
        "restarts": m.get("restarts", 0),
    }
    view.update({k: m[k] for k in MEMBER_EXTRAS if m.get(k) not in (None, "")})
    return view


def _merge_supervised(state_file: str, members: list[dict[str, Any]]) -> None:
    """Restart counts as ``lepton cluster up``'s supervisor recorded them."""
    try:
        state = read_state(state_file)
    except (ValueError, OSError):
        return  # the cluster was not started by `cluster up` after all
    known = {(m["role"], str(m["id"])): m for m in state.get("members", [])}
    for m in members:
        seen = known.get((m["role"], m["id"]))
        if seen is not None:
            m["restarts"] = seen.get("restarts", m["restarts"])
            if seen.get("last_exit"):
                m["last_exit"] = seen["last_exit"]
            if seen.get("state") in ("crashloop", "gone"):
                m["health"] = seen["state"]


def job_view(j: dict[str, Any]) -> dict[str, Any]:
    done, total = int(j.get("done", 0)), int(j.get("total", 0))
    submitted, finished = float(j.get("submitted_at", 0.0)), float(j.get("finished_at", 0.0))
    return {
        "job_id": j["job_id"],
        "name": j.get("name", ""),
        "status": j.get("status", ""),
        "done": done,
        "total": total,
        "percent": 100.0 if total == 0 and j.get("status") == "finished" else _percent(done, total),
        "submitted_at": submitted,
        # Only a finish time on the same clock as the submission gives a duration.
        "duration_s": round(finished - submitted, 3) if finished >= submitted > 0 else None,
    }


_JOB_ENDS = ("job_finished", "job_failed", "job_cancelled")


def add_event_durations(jobs: list[dict[str, Any]], events: list[dict[str, Any]]) -> None:
    """A job's duration from its submitted and ended events where the job record has
    none on one clock: both events carry the leader's wall-clock time."""
    submitted: dict[str, float] = {}
    ended: dict[str, float] = {}
    for e in events:
        if e.get("kind") == "job_submitted":
            submitted[e["job_id"]] = float(e["t"])
        elif e.get("kind") in _JOB_ENDS:
            ended[e["job_id"]] = float(e["t"])
    for job in jobs:
        start, end = submitted.get(job["job_id"]), ended.get(job["job_id"])
        if job["duration_s"] is None and start is not None and end is not None and end >= start:
            job["duration_s"] = round(end - start, 3)


def _percent(done: int, total: int) -> float:
    return round(100.0 * done / total, 1) if total > 0 else 0.0


def task_view(t: dict[str, Any]) -> dict[str, Any]:
    ended = t.get("ended")
    return {
        "stage": int(t.get("stage", 0)),
        "partition": int(t.get("partition", 0)),
        "attempt": int(t.get("attempt", 0)),
        "worker": str(t.get("worker", "")),
        "started": float(t.get("started", 0.0)),
        "ended": float(ended) if ended else None,
        "outcome": str(t.get("outcome", "") or "running"),
        "speculative": bool(t.get("speculative", False)),
    }


def mark_retries(tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Set ``retry`` on every attempt that re-ran a task after an earlier one (not a
    speculative backup, which runs beside it): attempt numbers are unique across
    the scheduler, not counted per task, so the order of starts tells."""
    tasks.sort(key=lambda t: t["started"])
    seen: set[tuple[int, int]] = set()
    for t in tasks:
        task = (t["stage"], t["partition"])
        t["retry"] = task in seen and not t["speculative"]
        seen.add(task)
    return tasks


def stage_progress(tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per stage: partitions with a succeeded attempt, partitions seen, attempts
    that failed or were lost, attempts still running."""
    stages: dict[int, dict[str, Any]] = {}
    for t in tasks:
        fresh = {"stage": t["stage"], "done": set(), "seen": set(), "failed": 0, "running": 0}
        s = stages.setdefault(t["stage"], fresh)
        s["seen"].add(t["partition"])
        if t["outcome"] == "succeeded":
            s["done"].add(t["partition"])
        elif t["outcome"] in ("failed", "lost"):
            s["failed"] += 1
        elif t["ended"] is None:
            s["running"] += 1
    return [
        {**s, "done": len(s["done"]), "seen": len(s["seen"])} for _, s in sorted(stages.items())
    ]


def deployment_view(info: Any) -> dict[str, Any]:
    spec = info.spec
    replicas = [
        {
            "id": r.replica_id,
            "node": r.node,
            "version": r.version,
            "state": r.state,
            "url": r.url,
            "restarts": r.restarts,
            "error": r.error,
        }
        for r in info.replicas
    ]
    view = {
        "name": spec.name,
        "target": spec.target,
        "version": spec.version,
        "replicas": spec.replicas,
        "ready": sum(1 for r in info.replicas if r.state == "ready"),
        "autoscale": None
        if spec.autoscale is None
        else {"min": spec.autoscale.min_replicas, "max": spec.autoscale.max_replicas},
        "urls": list(info.urls),
        "replica_list": replicas,
    }
    view.update({k: getattr(info, k) for k in DEPLOYMENT_EXTRAS if hasattr(info, k)})
    return view


def storage_view(report: Any, members: list[dict[str, Any]]) -> dict[str, Any]:
    workers = {m["node"]: m["id"] for m in members if m["role"] == "worker" and m["node"]}
    nodes = [
        {
            "node": node,
            "worker": workers.get(node, ""),
            "used_bytes": usage.used_bytes,
            "capacity_bytes": usage.capacity_bytes,
            "objects": usage.objects,
        }
        for node, usage in sorted(report.nodes.items())
    ]
    under = list(report.under_replicated)
    return {
        "objects": report.objects,
        "bytes": report.bytes,
        "under_replicated": len(under),
        "under_replicated_keys": [m.key for m in under[:UNDER_REPLICATED_SHOWN_MAX]],
        "lost": len(report.lost),
        "lost_keys": [m.key for m in report.lost[:UNDER_REPLICATED_SHOWN_MAX]],
        "copies_inflight": report.copies_inflight,
        "healthy": not under and not report.lost,
        "nodes": nodes,
    }


def paxos_view(status: dict[str, Any], events: list[dict[str, Any]]) -> dict[str, Any]:
    """The replicated log's view: who leads, the voters, and the elections seen."""
    coordinators = [m for m in status["members"] if m["role"] == "coordinator"]
    elections = [e for e in events if e.get("kind") == "leader_elected"]
    return {
        "leader": status["leader"],
        "coordinators": coordinators,
        "quorum": len(coordinators) // 2 + 1 if coordinators else 0,
        "up": sum(1 for m in coordinators if m["health"] in ("leader", "follower")),
        "elections": len(elections),
        "last_election": elections[-1] if elections else None,
    }
