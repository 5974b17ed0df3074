"""ServeRuntime: replica processes, restarts with back-off, scaling, drain, shutdown.

One asyncio task per replica *slot* runs the slot's life: spawn the child
(``python -m lepton_ai.serve.replica_main``), wait for its port, wait until ``/readyz``
answers 200, then hand it to the balancer; when the process exits (or the
health loop kills it for failing liveness) take it out of rotation and start
another after the ``RestartBackoff`` delay. ``ServeRuntime.run`` owns every task in
one TaskGroup and, on stop, lets the balancer finish its in-flight requests,
then drains and stops each replica by PID (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lepton_ai.node.node_net import advertised_address
from lepton_ai.serve.balancer import Balancer
from lepton_ai.serve.config import ServeConfig
from lepton_ai.serve.frontend import FrontEnd, listen
from lepton_ai.serve.policy import RestartBackoff
from lepton_ai.serve.spawn import LOOPBACK, StartupError, read_port, reap, spawn_replica
from lepton_ai.wire.tls import http_scheme

HOST = LOOPBACK
__all__ = ["HOST", "ServeRuntime", "StartupError"]


@dataclass
class _Slot:
    slot_id: int
    backoff: RestartBackoff
    proc: asyncio.subprocess.Process | None = None
    replica_id: int | None = None  # the router's key for the current incarnation
    port: int | None = None
    ready: bool = False
    restarts: int = 0
    state: str = "starting"
    spare: bool = False  # a warm standby: ready, probed, no traffic until promoted
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    first_ready: asyncio.Future[None] | None = None
    task: asyncio.Task[None] | None = None


class ServeRuntime:
    """A deployment's processes and balancer, inside one event loop."""

    def __init__(
        self,
        target: str,
        replicas: int,
        port: int = 0,
        config: ServeConfig | None = None,
        *,
        spares: int = 0,
        host: str = HOST,
    ) -> None:
        self.config = config or ServeConfig()
        self.host = host  # where the balancer listens; the replicas stay on loopback
        if not 0 < replicas <= self.config.supervisor.replicas_max:
            raise ValueError(f"replicas must be in 1..{self.config.supervisor.replicas_max}")
        if not 0 <= spares <= self.config.supervisor.replicas_max - replicas:
            raise ValueError("spares must be >= 0 and replicas + spares <= replicas_max")
        self._spares = spares
        if not 0 <= port <= 65535:
            raise ValueError("port must be in 0..65535")
        self.target = target
        self.port = port
        self._initial = replicas
        self.balancer = Balancer(self.config.balancer, status=self.status)
        self._slots: dict[int, _Slot] = {}
        self._next_slot = 0
        self._next_incarnation = 0
        self._stop = asyncio.Event()
        self._tg: asyncio.TaskGroup | None = None
        self.url: str | None = None
        self._backoff_config = self.config.supervisor.backoff()

    # -- public (inside the loop) --------------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()

    def status(self) -> list[dict[str, Any]]:
        now = self.balancer.now()
        out = []
        for slot in sorted(self._slots.values(), key=lambda s: s.slot_id):
            view = None if slot.replica_id is None else self.balancer.router.view(slot.replica_id)
            out.append(
                {
                    "id": slot.slot_id,
                    "pid": None if slot.proc is None else slot.proc.pid,
                    "url": None if slot.port is None else f"http://{HOST}:{slot.port}",
                    "ready": slot.ready,
                    "role": "spare" if slot.spare else "serving",
                    "restarts": slot.restarts,
                    "state": slot.state,
                    "outstanding": 0 if view is None else view.outstanding,
                    "ejected": view is not None and view.ejected(now),
                    "ejections": 0 if view is None else view.ejections,
                }
            )
        return out

    def pids(self) -> list[int]:
        return [s.proc.pid for s in self._slots.values() if s.proc is not None]

    async def scale(self, replicas: int) -> None:
        """Add slots (returns once they are ready) or drain and stop the newest ones."""
        if not 0 < replicas <= self.config.supervisor.replicas_max:
            raise ValueError(f"replicas must be in 1..{self.config.supervisor.replicas_max}")
        live = [s for s in self._slots.values() if not s.stopping.is_set() and not s.spare]
        if replicas > len(live):
            added = [self._add_slot() for _ in range(replicas - len(live))]
            await self._wait_ready(added)
            return
        # Take out replicas that carry no traffic first, then the newest.
        victims = sorted(live, key=lambda s: (s.ready, -s.slot_id))[: len(live) - replicas]
        for slot in victims:
            slot.stopping.set()
        await asyncio.gather(*(s.task for s in victims if s.task is not None))

    async def run(self, on_ready: Callable[[str], None] = lambda url: None) -> None:
        """Start replicas, then the balancer; serve until ``request_stop``; clean up."""
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                try:
                    await self._serve(tg, on_ready)
                finally:
                    await self._shutdown()
        except BaseExceptionGroup as group:
            # Unwrap a single failure so callers see StartupError, not a group.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        finally:
            self._kill_all()

    # -- internals -----------------------------------------------------------------------
    async def _serve(self, tg: asyncio.TaskGroup, on_ready: Callable[[str], None]) -> None:
        slots = [self._add_slot() for _ in range(self._initial)]
        slots += [self._add_slot(spare=True) for _ in range(self._spares)]
        # A stop request (Ctrl-C) during start-up must not wait for slow models to load.
        ready = asyncio.ensure_future(self._wait_ready(slots))
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({ready, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not ready.done():
                ready.cancel()
        if not ready.done() or ready.cancelled():
            return
        ready.result()
        sock = listen(self.host, self.port)
        self.port = sock.getsockname()[1]
        shown = advertised_address(sock, None, None).rpartition(":")[0]  # not 0.0.0.0
        front = FrontEnd(self.balancer)
        self.url = f"{http_scheme(front.tls)}://{shown}:{self.port}"
        await front.start(sock)
        health_task = tg.create_task(self.balancer.health_loop(self._on_dead), name="lepton-health")
        try:
            on_ready(self.url)
            await self._stop.wait()
        finally:
            # Stop accepting; the proxied requests in flight finish (bounded by the drain).
            await front.close(self.config.supervisor.drain_timeout_s)
            self.balancer.close()
            health_task.cancel()

    async def _wait_ready(self, slots: list[_Slot]) -> None:
        waits = [s.first_ready for s in slots if s.first_ready is not None]
        if not waits:
            return
        done, _ = await asyncio.wait(
            [asyncio.ensure_future(w) for w in waits], return_when=asyncio.FIRST_EXCEPTION
        )
        for fut in done:
            exc = fut.exception()
            if exc is not None:
                raise exc
        await asyncio.gather(*waits)

    def _add_slot(self, *, spare: bool = False) -> _Slot:
        if self._tg is None:
            raise AssertionError("_add_slot outside run()")
        slot = _Slot(self._next_slot, RestartBackoff(self._backoff_config), spare=spare)
        slot.first_ready = asyncio.get_running_loop().create_future()
        # Only the first failure is raised to the caller; the rest are seen here, not logged.
        slot.first_ready.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._next_slot += 1
        self._slots[slot.slot_id] = slot
        slot.task = self._tg.create_task(self._run_slot(slot), name=f"lepton-slot-{slot.slot_id}")
        return slot

    def _on_dead(self, replica_id: int) -> None:
        for slot in self._slots.values():
            if slot.replica_id == replica_id and slot.proc is not None:
                slot.state = "killed (liveness)"
                with contextlib.suppress(ProcessLookupError):
                    slot.proc.kill()

    async def _run_slot(self, slot: _Slot) -> None:
        loop = asyncio.get_running_loop()
        try:
            while not slot.stopping.is_set():
                try:
                    await self._start_replica(slot)
                except StartupError as exc:
                    if slot.first_ready is not None and not slot.first_ready.done():
                        slot.first_ready.set_exception(exc)
                        slot.state = "failed"
                        return
                    print(f"lepton serve: replica {slot.slot_id}: {exc}", file=sys.stderr)
                else:
                    await self._supervise(slot)
                if slot.stopping.is_set():
                    break
                slot.restarts += 1
                delay = slot.backoff.on_exit(loop.time())
                slot.state = f"backoff {delay:.0f}s" if delay else "restarting"
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(slot.stopping.wait(), delay)
        finally:
            await self._stop_replica(slot)
            self._slots.pop(slot.slot_id, None)

    async def _start_replica(self, slot: _Slot) -> None:
        sup = self.config.supervisor
        slot.state = "starting"
        proc = await spawn_replica(
            self.target, self.config.replica, drain_timeout_s=sup.drain_timeout_s
        )
        slot.proc = proc
        slot.port = await read_port(proc, sup.start_timeout_s)
        replica_id = self._next_incarnation
        self._next_incarnation += 1
        slot.replica_id = replica_id
        self.balancer.add_replica(replica_id, slot.port, HOST)
        if slot.spare:
            self.balancer.router.set_standby(replica_id, True)

    async def _supervise(self, slot: _Slot) -> None:
        """From port reported to process exit (or a stop request)."""
        proc, replica_id = slot.proc, slot.replica_id
        if proc is None or replica_id is None:
            raise AssertionError("_supervise without a started replica")
        exited = asyncio.ensure_future(proc.wait())
        stopping = asyncio.ensure_future(slot.stopping.wait())
        ready = asyncio.ensure_future(self._until_ready(slot, replica_id))
        try:
            done, _ = await asyncio.wait({exited, stopping, ready}, return_when="FIRST_COMPLETED")
            if ready in done and ready.exception() is None:
                self.balancer.set_ready(replica_id)
                slot.ready = True
                slot.state = "spare" if slot.spare else "ready"
                slot.backoff.healthy(asyncio.get_running_loop().time())
                if slot.first_ready is not None and not slot.first_ready.done():
                    slot.first_ready.set_result(None)
                await asyncio.wait({exited, stopping}, return_when="FIRST_COMPLETED")
            elif ready in done:
                # Never became ready in time: replace it rather than wait forever.
                print(f"lepton serve: replica {slot.slot_id} not ready in time", file=sys.stderr)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await exited
        finally:
            for fut in (exited, stopping, ready):
                fut.cancel()
        slot.ready = False
        if proc.returncode is not None:
            await reap(proc)
        if not slot.stopping.is_set():
            self.balancer.remove_replica(replica_id)
            slot.state = "exited"
            if not slot.spare and self._promote_spare():
                slot.spare = True  # the restart becomes the new spare

    def _promote_spare(self) -> bool:
        """A serving replica died: a ready spare takes its place at once."""
        for spare in sorted(self._slots.values(), key=lambda s: s.slot_id):
            if spare.spare and spare.ready and not spare.stopping.is_set():
                if spare.replica_id is None:
                    raise AssertionError("a ready spare without a replica")
                spare.spare = False
                spare.state = "ready"
                self.balancer.router.set_standby(spare.replica_id, False)
                return True
        return False

    async def _until_ready(self, slot: _Slot, replica_id: int) -> None:
        sup = self.config.supervisor
        async with asyncio.timeout(sup.ready_timeout_s):
            while True:
                _, ready = await self.balancer.probe(replica_id, timeout_s=1.0)
                if ready:
                    return
                await asyncio.sleep(sup.ready_poll_s)

    async def _stop_replica(self, slot: _Slot) -> None:
        """Drain the balancer's traffic to it, then SIGTERM, then SIGKILL after a bound."""
        sup = self.config.supervisor
        proc, replica_id = slot.proc, slot.replica_id
        slot.ready = False
        if replica_id is not None and replica_id in self.balancer.router:
            slot.state = "draining"
            await self.balancer.drain(replica_id, sup.drain_timeout_s)
            self.balancer.remove_replica(replica_id)
        if proc is not None and proc.returncode is None:
            slot.state = "stopping"
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), sup.stop_timeout_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if proc is not None:
            await reap(proc)
        slot.state = "stopped"

    async def _shutdown(self) -> None:
        for slot in list(self._slots.values()):
            slot.stopping.set()
        tasks = [s.task for s in self._slots.values() if s.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)

    def _kill_all(self) -> None:
        """Last resort (error paths): SIGKILL every child still running, by PID."""
        for slot in self._slots.values():
            proc = slot.proc
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
