"""Cluster handles: ``LocalCluster`` (starts the programs) and ``connect`` (joins a running one).

    with lep.LocalCluster(workers=2) as cluster:
        ...
        cluster.kill("worker", 1)     # SIGKILL; "executor", "coordinator"/"leader" too
        cluster.pause("worker", 0)    # SIGSTOP (a hang); resume() sends SIGCONT
        cluster.restart("worker", 1)  # start it again now

A member that dies is started again by the cluster itself (``restart=True``,
the default): at once the first time, then with a doubling back-off while it
keeps dying quickly; one that dies six times in a row within 30 s of its start
is reported (``crash_loop`` event, health ``crashloop`` while down): if it failed
by itself (an exit code) it is left down until ``restart()``, if it was killed
from outside (SIGKILL, SIGTERM) it keeps coming back at the 30 s cap.
``status()`` shows each member's ``restarts`` and ``last_exit``.

``LocalCluster`` starts three coordinators, replicas of the Multi-Paxos log
(``cluster.kill("leader")`` kills the current leader; ``coordinators=1``: one)
and ``workers`` worker agents as subprocesses on 127.0.0.1 with a fresh token.
The coordinators' listening sockets are bound here and inherited by the
children, so the workers start at the same time (they know every address
already) and a restarted coordinator comes back on the same ports. Every
child holds a lifeline pipe and has ``PR_SET_PDEATHSIG``; ``close()`` (also
on ``with`` exit, Ctrl-C and at interpreter exit) kills every process it
started, by PID, and waits for it.

With replicated coordinators ``cluster.kv`` is the consensus layer's KV client
on the same log as the jobs (``lep.connect`` attaches it from the Paxos
addresses the leader reports); with one coordinator it stays ``None``.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import msgspec

from lepton_ai.compute.plan import JobOptions
from lepton_ai.errors import LeptonError, Unavailable
from lepton_ai.heal.restarts import Observed
from lepton_ai.monitor.events import EventKind, phase_of
from lepton_ai.node.client import CoordinatorClient, CoordinatorClientConfig, check_reply
from lepton_ai.node.messages import (
    CancelJob,
    ClusterInfo,
    DeleteJob,
    Deployments,
    Event,
    EventList,
    GetDeployments,
    GetEvents,
    GetJobTasks,
    GetStatus,
    JobAccepted,
    JobInfo,
    JobList,
    JobTasks,
    ListJobs,
    MemberInfo,
    RecordEvent,
    SubmitJob,
    WaitJob,
)
from lepton_ai.node.process import Lifeline, kill_pid
from lepton_ai.wire.http_auth import HTTP_TOKEN_ENV
from lepton_ai.wire.tls import TLS_DIR_ENV, TlsConfig, http_scheme, load_tls, tls_from_env

if TYPE_CHECKING:
    from lepton_ai.node.supervise import Supervisor
    from lepton_ai.storage.client import StorageClient
    from lepton_ai.storage.messages import ObjectMeta

T = TypeVar("T")

LONG_POLL_MAX_S = 2.0  # one WaitJob slice
LONG_POLL_MARGIN_S = 3.0  # beyond the slice: the coordinator is taken as hung
_SIGNALS = {"kill": signal.SIGKILL, "pause": signal.SIGSTOP, "resume": signal.SIGCONT}
_ROLES = ("coordinator", "leader", "worker", "executor")


class Cluster:
    """A handle on a running cluster (``lep.connect``); also the base of ``LocalCluster``."""

    def __init__(self, address: str, token: str, tls_dir: str | None = None) -> None:
        self.address = address
        self.token = token
        # Mutual TLS for this handle's connections: ``tls_dir``, else $LEPTON_TLS_DIR.
        self.tls = load_tls(tls_dir) if tls_dir else tls_from_env()
        self.client = CoordinatorClient(address, token, client_config(self.tls))
        self.kv: Any = None  # the consensus layer's KV client (attach_kv)
        self._local_events: list[Event] = []
        self.slots_total = 0
        self._storage: StorageClient | None = None
        global _current
        _current = weakref.ref(self)  # what ``lep://`` URLs in this process refer to

    # -- hooks -----------------------------------------------------------------------
    def attach_kv(self, kv: Any) -> None:
        """Where the consensus layer plugs in its KV client (``cluster.kv.put`` ...)."""
        self.kv = kv

    def _attach_kv_at(self, paxos: list[str]) -> None:
        from lepton_ai.consensus.client import KvClientConfig
        from lepton_ai.consensus.client_sync import KV
        from lepton_ai.wire import WireConfig

        config = KvClientConfig(wire=WireConfig(tls=self.tls))
        self.attach_kv(KV(",".join(paxos), token=self.token, config=config))

    # -- the storage layer ----------------------------------------------------------
    @property
    def storage(self) -> StorageClient:
        """The cluster's replicated object store (``put/get/open/stat/list/delete``)."""
        if self._storage is None:
            from lepton_ai.storage.client import StorageClient
            from lepton_ai.storage.dataclient import DataClientConfig

            data = DataClientConfig(tls=self.tls)
            self._storage = StorageClient(self._control, self._run, self.token, data)
        return self._storage

    def _control(self, msg: Any, timeout_s: float) -> Any:
        return check_reply(self.client.request(msg, timeout_s))

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a data-plane coroutine on the client's loop (its own timeouts bound it)."""
        return asyncio.run_coroutine_threadsafe(coro, self.client.loop).result()

    def put_blob(self, data: bytes) -> concurrent.futures.Future[ObjectMeta]:
        """Where ``parallelize`` keeps big input chunks: stored objects, not the log
        (written in the background while the next chunk is pickled)."""
        return self.storage.put_temp_soon(data)

    def fetch_object(self, meta: ObjectMeta) -> bytes:
        """A stored job result part (``Job.result``)."""
        return self.storage.fetch(meta)

    # -- the compute layer's JobRunner ----------------------------------------------
    @property
    def default_parallelism(self) -> int:
        if self.slots_total <= 0:
            members = self.status()["members"]
            self.slots_total = sum(1 for m in members if m["role"] == "executor")
        return max(2 * self.slots_total, 2)

    def submit_plan(self, plan: bytes, options: JobOptions) -> str:
        # The id is chosen here so a retry after a failover (the first attempt may
        # have committed) finds the same job instead of starting a second one.
        job_id = "j" + uuid.uuid4().hex[:12]
        reply = check_reply(self.client.request(SubmitJob(plan, options, job_id)))
        if not isinstance(reply, JobAccepted):
            raise LeptonError(f"unexpected reply {type(reply).__name__} to SubmitJob")
        return reply.job_id

    def job_info(self, job_id: str, wait_s: float = 0.0) -> JobInfo:
        """The job's status; waits up to ``wait_s`` for it to end. KeyError if unknown."""
        # Long polls are cut into slices of at most LONG_POLL_MAX_S: a slice answers
        # within it, so silence past it (plus a margin) means the coordinator hangs
        # or died, and the caller (Job.result) asks again, possibly a new leader.
        wait_s = min(max(wait_s, 0.0), LONG_POLL_MAX_S)
        reply = check_reply(
            self.client.request(WaitJob(job_id, wait_s), wait_s + LONG_POLL_MARGIN_S)
        )
        if not isinstance(reply, JobInfo):
            raise LeptonError(f"unexpected reply {type(reply).__name__} to WaitJob")
        return reply

    # -- status and timeline ---------------------------------------------------------
    def _cluster_info(self, workers: int = 0, timeout_s: float = 0.0) -> ClusterInfo:
        reply = check_reply(self.client.request(GetStatus(workers, timeout_s), timeout_s + 10.0))
        if not isinstance(reply, ClusterInfo):
            raise LeptonError(f"unexpected reply {type(reply).__name__} to GetStatus")
        return reply

    def status(self) -> dict[str, Any]:
        """``{"leader": address, "members": [{role, id, pid, address, health, ...}]}``;
        each member's ``liveness``, ``state`` and ``paxos_role`` say separately what
        ``health`` says in one word (see ``split_health``)."""
        info = self._cluster_info()
        members = [_member_dict(m) for m in info.members]
        return {"leader": info.leader, "members": with_typed_health(members)}

    def events(self, job_id: str | None = None) -> list[dict[str, Any]]:
        """The timeline (faults, detection, rescheduling, completion), oldest first."""
        remote: list[Event] = []
        with contextlib.suppress(Unavailable):
            reply = check_reply(self.client.request(GetEvents(job_id or ""), 5.0))
            if isinstance(reply, EventList):
                remote = list(reply.events)
        seen = {(e.t, e.kind, e.detail) for e in remote}
        merged = remote + [e for e in self._local_events if (e.t, e.kind, e.detail) not in seen]
        merged.sort(key=lambda e: e.t)
        return [
            {
                "t": e.t,
                "kind": e.kind,
                "detail": e.detail,
                "job_id": e.job_id,
                "phase": phase_of(e.kind),
            }
            for e in merged
            if not job_id or e.job_id in ("", job_id)
        ]

    @property
    def metrics_urls(self) -> list[str]:
        """Every process's Prometheus ``/metrics`` URL: the coordinators, the worker
        agents (an executor's metrics are its agent's, labelled ``executor``), the
        nodes' serving balancers and the ready model replicas, as the leader knows
        them now. The same targets as any coordinator's ``/sd``."""
        from lepton_ai.monitor.targets import metrics_urls

        return metrics_urls(self.scrape_targets())

    def scrape_targets(self, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        """The cluster's Prometheus targets as HTTP SD target groups (``/sd``)."""
        from lepton_ai.monitor.targets import sd_groups

        status = check_reply(self.client.request(GetStatus(), timeout_s))
        deps = check_reply(self.client.request(GetDeployments(""), timeout_s))
        if not isinstance(status, ClusterInfo) or not isinstance(deps, Deployments):
            raise LeptonError("unexpected reply to GetStatus or GetDeployments")
        return sd_groups(status.members, deps.deployments, http_scheme(self.tls))

    @property
    def dashboard_url(self) -> str:
        """The live dashboard, served by the leading coordinator (every coordinator
        serves it; log in with the cluster token)."""
        info = self._cluster_info()
        for m in info.members:
            if m.role == "coordinator" and m.health == "leader" and m.metrics:
                return f"{http_scheme(self.tls)}://{m.metrics}/"
        raise Unavailable("no leading coordinator with an HTTP port is known")

    def job_tasks(self, job_id: str) -> list[dict[str, Any]]:
        """Which worker ran each attempt of the job and when, as the leader saw it:
        ``stage``, ``partition``, ``attempt``, ``worker``, ``started``/``ended``
        (wall-clock seconds; ``ended`` 0.0 while running), ``outcome`` ("running",
        "succeeded", "failed", "user_error", "cancelled") and ``speculative`` (a backup
        of a straggler). The leader keeps the last ``tasklog.JOBS_MAX`` jobs; after a
        leader change only the attempts reported since."""
        reply = check_reply(self.client.request(GetJobTasks(job_id), 10.0))
        if not isinstance(reply, JobTasks):
            raise LeptonError(f"unexpected reply {type(reply).__name__} to GetJobTasks")
        return [msgspec.structs.asdict(s) for s in reply.spans]

    def cancel_job(self, job_id: str) -> None:
        """Stop a running job (KeyError if unknown, ValueError if it already ended)."""
        check_reply(self.client.request(CancelJob(job_id), 30.0))

    def jobs(self) -> list[dict[str, Any]]:
        """Every job the cluster keeps, oldest first: id, name, status, done, total."""
        reply = check_reply(self.client.request(ListJobs(), 10.0))
        if not isinstance(reply, JobList):
            raise LeptonError(f"unexpected reply {type(reply).__name__} to ListJobs")
        return [
            {
                "job_id": j.job_id,
                "name": j.name,
                "status": j.status,
                "done": j.done,
                "total": j.total,
                "submitted_at": j.submitted_at,
                "finished_at": j.finished_at,
            }
            for j in reply.jobs
        ]

    def delete_job(self, job_id: str) -> None:
        """Forget a finished or failed job and its result (KeyError if unknown)."""
        check_reply(self.client.request(DeleteJob(job_id), 10.0))

    def record_event(self, kind: str, detail: str, t: float = 0.0) -> None:
        ev = Event(t or time.time(), kind, detail)
        self._local_events.append(ev)
        del self._local_events[:-1000]
        with contextlib.suppress(Unavailable, LeptonError):
            self.client.request(RecordEvent(ev), 2.0)

    # -- fault injection -------------------------------------------------------------
    def kill(self, role: str, id: int | str = 0, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` (SIGKILL) to a member; returns its pid. The target must run on this host."""
        return self._signal(role, id, sig, "kill")

    def pause(self, role: str, id: int | str = 0) -> int:
        """SIGSTOP a member: a hang, not a crash."""
        return self._signal(role, id, signal.SIGSTOP, "pause")

    def resume(self, role: str, id: int | str = 0) -> int:
        return self._signal(role, id, signal.SIGCONT, "resume")

    def _signal(self, role: str, id: int | str, sig: int, verb: str) -> int:
        pid = self.find_pid(role, id)
        if not kill_pid(pid, sig):
            raise LookupError(f"{role} {id} (pid {pid}) is not running")
        self.record_event(
            EventKind.FAULT_INJECTED, f"{verb} {role} {id} pid {pid} ({signal.Signals(sig).name})"
        )
        return pid

    def find_pid(self, role: str, id: int | str) -> int:
        member = _find_member(self._cluster_info().members, role, id)
        return member.pid

    def restart(self, role: str, id: int | str = 0) -> int:
        raise LeptonError("restart needs the process owner: use the LocalCluster that started it")

    @property
    def closed(self) -> bool:
        return self.client.closed

    def close(self) -> None:
        if self._storage is not None:
            with contextlib.suppress(Exception):
                self._storage.close()
            self._storage = None
        if self.kv is not None and hasattr(self.kv, "close"):
            with contextlib.suppress(Exception):
                self.kv.close()
        self.client.close()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


Liveness = Literal[
    "alive", "suspect", "unreachable", "down", "unregistered", "crashloop", "gone", "dead"
]
ExecutorState = Literal["starting", "idle", "busy", "spare", ""]
PaxosRole = Literal["leader", "follower", "standby", ""]
_PAXOS_ROLES = frozenset({"leader", "follower", "standby"})
_EXECUTOR_STATES = frozenset({"starting", "idle", "busy"})


def split_health(role: str, health: str) -> tuple[Liveness | str, ExecutorState, PaxosRole]:
    """A member's one-word ``health`` (what ``status()`` has always shown) as three
    fields: is it up (``liveness``), what an executor is doing (``state``) and a
    coordinator's part in the Paxos group (``paxos_role``)."""
    if role == "coordinator" and health in _PAXOS_ROLES:
        return "alive", "", health  # type: ignore[return-value]  # checked just above
    if role == "spare":
        return "alive", "spare", ""
    if role == "executor" and health in _EXECUTOR_STATES:
        return "alive", health, ""  # type: ignore[return-value]  # checked just above
    return health, "", ""


def with_typed_health(members: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add (or refresh, after ``health`` changed) each member's typed fields."""
    for m in members:
        m["liveness"], m["state"], m["paxos_role"] = split_health(m["role"], m["health"])
    return members


def _member_dict(m: MemberInfo) -> dict[str, Any]:
    return {
        "role": m.role,
        "id": m.id,
        "pid": m.pid,
        "address": m.address,
        "health": m.health,
        "node": m.node,
        "restarts": 0,  # filled in by whoever restarts it (LocalCluster, ``cluster up``)
        "last_exit": "",
        **({"paxos": m.paxos} if m.paxos else {}),
        "metrics": m.metrics,
        "serve": m.serve,
        **({"phi": round(m.phi, 3)} if m.role == "worker" else {}),
    }


def _find_member(members: list[MemberInfo], role: str, id: int | str) -> MemberInfo:
    if role not in _ROLES:
        raise ValueError(f"role must be one of {', '.join(_ROLES)}, got {role!r}")
    want = "coordinator" if role == "leader" else role
    candidates = [m for m in members if m.role == want]
    if role == "leader":
        leaders = [m for m in candidates if m.health == "leader"]
        if leaders:
            return leaders[0]
    key = str(id)
    for m in candidates:
        if m.id == key:
            return m
    if want == "executor" and isinstance(id, int) and not isinstance(id, bool):
        # Executors by index across the cluster: worker order, then slot.
        def order(m: MemberInfo) -> tuple[int, int]:
            w, _, s = m.id.partition(".")
            return (int(w) if w.isdigit() else 1 << 30, int(s) if s.isdigit() else 0)

        ordered = sorted(candidates, key=order)
        if 0 <= id < len(ordered):
            return ordered[id]
    known = ", ".join(m.id for m in candidates) or "none"
    raise LookupError(f"no {want} {id!r} (known: {known})")


class _Proc:
    def __init__(
        self, role: str, id: str, popen: subprocess.Popen[bytes], line: Lifeline | None
    ) -> None:
        self.role, self.id, self.popen, self.lifeline = role, id, popen, line

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self) -> None:
        if self.lifeline is not None:
            self.lifeline.cut()
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGKILL)  # works on a paused process too
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5.0)


_live_clusters: weakref.WeakSet[LocalCluster] = weakref.WeakSet()
_current: weakref.ref[Cluster] | None = None


def current() -> Cluster | None:
    """The cluster handle this process made last, if it is still open (``lep://``
    URLs without options refer to it, as Ray's calls refer to ``ray.init``'s)."""
    cluster = _current() if _current is not None else None
    return cluster if cluster is not None and not cluster.closed else None


@atexit.register
def _close_all() -> None:
    for cluster in list(_live_clusters):
        cluster.close()


def _checked_sizes(
    workers: int,
    coordinators: int | None,
    slots_per_worker: int,
    spares_per_worker: int,
    job_retention_s: float,
) -> int:
    """Refuses bad sizes before anything starts; returns the coordinator count."""
    if job_retention_s < 0:
        raise ValueError(f"job_retention_s must be >= 0, got {job_retention_s!r}")
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
        raise ValueError(f"workers must be an int >= 0, got {workers!r}")
    if coordinators is None:
        # The default: three replicas of the Multi-Paxos log, so the cluster survives
        # the death of any one coordinator; LEPTON_COORDINATORS=1 (or coordinators=1)
        # gives the smallest footprint: one coordinator on a local log.
        coordinators = int(os.environ.get("LEPTON_COORDINATORS", "3"))
    if (
        not isinstance(coordinators, int)
        or isinstance(coordinators, bool)
        or coordinators < 1
        or coordinators % 2 == 0
    ):
        raise ValueError(f"coordinators must be an odd int >= 1, got {coordinators!r}")
    if not isinstance(slots_per_worker, int) or slots_per_worker < 1:
        raise ValueError(f"slots_per_worker must be an int >= 1, got {slots_per_worker!r}")
    if not isinstance(spares_per_worker, int) or spares_per_worker < 0:
        raise ValueError(f"spares_per_worker must be an int >= 0, got {spares_per_worker!r}")
    return coordinators


STANDBY_ID_BASE = 100  # a LocalCluster's standby coordinators are 100, 101, ...
STANDBYS_MAX = 8  # as many as the Paxos group keeps learners


def _checked_standbys(standbys: int, coordinators: int, replace_after_s: float) -> float:
    if not isinstance(standbys, int) or isinstance(standbys, bool) or standbys < 0:
        raise ValueError(f"standbys must be an int >= 0, got {standbys!r}")
    if standbys > STANDBYS_MAX:
        raise ValueError(f"standbys must be <= {STANDBYS_MAX}, got {standbys}")
    if standbys and coordinators < 3:
        raise ValueError("standbys need a replicated control plane (coordinators >= 3)")
    if not replace_after_s > 0:
        raise ValueError(f"replace_after_s must be > 0, got {replace_after_s!r}")
    return float(replace_after_s)


def _checked_webhook(url: str) -> str:
    if url and not url.startswith(("http://", "https://")):
        raise ValueError(f"alert_webhook must be an http(s) URL, got {url!r}")
    return url


class LocalCluster(Cluster):
    """Coordinator(s) and ``workers`` worker agents as subprocesses of this process.

    ``coordinators``: an odd number of Multi-Paxos replicas (3, the default, or
    ``$LEPTON_COORDINATORS``: survives any one death) or 1 (one coordinator on a
    local log: the smallest footprint, no failover).
    """

    # Children die with this process (a lifeline pipe): a user's script that ends
    # or crashes leaves nothing behind. ``lepton cluster up``'s supervisor turns it
    # off, so that its members outlive it (they are then not restarted).
    tie_children = True
    log: Any = None  # where untied children write (a file); tied ones share ours

    def __init__(
        self,
        workers: int = 2,
        coordinators: int | None = None,
        slots_per_worker: int = 1,
        *,
        data_dir: str | None = None,
        fsync: bool = False,
        spares_per_worker: int = 1,
        start_timeout_s: float = 60.0,
        job_retention_s: float = 0.0,
        storage_bytes_max: int = 0,
        scrub_interval_s: float = 60.0,
        orphan_grace_s: float = 120.0,
        restart: bool = True,
        standbys: int = 0,
        replace_after_s: float = 10.0,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        alert_webhook: str = "",
        tls: bool = False,
        http_token: str | None = None,
    ) -> None:
        """``spares_per_worker``: warm executors each agent keeps to replace a dead one
        at once (0 saves ~20 MB per worker). ``fsync``: fsync the coordinator's log
        (off by default: a LocalCluster's state dies with it anyway).
        ``job_retention_s``: finished jobs older than this are deleted (0: kept
        until ``lepton job rm`` or the count limit). ``storage_bytes_max``: capacity of
        each worker's object store (0: the disk's free space less a reserve).
        ``scrub_interval_s``: pause between two passes of a node's scrubber over its
        objects; ``orphan_grace_s``: how long bytes no committed object lists (a put
        whose writer died) stay on a node. ``restart``: start members that die
        again (with back-off); False leaves them down, as before a ``restart()``.
        ``standbys``: non-voting coordinators (ids 100, 101, ...) that keep up with
        the log; the leader promotes one in place of a voter down for longer than
        ``replace_after_s``, so the group again survives a further death.
        ``host``/``port``: where the coordinators listen (``port`` is the first
        one's client port, 0: any); ``token``: the cluster token (default: a new one).
        ``alert_webhook``: an http(s) URL the leader POSTs each alert raised and
        cleared to (Alertmanager-style JSON).
        ``tls``: mutual TLS on every connection and HTTPS on every HTTP port, with a
        CA and node certificate made in ``data_dir/tls`` (``self.tls_dir``).
        ``http_token``: the bearer token serving and ``/metrics`` require (default:
        none, or ``$LEPTON_HTTP_TOKEN``).
        ``lepton cluster up`` runs a LocalCluster in a detached supervisor process."""
        coordinators = _checked_sizes(
            workers, coordinators, slots_per_worker, spares_per_worker, job_retention_s
        )
        if not scrub_interval_s > 0 or not orphan_grace_s > 0:
            raise ValueError("scrub_interval_s and orphan_grace_s must be > 0")
        self.storage_timing = (float(scrub_interval_s), float(orphan_grace_s))
        if not isinstance(storage_bytes_max, int) or storage_bytes_max < 0:
            raise ValueError(f"storage_bytes_max must be an int >= 0, got {storage_bytes_max!r}")
        self.storage_bytes_max = storage_bytes_max
        self.job_retention_s = float(job_retention_s)
        self.alert_webhook = _checked_webhook(alert_webhook)
        self.replace_after_s = _checked_standbys(standbys, coordinators, replace_after_s)
        self.standbys = standbys
        self._removed = 0  # coordinators the group removed (each replaced by a standby)
        from lepton_ai.node.node_net import bind_listener
        from lepton_ai.wire import generate_token

        self.workers = workers
        self.slots_per_worker = slots_per_worker
        self.spares_per_worker = spares_per_worker
        self.fsync = fsync
        self._own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="lepton-cluster-")
        self.coordinators = coordinators
        # Bound here and inherited: every address is known before any child starts,
        # and a restarted coordinator comes back on the same ports.
        self.host = host
        # Voters "0".."n-1", then standbys from STANDBY_ID_BASE: ids are never reused.
        self.coordinator_ids = [str(i) for i in range(coordinators)]
        self.coordinator_ids += [str(STANDBY_ID_BASE + i) for i in range(standbys)]
        self._listeners = [
            bind_listener(host, port if i == 0 else 0) for i in range(len(self.coordinator_ids))
        ]
        self._paxos = [bind_listener(host, 0) for _ in self.coordinator_ids if coordinators > 1]
        self._listener = self._listeners[0]
        self.coordinator_addresses = [_sock_address(s) for s in self._listeners]
        self.paxos_addresses = [_sock_address(s) for s in self._paxos]
        self.procs: dict[tuple[str, str], _Proc] = {}
        self._closed = False
        # Held while processes are started or stopped: by the supervisor's
        # thread and by the caller's restart()/close().
        self._lock = threading.RLock()
        self.supervisor: Supervisor | None = None
        token = token or generate_token()
        self._set_security(tls, http_token)
        super().__init__(",".join(self.coordinator_addresses), token, self.tls_dir)
        self.slots_total = workers * slots_per_worker
        _live_clusters.add(self)
        try:
            for id in self.coordinator_ids:
                self._spawn("coordinator", id)
            if self.paxos_addresses:
                self._attach_kv_at(self.paxos_addresses)
            for i in range(workers):
                self._spawn("worker", str(i))
            if restart:
                self._supervise()
            self.wait_ready(workers, start_timeout_s)
        except BaseException:
            self.close()
            raise

    # -- processes -------------------------------------------------------------------
    def _command(self, role: str, id: str) -> tuple[list[str], tuple[int, ...]]:
        py = [sys.executable, "-m"]
        if role == "coordinator":
            index = self.coordinator_ids.index(id)
            fd = self._listeners[index].fileno()
            fds: tuple[int, ...] = (fd,)
            args = ["lepton_ai.node.coordinator", "--listen-fd", str(fd), "--quiet"]
            args += ["--host", self.host]  # its HTTP port's (the listener is bound here)
            if self.alert_webhook:
                args += ["--alert-webhook", self.alert_webhook]
            if self.paxos_addresses:
                pfd = self._paxos[index].fileno()
                fds = (fd, pfd)
                # The voters it was started with; a standby learns the others, and a
                # restarted member the changes since, from the log.
                voters = self.paxos_addresses[: self.coordinators]
                peers = ",".join(f"{i}={a}" for i, a in enumerate(voters))
                args += ["--paxos-fd", str(pfd), "--id", id, "--peers", peers]
                args += ["--replace-after-s", repr(self.replace_after_s)]
                if index >= self.coordinators:
                    args.append("--standby")
                args += ["--data-dir", os.path.join(self.data_dir, f"coordinator-{id}")]
            else:
                args += ["--data-dir", os.path.join(self.data_dir, "coordinator")]
            if not self.fsync:
                args.append("--no-fsync")
            if self.job_retention_s > 0:
                args += ["--job-retention-s", repr(self.job_retention_s)]
            return py + args, fds
        args = [
            "lepton_ai.node.worker",  # follows the leader when given several
            "--join",
            self.address,
            "--slots",
            str(self.slots_per_worker),
            "--spares",
            str(self.spares_per_worker),
            "--name",
            id,
            "--quiet",
            "--data-dir",
            os.path.join(self.data_dir, "workers"),
        ]
        if self.storage_bytes_max:
            args += ["--storage-bytes-max", str(self.storage_bytes_max)]
        scrub_s, grace_s = self.storage_timing
        args += ["--scrub-interval-s", repr(scrub_s), "--orphan-grace-s", repr(grace_s)]
        if not self.fsync:
            args.append("--no-fsync")
        return py + args, ()

    def _supervise(self) -> None:
        from lepton_ai.node.supervise import Supervisor, member_key

        sup = Supervisor(
            self._observe, self._respawn, self._supervisor_event, self._lock, on_gone=self._gone
        )
        now = time.monotonic()
        for role, id in self.procs:
            sup.core.add(member_key(role, id), now)
        self.supervisor = sup
        sup.start()

    def _observe(self) -> dict[str, Observed]:
        from lepton_ai.node.supervise import member_key

        return {
            member_key(role, id): Observed(p.alive(), p.popen.returncode)
            for (role, id), p in self.procs.items()
        }

    def _respawn(self, member: str) -> int:
        role, _, id = member.partition("-")
        if self._closed:
            raise OSError("the cluster is closing")
        old = self.procs.get((role, id))
        if old is not None:
            old.stop()  # reaps it and closes its lifeline
        return self._spawn(role, id).pid

    def _gone(self, member: str) -> None:
        """A coordinator the group removed (a standby took its place): a fresh
        standby takes the standby's, so the next hung voter is replaced too."""
        role, _, id = member.partition("-")
        standbys = len(self.coordinator_ids) - self.coordinators - self._removed
        if role != "coordinator" or self._closed or self.supervisor is None:
            return
        self._removed += 1
        if standbys - 1 >= self.standbys:
            return
        from lepton_ai.node.node_net import bind_listener
        from lepton_ai.node.supervise import member_key

        new = str(max(STANDBY_ID_BASE - 1, *map(int, self.coordinator_ids)) + 1)
        self._listeners.append(bind_listener(self.host, 0))
        self._paxos.append(bind_listener(self.host, 0))
        self.coordinator_ids.append(new)
        self.coordinator_addresses.append(_sock_address(self._listeners[-1]))
        self.paxos_addresses.append(_sock_address(self._paxos[-1]))
        try:
            pid = self._spawn("coordinator", new).pid
        except OSError as exc:
            self._supervisor_event(EventKind.RESTART_FAILED, f"standby {new}: {exc}", time.time())
            return
        self.supervisor.core.add(member_key("coordinator", new), time.monotonic())
        self._supervisor_event(
            EventKind.STANDBY_STARTED,
            f"standby {new} pid {pid} in place of coordinator {id}",
            time.time(),
        )

    def _supervisor_event(self, kind: str, detail: str, t: float) -> None:
        if not self._closed:
            self.record_event(kind, detail, t)

    def _spawn(self, role: str, id: str) -> _Proc:
        replicated = role == "coordinator" and self.coordinators > 1
        index = self.coordinator_ids.index(id) if role == "coordinator" else -1
        if replicated:
            self._rebind(index)
        try:
            return self._spawn_proc(role, id)
        finally:
            if replicated:
                # Only the child may hold a replicated coordinator's sockets: a dead
                # one must refuse connections at once (a socket held here would
                # accept them into its backlog and stall clients and workers until
                # their timeouts), so that they move on to the new leader.
                self._listeners[index].close()
                self._paxos[index].close()

    def _rebind(self, index: int) -> None:
        from lepton_ai.node.node_net import bind_listener

        for socks, addresses in (
            (self._listeners, self.coordinator_addresses),
            (self._paxos, self.paxos_addresses),
        ):
            if socks[index].fileno() == -1:  # closed after the previous start
                port = int(addresses[index].rpartition(":")[2])
                socks[index] = bind_listener(self.host, port)

    def _spawn_proc(self, role: str, id: str) -> _Proc:
        cmd, fds = self._command(role, id)
        line = Lifeline() if self.tie_children else None
        env = dict(os.environ)
        env["LEPTON_TOKEN"] = self.token
        # Secrets and settings in the environment, never in argv (argv is public in ps).
        if self.tls_dir:
            env[TLS_DIR_ENV] = self.tls_dir
        if self.http_token:
            env[HTTP_TOKEN_ENV] = self.http_token
        kwargs: dict[str, Any] = {}
        if line is not None:
            env.update(line.child_env())
            fds = (*fds, line.read_fd)
        else:
            kwargs = {"start_new_session": True, "stdout": self.log, "stderr": self.log}
        try:
            popen = subprocess.Popen(cmd, env=env, pass_fds=fds, stdin=subprocess.DEVNULL, **kwargs)
        finally:
            if line is not None:
                line.after_spawn()
        proc = _Proc(role, id, popen, line)
        self.procs[(role, id)] = proc
        return proc

    def _set_security(self, tls: bool, http_token: str | None) -> None:
        """``tls_dir``: certificates made in the data dir, else the process's (if any)."""
        from lepton_ai.wire.certs import create

        self.http_token = http_token
        self.tls_dir = os.environ.get(TLS_DIR_ENV)
        if tls:
            self.tls_dir = os.path.join(self.data_dir, "tls")
            if not os.path.exists(os.path.join(self.tls_dir, "node.pem")):  # a reused dir
                create(self.tls_dir, [self.host])

    def wait_ready(self, workers: int | None = None, timeout_s: float = 30.0) -> None:
        """Block until ``workers`` workers are registered with all executors started."""
        want = self.workers if workers is None else workers
        deadline = time.monotonic() + timeout_s
        while True:
            dead = [p for p in self.procs.values() if p.role == "coordinator" and not p.alive()]
            if dead:
                raise Unavailable(f"coordinator exited with status {dead[0].popen.returncode}")
            left = deadline - time.monotonic()
            try:
                info = self._cluster_info(want, max(0.1, min(left, 5.0)))
            except Unavailable:
                info = None
            ready = 0 if info is None else _ready_workers(info.members)
            if ready >= want:
                return
            if time.monotonic() >= deadline:
                raise Unavailable(f"only {ready} of {want} workers ready after {timeout_s} s")

    def _proc_for(self, role: str, id: int | str) -> _Proc | None:
        if role == "leader":
            return self.procs.get(("coordinator", self.leader_id()))
        return self.procs.get((role, str(id)))

    def leader_id(self, timeout_s: float = 10.0) -> str:
        """The id of the leading coordinator ("0" with one); Unavailable if none in time."""
        if self.coordinators == 1:
            return "0"
        info = self._cluster_info(0, 0.0) if timeout_s > 0 else None
        if info is not None:
            for id, address in zip(self.coordinator_ids, self.coordinator_addresses, strict=True):
                if address == info.leader:
                    return id
        raise Unavailable(
            f"no coordinator leads (leader reported: {info.leader if info else None})"
        )

    def _signal(self, role: str, id: int | str, sig: int, verb: str) -> int:
        if role not in _ROLES:
            raise ValueError(f"role must be one of {', '.join(_ROLES)}, got {role!r}")
        proc = self._proc_for(role, id)
        if proc is None:
            return super()._signal(role, id, sig, verb)  # executors: pid from the coordinator
        if not proc.alive():
            raise LookupError(f"{role} {id} (pid {proc.pid}) is not running")
        self.record_event(
            EventKind.FAULT_INJECTED,
            f"{verb} {role} {id} pid {proc.pid} ({signal.Signals(sig).name})",
        )
        os.kill(proc.pid, sig)
        return proc.pid

    def restart(self, role: str, id: int | str = 0) -> int:
        """Start the member again (SIGKILL it first if it still runs); returns the new pid."""
        if role == "executor":
            return self.kill(role, id)  # its agent starts a replacement at once
        with self._lock:
            proc = self._proc_for(role, id)
            if proc is None:
                raise LookupError(f"no {role} {id} was started by this cluster")
            proc.stop()
            new = self._spawn(proc.role, proc.id)
            if self.supervisor is not None:
                from lepton_ai.node.supervise import member_key

                self.supervisor.core.reset(member_key(proc.role, proc.id), time.monotonic())
        self.record_event(EventKind.RESTARTED, f"{role} {id} pid {new.pid}")
        return new.pid

    def status(self) -> dict[str, Any]:
        try:
            out = super().status()
        except Unavailable:
            out = {"leader": None, "members": []}
        for m in out["members"]:
            proc = self.procs.get((m["role"], m["id"])) if m["role"] == "coordinator" else None
            if proc is not None and m["pid"] == 0:
                m["pid"] = proc.pid
                if not proc.alive():
                    m["health"] = "down"
            if proc is not None and not m["address"]:
                m["address"] = self._coordinator_address(m["id"])
        listed = {(m["role"], m["id"]) for m in out["members"]}
        for (role, id), proc in sorted(self.procs.items()):
            if (role, id) not in listed:
                health = "down" if not proc.alive() else "unregistered"
                if role == "coordinator" and proc.alive() and self.coordinators > 1:
                    # Not (yet) in the leader's view: a standby it has not heard from.
                    voter = self.coordinator_ids.index(id) < self.coordinators
                    health = "follower" if voter else "standby"
                out["members"].append(
                    {
                        "role": role,
                        "id": id,
                        "pid": proc.pid,
                        "address": self._coordinator_address(id) if role == "coordinator" else "",
                        "health": health,
                        "node": "",
                        "restarts": 0,
                        "last_exit": "",
                        "metrics": "",
                        "serve": "",
                    }
                )
        self._add_restarts(out["members"])
        with_typed_health(out["members"])
        return out

    def _add_restarts(self, members: list[dict[str, Any]]) -> None:
        """Each process's restarts and last exit, as this cluster's supervisor saw them."""
        if self.supervisor is None:
            return
        from lepton_ai.node.supervise import member_key

        for m in members:
            if m["role"] not in ("coordinator", "worker"):
                continue
            rec = self.supervisor.record(member_key(m["role"], m["id"]))
            if rec is None:
                continue
            m["restarts"], m["last_exit"] = rec.restarts, rec.last_exit
            if rec.verdict:
                m["health"] = rec.verdict

    def _coordinator_address(self, id: str) -> str:
        return self.coordinator_addresses[self.coordinator_ids.index(id)]

    def pids(self) -> list[int]:
        """Every process this cluster started (not executors: their agents own them)."""
        return [p.pid for p in self.procs.values()]

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self.supervisor is not None:
            self.supervisor.stop()
        for proc in self.procs.values():
            if proc.lifeline is not None:
                proc.lifeline.cut()
            if proc.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)  # a paused one must not linger
                    os.kill(proc.pid, signal.SIGKILL)
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(5.0)
        super().close()
        for sock in [*self._listeners, *self._paxos]:
            sock.close()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        _live_clusters.discard(self)

    def __enter__(self) -> LocalCluster:
        return self


def _sock_address(sock: Any) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def _ready_workers(members: list[MemberInfo]) -> int:
    workers = {m.node for m in members if m.role == "worker"}
    starting = {m.node for m in members if m.role == "executor" and m.health == "starting"}
    with_execs = {m.node for m in members if m.role == "executor"}
    return len((workers & with_execs) - starting)


ADDRESS_ENV = "LEPTON_ADDRESS"
TOKEN_ENV = "LEPTON_TOKEN"


def find_cluster(
    address: str | None = None, token: str | None = None, state_file: str | None = None
) -> tuple[str, str]:
    """(address, token) of the cluster to use: the arguments, else ``$LEPTON_ADDRESS``
    and ``$LEPTON_TOKEN`` (a worker agent sets both for the code it runs), else the
    cluster ``lepton cluster up`` started (its state file). ValueError saying how to
    name one when there is none."""
    address = address or os.environ.get(ADDRESS_ENV)
    if address:
        token = token or os.environ.get(TOKEN_ENV)
        if not token:
            raise ValueError(f"no cluster token: pass token=... or set ${TOKEN_ENV}")
        return address, token
    from lepton_ai.node.state_file import read_state

    try:
        state = read_state(state_file)
    except ValueError:
        raise ValueError(
            f'no cluster to connect to: pass its address ("host:port,..."), set '
            f"${ADDRESS_ENV} and ${TOKEN_ENV}, or start one with `lepton cluster up`"
        ) from None
    return str(state["address"]), token or str(state["token"])


def connect(
    address: str | None = None, token: str | None = None, tls_dir: str | None = None
) -> Cluster:
    """A handle on a running cluster: ``"host:port"`` (or a comma-separated list);
    without one, the cluster ``find_cluster`` names (``$LEPTON_ADDRESS``, else the one
    ``lepton cluster up`` started). ``tls_dir``: the cluster's certificates (default
    ``$LEPTON_TLS_DIR``; none: plain TCP). Close it (or use ``with``) when done."""
    address, token = find_cluster(address, token)
    cluster = Cluster(address, token, tls_dir)
    try:
        status = cluster.status()  # fail here, with a clear error, if nobody answers
    except BaseException:
        cluster.close()
        raise
    paxos = [m["paxos"] for m in status["members"] if m.get("paxos")]
    if paxos:  # replicated coordinators: KV commands go through the same Paxos log
        cluster._attach_kv_at(paxos)
    return cluster


def client_config(tls: TlsConfig | None) -> CoordinatorClientConfig:
    """A coordinator client's config with ``tls`` (not the process's default)."""
    wire = dataclasses.replace(CoordinatorClientConfig().wire, tls=tls)
    return CoordinatorClientConfig(wire=wire)
