"""A worker node's serving shell: the replicas the leader assigns it, and its balancer.

The worker agent owns one ``NodeServing``. The leader pushes it two things: the
full list of replicas this node runs (``assign``) and the cluster's table of ready
replicas (``set_endpoints``), which this node's balancer (``NodeBalancer`` behind a
``FrontEnd``) routes ``/<deployment>/...`` to, on any node.

One task per replica runs its life, as the local supervisor's slots do: spawn the
child (``serve/spawn.py``), wait for its port, poll its ``/readyz`` until 200, then
wait for it to exit; an exit (or a target that cannot load) restarts it after the
``RestartBackoff`` delay. A replica no longer assigned is reported "stopping", keeps
serving ``stop_grace_s`` (every node's balancer gets the new table meanwhile), then
gets SIGTERM (it drains) and SIGKILL past ``stop_timeout_s``. ``run`` owns every task
in one TaskGroup; cancelling it stops every replica, and a last SIGKILL pass by PID
makes sure no child outlives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import msgspec

from lepton_ai.serve.config import ReplicaConfig, ServeConfig
from lepton_ai.serve.frontend import FrontEnd, listen
from lepton_ai.serve.node_balancer import NodeBalancer
from lepton_ai.serve.policy import RestartBackoff
from lepton_ai.serve.spawn import StartupError, read_port, reap, spawn_replica
from lepton_ai.serve.spec import Endpoint, ReplicaAssignment, ReplicaReport
from lepton_ai.serve.upstream import UpstreamError, UpstreamPool
from lepton_ai.wire.tls import http_scheme, replica_tls

log = logging.getLogger(__name__)

_PROBE_TIMEOUT_S = 1.0  # one /readyz poll of a starting replica


@dataclass
class _Replica:
    spec: ReplicaAssignment
    backoff: RestartBackoff
    report: ReplicaReport  # what reports() says; replaced whole, so changes are seen
    proc: asyncio.subprocess.Process | None = None
    ready: bool = False  # the current process answered /readyz 200
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class NodeServing:
    """The replicas of one worker node and the balancer in front of every ready one."""

    def __init__(
        self,
        host: str,
        config: ServeConfig | None = None,
        *,
        port: int = 0,
        on_change: Callable[[], None] = lambda: None,
        stop_grace_s: float = 1.0,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError("port must be in 0..65535")
        if stop_grace_s < 0:
            raise ValueError("stop_grace_s must be >= 0")
        self.host = host
        self._replica_scheme = http_scheme(replica_tls(host))
        self.port = port
        self.config = config or ServeConfig()
        self.stop_grace_s = stop_grace_s
        self.url = ""
        self.balancer = NodeBalancer(self.config.balancer, on_dead=self._on_dead)
        self._on_change = on_change
        self._replicas: dict[str, _Replica] = {}  # running or stopping, by replica id
        self._desired: dict[str, ReplicaAssignment] = {}  # the latest assign()
        # Every child not reaped yet, whatever became of its replica's record: what
        # the last-resort SIGKILL pass covers (at most one per replica running or stopping).
        self._procs: set[asyncio.subprocess.Process] = set()
        self._front: FrontEnd | None = None
        self._tg: asyncio.TaskGroup | None = None  # set while run() accepts new tasks
        self._ran = False

    # -- public ----------------------------------------------------------------------
    async def start(self) -> None:
        """Bind the balancer on (host, port) and serve HTTP; ``url`` says where."""
        if self._front is not None:
            raise RuntimeError("NodeServing.start() called twice")
        sock = listen(self.host, self.port)
        self.port = sock.getsockname()[1]
        front = FrontEnd(self.balancer)
        await front.start(sock)
        self._front = front
        self.url = f"{http_scheme(front.tls)}://{self.host}:{self.port}"

    async def run(self) -> None:
        """Supervise the replicas until cancelled; then stop them all and the front end."""
        front = self._front
        if front is None or self._ran:
            raise RuntimeError("NodeServing.run() needs start() first, and runs once")
        self._ran = True
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                self.balancer.start(tg)
                for rep in list(self._replicas.values()):  # assigned before run()
                    self._launch(rep)
                try:
                    await asyncio.Event().wait()  # until cancelled
                finally:
                    self._tg = None  # nothing new starts while we stop
                    # Requests in flight finish first (bounded), while replicas still run.
                    await front.close(self.config.supervisor.drain_timeout_s)
                    self.balancer.stop()
        finally:
            self._kill_all()

    def assign(self, replicas: list[ReplicaAssignment]) -> None:
        """The full set this node runs: start what is missing, stop what is not listed.

        A replica is named by its id alone (a new leader re-sends what it adopted with
        no target): a listed id that runs here keeps running. ValueError, and nothing
        changes, for more than ``replicas_max`` entries or a malformed one.
        """
        desired = self._check(replicas)
        self._desired = desired
        for rid, rep in list(self._replicas.items()):
            if rid not in desired and not rep.stopping.is_set():
                self._stop(rep)
        for rid, a in desired.items():
            if rid not in self._replicas:
                self._add(a)

    def reports(self) -> list[ReplicaReport]:
        return [rep.report for _, rep in sorted(self._replicas.items())]

    def inflight(self) -> dict[str, int]:
        """Requests in flight through this node's balancer, per deployment."""
        return self.balancer.inflight()

    def set_endpoints(self, endpoints: list[Endpoint], names: list[str] | None = None) -> None:
        """Replace this node's routing table (every ready replica of the cluster, and
        the names of every deployment, ready or not)."""
        self.balancer.set_endpoints(endpoints, names)

    def pids(self) -> list[int]:
        """The replica processes still running (stopping ones included)."""
        return sorted(p.pid for p in self._procs if p.returncode is None)

    # -- the set of replicas ---------------------------------------------------------
    def _check(self, replicas: list[ReplicaAssignment]) -> dict[str, ReplicaAssignment]:
        limit = self.config.supervisor.replicas_max
        if len(replicas) > limit:
            raise ValueError(f"{len(replicas)} replicas assigned; this node runs at most {limit}")
        desired: dict[str, ReplicaAssignment] = {}
        for listed in replicas:
            if listed.replica_id in desired:
                raise ValueError(f"replica {listed.replica_id!r} assigned twice")
            known = self._replicas.get(listed.replica_id)
            # Adopted by a new leader (no target): we know what it serves.
            a = known.spec if not listed.target and known is not None else listed
            _replica_config(self.config.replica, a)  # ValueError for bad batching settings
            desired[a.replica_id] = a
        return desired

    def _add(self, a: ReplicaAssignment) -> None:
        report = ReplicaReport(a.replica_id, a.deployment, a.version, "starting")
        rep = _Replica(a, RestartBackoff(self.config.supervisor.backoff()), report)
        self._replicas[a.replica_id] = rep
        self._launch(rep)
        self._on_change()

    def _launch(self, rep: _Replica) -> None:
        if self._tg is not None and rep.task is None:
            name = f"lepton-replica-{rep.spec.replica_id}"
            rep.task = self._tg.create_task(self._life(rep), name=name)

    def _stop(self, rep: _Replica) -> None:
        rep.stopping.set()
        if rep.task is None:  # never started (run() has not begun): nothing to stop
            del self._replicas[rep.spec.replica_id]
            self._on_change()
            return
        self._update(rep, state="stopping")

    def _update(self, rep: _Replica, **changes: Any) -> None:
        if rep.stopping.is_set():
            # A stop wins over what its process does before the stop reaches it (it may
            # turn ready in the same loop turn as assign() takes it away).
            changes["state"] = "stopping"
        report = msgspec.structs.replace(rep.report, **changes)
        if report != rep.report:
            rep.report = report
            self._on_change()

    def _on_dead(self, endpoint: Endpoint) -> None:
        """A replica failed its liveness probes: if it is ours, kill it (it restarts)."""
        rep = self._replicas.get(endpoint.replica_id)
        if rep is None or rep.report.url != endpoint.url or rep.stopping.is_set():
            return  # a remote replica: its own node restarts it
        if rep.proc is not None and rep.proc.returncode is None:
            log.warning("replica %s failed liveness; killing it", endpoint.replica_id)
            with contextlib.suppress(ProcessLookupError):
                rep.proc.kill()

    def _kill_all(self) -> None:
        """Last resort (a second cancel, a bug): SIGKILL every child still running."""
        for proc in self._procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()

    # -- one replica's life ----------------------------------------------------------
    async def _life(self, rep: _Replica) -> None:
        try:
            await self._keep_running(rep)
            if rep.ready and rep.proc is not None and rep.proc.returncode is None:
                # Other nodes still route to it until the leader's new table reaches them.
                await asyncio.sleep(self.stop_grace_s)
        finally:
            try:
                await self._terminate(rep)
            finally:
                if self._replicas.get(rep.spec.replica_id) is rep:
                    del self._replicas[rep.spec.replica_id]
                self._on_change()
        # Stopped, but listed again meanwhile (a re-assignment): a fresh start.
        again = self._desired.get(rep.spec.replica_id)
        if again is not None and again.replica_id not in self._replicas and self._tg is not None:
            self._add(again)

    async def _keep_running(self, rep: _Replica) -> None:
        """Run the replica, restarting it with back-off, until it is told to stop."""
        loop = asyncio.get_running_loop()
        while True:
            await _unless_set(rep.stopping, self._incarnation(rep))
            if rep.stopping.is_set():
                return
            delay = rep.backoff.on_exit(loop.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(rep.stopping.wait(), delay)
            if rep.stopping.is_set():
                return
            self._update(rep, restarts=rep.report.restarts + 1)

    async def _incarnation(self, rep: _Replica) -> None:
        """One process: spawn, port, ready, until it exits (a stop cancels this)."""
        sup = self.config.supervisor
        a = rep.spec
        if rep.report.state != "failed":  # a failing target stays "failed" while retried
            self._update(rep, state="starting")
        try:
            proc = await spawn_replica(
                a.target,
                _replica_config(self.config.replica, a),
                drain_timeout_s=sup.drain_timeout_s,
                host=self.host,
                version=a.version,
                replica_id=a.replica_id,
            )
        except OSError as exc:  # fork or exec failed (no memory, too many processes)
            self._update(rep, state="failed", error=f"cannot start a process: {exc}")
            return
        rep.proc = proc
        self._procs.add(proc)
        try:
            port = await read_port(proc, sup.start_timeout_s)
        except StartupError as exc:
            self._procs.discard(proc)  # read_port reaped it
            self._update(rep, state="failed", error=str(exc), url="", pid=0)
            return
        self._update(
            rep,
            state="starting",
            error="",
            url=f"{self._replica_scheme}://{self.host}:{port}",
            pid=proc.pid,
        )
        await self._serve_until_exit(rep, proc, port)

    async def _serve_until_exit(
        self, rep: _Replica, proc: asyncio.subprocess.Process, port: int
    ) -> None:
        exited = asyncio.ensure_future(proc.wait())
        ready = asyncio.ensure_future(self._until_ready(port))
        why = ""
        try:
            await asyncio.wait({exited, ready}, return_when=asyncio.FIRST_COMPLETED)
            if ready.done() and ready.result():
                rep.ready = True
                rep.backoff.healthy(asyncio.get_running_loop().time())
                self._update(rep, state="ready")
                await asyncio.wait({exited})
            elif ready.done():
                # Never ready in time: replace it rather than wait forever.
                why = f"not ready within {self.config.supervisor.ready_timeout_s}s"
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await asyncio.wait({exited})
        finally:
            for fut in (exited, ready):
                fut.cancel()
        code = await reap(proc)
        self._procs.discard(proc)
        was_ready, rep.ready = rep.ready, False
        if was_ready:
            self._update(rep, state="starting", url="", pid=0)  # restarted below
        else:
            why = why or f"exited with code {code} before it was ready"
            self._update(rep, state="failed", error=why, url="", pid=0)

    async def _until_ready(self, port: int) -> bool:
        """Poll the child's /readyz until 200 (True) or ``ready_timeout_s`` (False)."""
        sup = self.config.supervisor
        loop = asyncio.get_running_loop()
        deadline = loop.time() + sup.ready_timeout_s
        tls = replica_tls(self.host)
        pool = UpstreamPool(self.host, port, ssl=None if tls is None else tls.client)
        try:
            while (left := deadline - loop.time()) > 0:
                try:
                    resp = await asyncio.wait_for(
                        pool.request("GET", "/readyz", [], b""), min(_PROBE_TIMEOUT_S, left)
                    )
                except (TimeoutError, UpstreamError):
                    resp = None  # still loading, or busy: the deadline bounds the wait
                if resp is not None and resp.status == 200:
                    return True
                await asyncio.sleep(min(sup.ready_poll_s, max(deadline - loop.time(), 0.0)))
            return False
        finally:
            pool.close()

    async def _terminate(self, rep: _Replica) -> None:
        """SIGTERM (the child drains), SIGKILL past ``stop_timeout_s``; reap."""
        proc = rep.proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), self.config.supervisor.stop_timeout_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        await reap(proc)
        self._procs.discard(proc)


def _replica_config(base: ReplicaConfig, a: ReplicaAssignment) -> ReplicaConfig:
    """The node's replica limits with the assignment's batching (ValueError if bad)."""
    return dataclasses.replace(base, max_batch_size=a.max_batch_size, max_wait_ms=a.max_wait_ms)


async def _unless_set(event: asyncio.Event, work: Coroutine[Any, Any, None]) -> None:
    """Run ``work`` until it ends or ``event`` is set (then cancel it and wait for it)."""
    task = asyncio.ensure_future(work)
    stop = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        task.cancel()
        stop.cancel()
        # Its clean-up runs before ours (the caller stops the process it started).
        await asyncio.wait({task, stop})
    if not task.cancelled():
        task.result()  # a bug in it surfaces here, not as "never retrieved"
