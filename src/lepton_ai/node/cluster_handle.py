"""The driver's handle on a running cluster: ``Cluster``, what ``lep.connect`` returns.

    cluster = lep.connect()            # $LEPTON_ADDRESS, else ``lepton cluster up``'s
    cluster.status(); cluster.events(); cluster.jobs(); cluster.job_tasks(job_id)
    cluster.kill("worker", 1)          # SIGKILL; the member must run on this host

It talks to the leading coordinator through a ``CoordinatorClient`` (which follows
the leader): jobs for the compute layer (``submit_plan``, ``job_info``), status,
the timeline and job queries, the Prometheus targets and the dashboard's URL,
fault injection by the pid the leader reports, and the storage and KV handles
(``cluster.storage``, ``cluster.kv``) with this handle's TLS settings.
``LocalCluster`` (``node.local_cluster``) is this handle plus the processes it
started.

With replicated coordinators ``cluster.kv`` is the consensus layer's KV client
on the same log as the jobs (``lep.connect`` attaches it from the Paxos
addresses the leader reports); with one coordinator it stays ``None``.

Also here: how a cluster is found (``find_cluster``: the arguments, the
environment, the state file) and which handle ``lep://`` URLs refer to
(``current``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import os
import signal
import time
import uuid
import weakref
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from lepton_ai.compute.plan import JobOptions
from lepton_ai.errors import LeptonError, Unavailable
from lepton_ai.monitor.events import EventKind, phase_of
from lepton_ai.node.client import CoordinatorClient, CoordinatorClientConfig, check_reply
from lepton_ai.node.member_status import find_member, member_dict, with_typed_health
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
    RecordEvent,
    SubmitJob,
    WaitJob,
)
from lepton_ai.node.process import kill_pid
from lepton_ai.wire.tls import TlsConfig, http_scheme, load_tls, tls_from_env

if TYPE_CHECKING:
    from lepton_ai.storage.client import StorageClient
    from lepton_ai.storage.messages import ObjectMeta

T = TypeVar("T")

LONG_POLL_MAX_S = 2.0  # one WaitJob slice
LONG_POLL_MARGIN_S = 3.0  # beyond the slice: the coordinator is taken as hung


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
        members = [member_dict(m) for m in info.members]
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
        member = find_member(self._cluster_info().members, role, id)
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


_current: weakref.ref[Cluster] | None = None


def current() -> Cluster | None:
    """The cluster handle this process made last, if it is still open (``lep://``
    URLs without options refer to it, as Ray's calls refer to ``ray.init``'s)."""
    cluster = _current() if _current is not None else None
    return cluster if cluster is not None and not cluster.closed else None


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
