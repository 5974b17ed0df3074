"""The coordinator program: a thin asyncio shell around two sans-I/O cores.

Durable state is ``compute.job_state.JobStateMachine`` behind a ``LogHost``: a
``LocalLog`` for one coordinator, or the Multi-Paxos log (``node.replicated``;
the controllers run only on the confirmed leader). The cores decide; this shell
turns messages and time into their events and carries out their actions:

* the scheduler (``compute.scheduler``): ``Propose`` -> ``LogHost.submit``, and
  the apply hook (not the submit's return) feeds ``Applied`` back, so commands
  ordered by any replica reach it the same way; ``Dispatch`` / ``Cancel`` -> the
  workers, batched (``coord_outbox``: a dispatch goes as the wire's ``TaskOrder``);
* the control core (``node.control``): members and their loss (the phi-accrual
  detector: a hang; a closed connection: a crash), stale fetch failures, job
  expiry, and the timeline's events.

Entry points and arguments: ``node.programs``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Coroutine
from typing import Any

import msgspec

from lepton_ai.compute.job_state import (
    ApplyResult,
    JobCommand,
    JobDeleted,
    JobFailedCmd,
    JobFinished,
    decode_apply_result,
    encode_command,
)
from lepton_ai.compute.scheduler import Scheduler
from lepton_ai.compute.scheduler_events import (
    Applied,
    Cancel,
    Dispatch,
    Propose,
    ProposeFailed,
    SchedulerAction,
    SchedulerEvent,
    TaskAttempt,
    TaskFailed,
    Tick,
    WorkerJoined,
    WorkerLost,
)
from lepton_ai.consensus.log_host import LogHost, NotLeader
from lepton_ai.errors import InvariantError, LeptonError, Unavailable
from lepton_ai.monitor import metrics
from lepton_ai.monitor.events import EventKind
from lepton_ai.monitor.phi import PhiAccrualDetector
from lepton_ai.node import control as ctl
from lepton_ai.node.coord_alerts import AlertShell
from lepton_ai.node.coord_client_api import ClientApi, WorkerView
from lepton_ai.node.coord_config import CoordinatorConfig
from lepton_ai.node.coord_http import CoordinatorHttp
from lepton_ai.node.coord_machine import HostedMachine
from lepton_ai.node.coord_monitor import CoordinatorMonitor
from lepton_ai.node.coord_outbox import Outbox
from lepton_ai.node.coord_serve import ServeControl
from lepton_ai.node.coord_storage import StorageControl
from lepton_ai.node.messages import (
    CoordinatorMessage,
    DropJobs,
    Event,
    Heartbeat,
    MemberInfo,
    Register,
    Registered,
    Reports,
    StorageNotice,
)
from lepton_ai.wire import Codec, Connection, serve

__all__ = ["CODEC", "Coordinator", "CoordinatorConfig"]  # CoordinatorConfig: node.coord_config

log = logging.getLogger("lepton_ai.coordinator")

CODEC = Codec[CoordinatorMessage](CoordinatorMessage)


class Coordinator:
    def __init__(
        self,
        log_host: LogHost,
        machine: HostedMachine,
        address: str,
        config: CoordinatorConfig,
        *,
        token: str,
    ) -> None:
        self.token = token
        self.log = log_host
        self.machine = machine
        self.address = address
        self.http: CoordinatorHttp | None = None  # its HTTP port (set before run)
        self.http_address = ""  # host:port of it, as others reach it
        self.config = config
        self.epoch = -1
        self.member_id = "0"  # its id in cluster.status() (the Paxos node id when replicated)
        # Leader-only: the scheduler exists while this replica leads
        # (``become_leader``/``step_down``, driven by the LogHost).
        self.scheduler: Scheduler | None = None
        self.control = ctl.ControlCore(config.control())
        # The members' connections; the control core holds the same ids (one
        # changes only together with the other).
        self.workers: dict[str, WorkerView] = {}
        self.events: deque[Event] = deque(maxlen=config.events_max)
        self.job_done: dict[str, asyncio.Event] = {}
        self.members_changed = asyncio.Event()
        self.outbox = Outbox(self.workers, machine.jobs, self._dispatch_gone)
        self._proposals = asyncio.Semaphore(config.inflight_proposals_max)
        self._tg: asyncio.TaskGroup | None = None
        self.api = ClientApi(self)
        self.monitor = CoordinatorMonitor(self, metrics.enabled_from_env())
        self.storage = StorageControl(self, config.storage)
        self.serving = ServeControl(self, config.serve)
        self.alerting = AlertShell(self, config.alert_webhook)
        machine.listener = self._on_applied
        machine.storage_listener = self.storage.on_removed

    @property
    def phi(self) -> PhiAccrualDetector:
        """This term's failure detector (the control core's)."""
        return self.control.phi

    # -- leadership ------------------------------------------------------------------
    @property
    def leading(self) -> bool:
        return self.scheduler is not None

    def become_leader(self, epoch: int) -> None:
        """Start the controllers for leadership term ``epoch`` (unique per term).

        Soft state starts empty: the scheduler is rebuilt from the applied state
        and the workers' ``Register`` reports, and failure detection starts afresh.
        """
        if self.scheduler is not None:
            return
        self.epoch = epoch
        self.control.new_term()
        if self.machine.jobs.state.jobs:
            # Recovering: wait the failover grace for workers to report what runs.
            self.scheduler = Scheduler.from_state(
                self.machine.jobs.state,
                time.monotonic(),
                epoch=epoch,
                config=self.config.scheduler,
            )
        else:  # nothing to recover: no grace period before the first dispatch
            self.scheduler = Scheduler(self.config.scheduler, epoch=epoch)
        self.storage.became_leader()
        self.serving.became_leader()
        self.alerting.became_leader()
        self.event(EventKind.LEADER, f"{self.address} epoch {epoch}")

    def step_down(self) -> None:
        """Stop the controllers at once: another replica orders commands now."""
        if self.scheduler is None:
            return
        self.scheduler = None
        self.serving.stepped_down()
        self.event(EventKind.STEP_DOWN, f"{self.address} epoch {self.epoch}")
        for view in list(self.workers.values()):
            view.conn.writer.close()  # they re-register with the new leader
        self.workers.clear()
        self.control.end_term()
        self.outbox.clear()
        self.members_changed.set()

    def on_leadership(self, leading: bool, epoch: int) -> None:
        if leading:
            self.become_leader(epoch)
        else:
            self.step_down()

    # -- events for the timeline -----------------------------------------------------
    def event(self, kind: EventKind, detail: str = "", job_id: str = "", t: float = 0.0) -> None:
        """Record a timeline entry (``t``: its time if a logged command carries one)."""
        self.monitor.event(kind)
        self.events.append(Event(t or time.time(), kind, detail, job_id))

    # -- the driver ------------------------------------------------------------------
    async def run(self, server_sock: socket.socket) -> None:
        self.event(EventKind.COORDINATOR_STARTED, f"{self.address} pid {os.getpid()}")
        if self.monitor.enabled:
            metrics.add_source("coordinator", self.monitor.collect)
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            server = await serve(
                None,
                None,
                sock=server_sock,
                token=self.token,
                codec=CODEC,
                handler=self._handle,
                config=self.config.wire,
            )
            if self.http is not None:
                tg.create_task(self.http.run())
            tg.create_task(self.alerting.run())
            try:
                await self._tick_loop()
            finally:
                server.close()

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.tick_interval_s)
            now = time.monotonic()
            self._control(ctl.CheckWorkers(now))
            if self.scheduler is not None:
                self.step(Tick(now))
                self._control(ctl.CheckExpiry(time.time(), self.machine.jobs.state.jobs))
                self.storage.tick(now)
                self.serving.tick(now)
                self.alerting.tick(now)

    def step(self, event: SchedulerEvent) -> None:
        if self.scheduler is None:
            return  # not leading: applied commands only update the state machine
        observe = self.monitor.observers.get(type(event))
        if observe is not None:
            observe(event)
        try:
            actions = self.scheduler.step(event)
        except InvariantError as exc:
            # A broken invariant of the core: state can no longer be trusted. Stop
            # the process (the log survives; a restart rebuilds from it). The core
            # raises nothing else for a broken invariant (no bare asserts).
            log.critical("scheduler invariant broken on %s: %s", type(event).__name__, exc)
            logging.shutdown()
            os._exit(70)
        for action in actions:
            self._carry_out(action)
        self.outbox.flush_soon()

    def _carry_out(self, action: SchedulerAction) -> None:
        if isinstance(action, Propose):
            self.propose_action(_wall_stamped(action))
        elif isinstance(action, Dispatch):
            self.monitor.dispatched(action)
            self._control(ctl.Dispatched(action, time.monotonic()))
        elif isinstance(action, Cancel):
            self.outbox.cancel(action)
            self._control(ctl.CancelIssued(action))

    def _control(self, event: ctl.ControlEvent) -> None:
        """Step the control core and carry out its actions, in order."""
        for action in self.control.step(event):
            self._do(action)

    def _do(self, action: ctl.ControlAction) -> None:
        if isinstance(action, ctl.RecordEvent):
            self.event(action.kind, action.detail, action.job_id, action.t)
        elif isinstance(action, ctl.Schedule):
            self.step(action.event)
        elif isinstance(action, ctl.SendDispatch):
            self.outbox.dispatch(action.dispatch)
        elif isinstance(action, ctl.LoseWorker):
            self._drop_worker(action.worker)
        elif isinstance(action, ctl.ExpireJob):
            self.propose_soon(JobDeleted(action.job_id))
        elif isinstance(action, ctl.JobOver):
            self._job_over(action.job_id)
        # AdmitWorker / RefuseWorker: answered by the registration itself (_admit).

    def _dispatch_gone(self, worker: str, attempt: TaskAttempt) -> None:
        """A dispatch batched for a worker lost before the batch left."""
        self.step(TaskFailed(attempt, worker, "infra", time.monotonic(), "gone"))

    # -- proposals and applied commands ----------------------------------------------
    def propose_action(self, action: Propose) -> None:
        """The scheduler's proposal; a host that batches may hold a non-urgent one."""
        self.propose_soon(action.command)

    def propose_soon(self, cmd: JobCommand) -> None:
        self.spawn(self._propose(cmd))

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` as a task of the coordinator's TaskGroup (it owns every task)."""
        if self._tg is None:
            coro.close()
            raise AssertionError("a task before the coordinator runs")
        self._tg.create_task(coro)

    async def _propose(self, cmd: JobCommand) -> ApplyResult:
        async with self._proposals:
            started = time.monotonic()
            try:
                raw = await self.log.submit(encode_command(cmd))
                self.monitor.committed(time.monotonic() - started)
            except Unavailable:
                self.step(ProposeFailed(cmd, time.monotonic()))
                return ApplyResult(False, "log unavailable")
            except NotLeader as exc:
                # Only with a replicated log: another replica orders commands now
                # (the leadership callback stops this term's scheduler).
                self.event(EventKind.NOT_LEADER, str(exc))
                return ApplyResult(False, str(exc))
            except LeptonError as exc:
                # Replicated log: leadership lost while in flight (the command may
                # still commit: the first TaskFinished wins, so a retry is safe) or
                # the slot chose another value.
                self.step(ProposeFailed(cmd, time.monotonic()))
                return ApplyResult(False, f"log unavailable: {exc}")
        return decode_apply_result(raw)

    async def submit_command(self, cmd: JobCommand) -> ApplyResult:
        """For client requests: order ``cmd`` and return how it was applied."""
        return await self._propose(cmd)

    def _on_applied(self, cmd: JobCommand, result: ApplyResult) -> None:
        self.step(Applied(cmd, result, time.monotonic()))
        self._control(ctl.CommandApplied(cmd, result))

    def _job_over(self, job_id: str) -> None:
        done = self.job_done.pop(job_id, None)
        if done is not None:
            done.set()
        for view in self.workers.values():
            view.plans_sent.discard(job_id)
            view.conn.send_nowait(DropJobs([job_id]))

    def leader_hint(self) -> str | None:
        """The client address of the leader, as far as this replica knows."""
        return self.address if self.leading else self.log.leader_address

    def all_events(self) -> list[Event]:
        return list(self.events)

    def quorum(self) -> tuple[int, int]:
        """(voting coordinators, those reachable from here, itself included)."""
        return 1, 1

    def coordinator_members(self, pid: int) -> list[MemberInfo]:
        role = "leader" if self.leading else "follower"
        return [
            MemberInfo(
                "coordinator", self.member_id, pid, self.address, role, metrics=self.http_address
            )
        ]

    # -- connections -----------------------------------------------------------------
    async def _handle(self, conn: Connection[CoordinatorMessage]) -> None:
        first = await conn.recv()
        if isinstance(first, Register):
            await self._worker_session(conn, first)
            return
        reply = await self.api.handle(first)
        await conn.send(reply)
        async for msg in conn:
            await conn.send(await self.api.handle(msg))

    async def _worker_session(self, conn: Connection[CoordinatorMessage], reg: Register) -> None:
        if not self.leading:
            return  # closing the connection: the worker retries (a leader, later)
        now = time.monotonic()
        view = self._admit(reg, conn, now)
        if view is None:
            await conn.send(Registered(self.address, self.config.heartbeat_interval_s, False))
            return
        await conn.send(Registered(self.address, self.config.heartbeat_interval_s, True))
        self.members_changed.set()
        self.storage.members_changed()
        self.step(WorkerJoined(reg.worker, reg.address, reg.slots, now, reg.running, reg.executors))
        try:
            async for msg in conn:
                if self.workers.get(reg.worker) is not view:
                    return  # declared lost while this message was in flight
                self._on_worker_message(view, msg)
        finally:
            if self.workers.get(reg.worker) is view:
                self._control(ctl.ConnectionClosed(reg.worker))

    def _admit(
        self, reg: Register, conn: Connection[CoordinatorMessage], now: float
    ) -> WorkerView | None:
        """The new member's view, or None when the control core refuses it."""
        joining = ctl.WorkerJoining(
            reg.worker, reg.name, reg.node, reg.pid, reg.address, reg.slots, now
        )
        view = None
        for action in self.control.step(joining):
            if isinstance(action, ctl.AdmitWorker):
                view = self.workers[reg.worker] = WorkerView(reg, conn)
                self.alerting.seen.add(reg.name)
            else:  # earlier incarnations of its node lost, then its join on the timeline
                self._do(action)
        return view

    def _on_worker_message(self, view: WorkerView, msg: CoordinatorMessage) -> None:
        now = time.monotonic()
        self._control(ctl.WorkerHeard(view.worker_id, now))
        if isinstance(msg, Heartbeat):
            view.executors = list(msg.executors)
            view.running = list(msg.running)
            view.storage = msg.storage
            view.replicas, view.inflight = list(msg.replicas), dict(msg.inflight)
            self.members_changed.set()
        elif isinstance(msg, StorageNotice):
            self.storage.on_notice(view, msg)
        elif isinstance(msg, Reports):
            for rep in msg.reports:
                self._control(ctl.WorkerReport(view.worker_id, rep, now))
        else:
            raise ValueError(f"worker sent {type(msg).__name__}")

    def _drop_worker(self, worker_id: str) -> None:
        """Carry out a loss the control core decided (and recorded)."""
        view = self.workers.pop(worker_id)
        self.members_changed.set()
        self.storage.members_changed()
        view.conn.writer.close()
        self.step(WorkerLost(worker_id, time.monotonic()))


if __name__ == "__main__":  # python -m lepton_ai.node.coordinator (node.local_cluster starts it)
    from lepton_ai.node.programs import coordinator_main

    coordinator_main()


def _wall_stamped(action: Propose) -> Propose:
    """The scheduler's clock is monotonic (it measures intervals); a job's end time in
    the log is what users see, and what retention compares with ``time.time()``."""
    cmd = action.command
    if isinstance(cmd, JobFinished | JobFailedCmd):
        return msgspec.structs.replace(
            action, command=msgspec.structs.replace(cmd, finished_at=time.time())
        )
    return action
