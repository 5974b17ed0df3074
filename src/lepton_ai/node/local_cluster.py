"""``LocalCluster``: a cluster whose coordinators and workers are this process's children.

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

This module holds the processes' owner: their sockets, starting and stopping
them, the ``Supervisor`` hooks, fault injection by the pid it knows, and
``status()`` completed with what only it knows. Each member's command line and
environment are ``node.local_launch``'s; every query goes through the handle it
extends (``node.cluster_handle.Cluster``).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

from lepton_ai.errors import Unavailable
from lepton_ai.heal.restarts import Observed
from lepton_ai.monitor.events import EventKind
from lepton_ai.node.cluster_handle import Cluster
from lepton_ai.node.local_launch import (
    STANDBY_ID_BASE,
    MemberProc,
    checked_metrics_env,
    checked_sizes,
    checked_standbys,
    checked_storage,
    checked_webhook,
    coordinator_command,
    sock_address,
    start_member,
    worker_command,
)
from lepton_ai.node.member_status import (
    ROLES,
    ready_workers,
    unlisted_member_dict,
    with_typed_health,
)
from lepton_ai.wire.tls import TLS_DIR_ENV

if TYPE_CHECKING:
    from lepton_ai.node.supervise import Supervisor

_live_clusters: weakref.WeakSet[LocalCluster] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for cluster in list(_live_clusters):
        cluster.close()


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
        coordinators = checked_sizes(
            workers, coordinators, slots_per_worker, spares_per_worker, job_retention_s
        )
        self.storage_timing = checked_storage(scrub_interval_s, orphan_grace_s, storage_bytes_max)
        self.storage_bytes_max = storage_bytes_max
        self.job_retention_s = float(job_retention_s)
        self.alert_webhook = checked_webhook(alert_webhook)
        checked_metrics_env()
        self.replace_after_s = checked_standbys(standbys, coordinators, replace_after_s)
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
        self.coordinator_addresses = [sock_address(s) for s in self._listeners]
        self.paxos_addresses = [sock_address(s) for s in self._paxos]
        self.procs: dict[tuple[str, str], MemberProc] = {}
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
        if role != "coordinator":
            return worker_command(self, id), ()
        index = self.coordinator_ids.index(id)
        fd = self._listeners[index].fileno()
        if not self.paxos_addresses:
            return coordinator_command(self, id, fd, None), (fd,)
        pfd = self._paxos[index].fileno()
        return coordinator_command(self, id, fd, pfd), (fd, pfd)

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
        self.coordinator_addresses.append(sock_address(self._listeners[-1]))
        self.paxos_addresses.append(sock_address(self._paxos[-1]))
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

    def _spawn(self, role: str, id: str) -> MemberProc:
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

    def _spawn_proc(self, role: str, id: str) -> MemberProc:
        cmd, fds = self._command(role, id)
        proc = start_member(
            role,
            id,
            cmd,
            fds,
            token=self.token,
            tls_dir=self.tls_dir,
            http_token=self.http_token,
            tied=self.tie_children,
            log=self.log,
        )
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
            ready = 0 if info is None else ready_workers(info.members)
            if ready >= want:
                return
            if time.monotonic() >= deadline:
                raise Unavailable(f"only {ready} of {want} workers ready after {timeout_s} s")

    def _proc_for(self, role: str, id: int | str) -> MemberProc | None:
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
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
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
                address = self._coordinator_address(id) if role == "coordinator" else ""
                out["members"].append(unlisted_member_dict(role, id, proc.pid, address, health))
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
