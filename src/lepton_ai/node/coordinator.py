"""The coordinator program: a thin asyncio shell around the scheduler core.

    lepton coordinator --port 0 --data-dir D --token T

Durable state is ``compute.state.JobStateMachine`` behind a ``LogHost``:
``LocalLog`` for one coordinator, or - with ``--id``/``--peers`` - the
Multi-Paxos replicated log (``node.replicated``: jobs and KV on one log, the
controllers run only on the confirmed leader). The scheduler core
(``compute.scheduler.Scheduler``) decides; this shell only turns messages and
time into events, steps the core and carries out its actions:

* ``Propose`` -> ``LogHost.submit``; the state machine's apply hook (not the
  submit's return) feeds ``Applied`` back, so commands ordered by any replica
  reach the scheduler the same way;
* ``Dispatch`` / ``Cancel`` -> ``RunTasks`` / ``CancelTasks`` to the worker,
  batched per worker and flushed once per step burst.

Failure detection: every message from a worker is a heartbeat for the
phi-accrual detector; a worker suspected by it (a hang: SIGSTOP) or whose
connection closes (a crash: the kernel closes its sockets) is declared lost and
must rejoin under a new id. Timestamps of what happened go to a bounded event
list that clients read as a job's timeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from lepton_ai import eventloop
from lepton_ai.compute.plan import decode_plan
from lepton_ai.compute.scheduler import Scheduler
from lepton_ai.compute.scheduler_events import (
    Applied,
    Cancel,
    Dispatch,
    FetchFailed,
    Propose,
    ProposeFailed,
    SchedulerAction,
    SchedulerConfig,
    SchedulerEvent,
    TaskAttempt,
    TaskFailed,
    TaskStarted,
    Tick,
    WorkerJoined,
    WorkerLost,
)
from lepton_ai.compute.state import (
    ApplyResult,
    JobCommand,
    JobDeleted,
    JobFailedCmd,
    JobFinished,
    JobRecord,
    JobStateConfig,
    JobStateMachine,
    JobSubmitted,
    OutputLost,
    OutputRef,
    decode_apply_result,
    decode_command,
    encode_apply_result,
    encode_command,
)
from lepton_ai.consensus.api import LogHost, NotLeader
from lepton_ai.errors import LeptonError, Unavailable
from lepton_ai.monitor.phi import PhiAccrualDetector, PhiConfig
from lepton_ai.node.coord_storage import (
    StorageControl,
    StorageControlConfig,
    closes_jobs,
    link_job_command,
)
from lepton_ai.node.coord_views import ClientApi, WorkerView
from lepton_ai.node.messages import (
    CancelTasks,
    CoordinatorMessage,
    DropJobs,
    Event,
    ExecutorInfo,
    Heartbeat,
    JobPlanBlob,
    MemberInfo,
    Register,
    Registered,
    Reports,
    RunTasks,
    StorageNotice,
)
from lepton_ai.node.netutil import node_wire_config
from lepton_ai.storage.messages import ObjectMeta
from lepton_ai.storage.meta import (
    StorageStateMachine,
    decode_storage_command,
    encode_storage_result,
)
from lepton_ai.wire import Codec, Connection, WireConfig, serve

log = logging.getLogger("lepton_ai.coordinator")

CODEC = Codec[CoordinatorMessage](CoordinatorMessage)
_record_encoder = msgspec.msgpack.Encoder()


@dataclass(frozen=True)
class CoordinatorConfig:
    tick_interval_s: float = 0.1
    heartbeat_interval_s: float = 0.1
    events_max: int = 10_000
    inflight_proposals_max: int = 10_000
    lost_workers_max: int = 10_000  # ids remembered so a lost incarnation cannot rejoin
    wait_timeout_max_s: float = 60.0
    fsync: bool = True
    # Retention: finished/failed jobs kept for their result (oldest evicted first);
    # part of the replicated state machine, so every replica must use the same value.
    finished_jobs_max: int = 256
    job_retention_s: float = 0.0  # finished jobs older than this are deleted (0: kept)
    expiry_interval_s: float = 1.0
    expiries_per_round_max: int = 1000
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    storage: StorageControlConfig = field(default_factory=StorageControlConfig)
    phi: PhiConfig = field(default_factory=PhiConfig)
    wire: WireConfig = field(default_factory=node_wire_config)


class HostedMachine(Protocol):
    """What the coordinator needs of its state machine (``JobsMachine`` or the
    replicated ``node.replicated.CoordinatorMachine``)."""

    jobs: JobStateMachine
    storage: StorageStateMachine
    listener: Callable[[JobCommand, ApplyResult], None] | None
    storage_listener: Callable[[list[ObjectMeta]], None] | None

    def apply(self, command: bytes) -> bytes: ...


class _LocalSnapshot(msgspec.Struct, array_like=True):
    jobs: bytes
    storage: bytes


class JobsMachine:
    """The coordinator's ``StateMachine`` on a local log: jobs and stored objects'
    metadata, plus apply hooks.

    The hooks are how applied commands reach the scheduler and the storage
    control; they are attached only after recovery, so replaying the log at start
    does not re-drive anything.
    """

    def __init__(self, config: JobStateConfig | None = None) -> None:
        self.jobs = JobStateMachine(config)
        self.storage = StorageStateMachine()
        self.listener: Callable[[JobCommand, ApplyResult], None] | None = None
        self.storage_listener: Callable[[list[ObjectMeta]], None] | None = None

    def apply(self, command: bytes) -> bytes:
        # As ``JobStateMachine.apply``, decoding once for the machine and the hook.
        try:
            cmd = decode_command(command)
        except ValueError as exc:
            return apply_storage_bytes(self, command, exc)
        return apply_job_command(self, cmd)

    def snapshot(self) -> bytes:
        return msgspec.msgpack.encode(_LocalSnapshot(self.jobs.snapshot(), self.storage.snapshot()))

    def restore(self, data: bytes) -> None:
        snap = msgspec.msgpack.decode(data, type=_LocalSnapshot)
        self.jobs.restore(snap.jobs)
        self.storage.restore(snap.storage)


def apply_job_command(machine: HostedMachine, cmd: JobCommand) -> bytes:
    """Apply a job command and its storage effects (a stored result becomes an
    object; a closed or forgotten job's objects go); run the hooks."""
    before = set(machine.jobs.state.jobs) if closes_jobs(cmd) else None
    rec = machine.jobs.job(cmd.job_id) if isinstance(cmd, JobFinished) else None
    result = machine.jobs.apply_command(cmd)
    plan = rec.plan if rec is not None else None
    removed = link_job_command(machine.storage, machine.jobs, cmd, result, before, plan=plan)
    if machine.listener is not None:
        machine.listener(cmd, result)
    if removed and machine.storage_listener is not None:
        machine.storage_listener(removed)
    return encode_apply_result(result)


def apply_storage_bytes(machine: HostedMachine, command: bytes, job_error: Exception) -> bytes:
    """Apply a storage command (``job_error``: why the bytes are no job command)."""
    try:
        scmd = decode_storage_command(command)
    except ValueError:
        return encode_apply_result(ApplyResult(False, str(job_error)))
    res = machine.storage.apply_command(scmd)
    if res.removed and machine.storage_listener is not None:
        machine.storage_listener(res.removed)
    return encode_storage_result(res)


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
        self.config = config
        self.epoch = -1
        self.member_id = "0"  # its id in cluster.status() (the Paxos node id when replicated)
        # Leader-only: the scheduler and the failure detector exist while this
        # replica leads (``become_leader``/``step_down``, driven by the LogHost).
        self.scheduler: Scheduler | None = None
        self.phi = PhiAccrualDetector(config.phi)
        self.workers: dict[str, WorkerView] = {}
        self.lost: deque[str] = deque(maxlen=config.lost_workers_max)
        self.events: deque[Event] = deque(maxlen=config.events_max)
        self.job_done: dict[str, asyncio.Event] = {}
        self.dispatch_counts: dict[tuple[str, int, int], int] = {}
        self.members_changed = asyncio.Event()
        self._outgoing: dict[str, RunTasks] = {}
        # (worker, queued_only) -> attempts to cancel, sent after the dispatches of
        # the same loop turn: a steal of an attempt dispatched in this turn must
        # reach the worker after the attempt itself.
        self._cancels: dict[tuple[str, bool], list[TaskAttempt]] = {}
        # Shuffle inputs of dispatched readers (until their report) and outputs
        # already reported bad, to tell a stale fetch failure from a new one.
        self._reader_inputs: dict[TaskAttempt, list[OutputRef]] = {}
        self._bad_outputs: set[tuple[str, str, str]] = set()
        self._flush_scheduled = False
        self._last_expiry = 0.0
        self._expiring: set[str] = set()  # JobDeleted proposed, not yet applied
        self._proposals = asyncio.Semaphore(config.inflight_proposals_max)
        self._tg: asyncio.TaskGroup | None = None
        self.api = ClientApi(self)
        self.storage = StorageControl(self, config.storage)
        machine.listener = self._on_applied
        machine.storage_listener = self.storage.on_removed

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
        self.phi = PhiAccrualDetector(self.config.phi)
        # Each term's failure detector judges afresh: a worker an earlier leader (or
        # this one, in an earlier term) declared lost re-registers, and its outputs
        # are judged from the log (OutputLost) plus what it reports now.
        self.lost.clear()
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
        self.event("leader", f"{self.address} epoch {epoch}")

    def step_down(self) -> None:
        """Stop the controllers at once: another replica orders commands now."""
        if self.scheduler is None:
            return
        self.scheduler = None
        self.event("step_down", f"{self.address} epoch {self.epoch}")
        for view in list(self.workers.values()):
            view.conn.writer.close()  # they re-register with the new leader
        self.workers.clear()
        self._outgoing.clear()
        self._cancels.clear()
        self._reader_inputs.clear()
        self.members_changed.set()

    def on_leadership(self, leading: bool, epoch: int) -> None:
        if leading:
            self.become_leader(epoch)
        else:
            self.step_down()

    # -- events for the timeline -----------------------------------------------------
    def event(self, kind: str, detail: str = "", job_id: str = "") -> None:
        self.events.append(Event(time.time(), kind, detail, job_id))

    # -- the driver ------------------------------------------------------------------
    async def run(self, server_sock: socket.socket) -> None:
        self.event("coordinator_started", f"{self.address} pid {os.getpid()}")
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
            try:
                await self._tick_loop()
            finally:
                server.close()

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.tick_interval_s)
            now = time.monotonic()
            for worker_id in self.phi.suspects(now):
                view = self.workers.get(worker_id)
                if view is not None:
                    phi = self.phi.phi(worker_id, now)
                    last = self.phi.last_heartbeat(worker_id) or now
                    self._lose_worker(view, f"phi {phi:.1f}, silent {now - last:.2f} s")
            if self.scheduler is not None:
                self.step(Tick(now))
                self._expire_jobs()
                self.storage.tick(now)

    def _expire_jobs(self) -> None:
        """Leader only: delete finished jobs older than ``job_retention_s`` (0: keep).

        Through the log (``JobDeleted``), so every replica forgets the same jobs;
        the age is judged from the wall clock against the job's recorded times.
        """
        retention = self.config.job_retention_s
        wall = time.time()
        if retention <= 0 or wall - self._last_expiry < self.config.expiry_interval_s:
            return
        self._last_expiry = wall
        expired = [
            rec.job_id
            for rec in self.machine.jobs.state.jobs.values()
            if rec.status != "running"
            and wall - (rec.finished_at or rec.submitted_at) > retention
            and rec.job_id not in self._expiring
        ][: self.config.expiries_per_round_max]
        for job_id in expired:
            self._expiring.add(job_id)
            self.event("job_expired", f"older than {retention:g} s", job_id)
            self.propose_soon(JobDeleted(job_id))

    def step(self, event: SchedulerEvent) -> None:
        if self.scheduler is None:
            return  # not leading: applied commands only update the state machine
        try:
            actions = self.scheduler.step(event)
        except AssertionError as exc:
            # A broken invariant of the core: state can no longer be trusted. Stop
            # the process (the log survives; a restart rebuilds from it).
            log.critical("scheduler invariant broken on %s: %s", type(event).__name__, exc)
            logging.shutdown()
            os._exit(70)
        for action in actions:
            self._carry_out(action)
        if (self._outgoing or self._cancels) and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _carry_out(self, action: SchedulerAction) -> None:
        if isinstance(action, Propose):
            self.propose_action(action)
        elif isinstance(action, Dispatch):
            self._queue_dispatch(action)
        elif isinstance(action, Cancel):
            key = (action.worker, action.queued_only)
            self._cancels.setdefault(key, []).append(action.attempt)
            if action.reason:
                a = action.attempt
                self.event(
                    "task_timed_out",
                    f"stage {a.stage} partition {a.partition}: {action.reason}",
                    a.job_id,
                )

    def _queue_dispatch(self, d: Dispatch) -> None:
        a = d.attempt
        key = (a.job_id, a.stage, a.partition)
        n = self.dispatch_counts.get(key, 0) + 1
        self.dispatch_counts[key] = n
        if d.speculative:
            self.event(
                "backup_launched",
                f"stage {a.stage} partition {a.partition} on {d.worker}",
                a.job_id,
            )
        elif n > 1:
            self.event(
                "task_rescheduled",
                f"stage {a.stage} partition {a.partition} (run {n}) on {d.worker}",
                a.job_id,
            )
        view = self.workers.get(d.worker)
        if view is None:
            # Lost between the scheduler's decision and now: report it as failed.
            self.step(TaskFailed(a, d.worker, "infra", time.monotonic(), "worker gone"))
            return
        batch = self._outgoing.setdefault(d.worker, RunTasks([], []))
        if a.job_id not in view.plans_sent:
            rec = self.machine.jobs.job(a.job_id)
            if rec is not None:
                replicas = rec.options.shuffle_replicas
                batch.plans.append(JobPlanBlob(a.job_id, rec.plan, replicas))
                view.plans_sent.add(a.job_id)
        batch.tasks.append(d)
        if d.inputs:
            self._reader_inputs[d.attempt] = d.inputs

    def _flush(self) -> None:
        self._flush_scheduled = False
        outgoing, self._outgoing = self._outgoing, {}
        cancels, self._cancels = self._cancels, {}
        for worker_id, batch in outgoing.items():
            view = self.workers.get(worker_id)
            if view is None:
                for d in batch.tasks:
                    self.step(TaskFailed(d.attempt, worker_id, "infra", time.monotonic(), "gone"))
                continue
            view.conn.send_nowait(batch)
        for (worker_id, queued_only), attempts in cancels.items():
            view = self.workers.get(worker_id)
            if view is not None:  # a lost worker's attempts are void already
                view.conn.send_nowait(CancelTasks(attempts, queued_only))

    # -- proposals and applied commands ----------------------------------------------
    def propose_action(self, action: Propose) -> None:
        """The scheduler's proposal; a host that batches may hold a non-urgent one."""
        self.propose_soon(action.command)

    def propose_soon(self, cmd: JobCommand) -> None:
        if self._tg is None:
            raise AssertionError("proposal before the coordinator runs")
        self._tg.create_task(self._propose(cmd))

    async def _propose(self, cmd: JobCommand) -> ApplyResult:
        async with self._proposals:
            try:
                raw = await self.log.submit(encode_command(cmd))
            except Unavailable:
                self.step(ProposeFailed(cmd, time.monotonic()))
                return ApplyResult(False, "log unavailable")
            except NotLeader as exc:
                # Only with a replicated log: another replica orders commands now
                # (the leadership callback stops this term's scheduler).
                self.event("not_leader", str(exc))
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
        if isinstance(cmd, JobDeleted):
            self._expiring.discard(cmd.job_id)
        self.step(Applied(cmd, result, time.monotonic()))
        if not result.accepted:
            return
        if isinstance(cmd, JobSubmitted):
            self.event("job_submitted", cmd.options.name or "", cmd.job_id)
        elif isinstance(cmd, OutputLost):
            self.event("output_lost", f"stage {cmd.stage} partition {cmd.partition}", cmd.job_id)
        elif isinstance(cmd, JobFinished | JobFailedCmd):
            failed = isinstance(cmd, JobFailedCmd)
            what = cmd.error.message.splitlines()[0] if isinstance(cmd, JobFailedCmd) else ""
            self.event("job_failed" if failed else "job_finished", what, cmd.job_id)
            self._job_over(cmd.job_id)

    def _job_over(self, job_id: str) -> None:
        done = self.job_done.pop(job_id, None)
        if done is not None:
            done.set()
        for key in [k for k in self.dispatch_counts if k[0] == job_id]:
            del self.dispatch_counts[key]
        self._bad_outputs = {k for k in self._bad_outputs if k[0] != job_id}
        for attempt in [a for a in self._reader_inputs if a.job_id == job_id]:
            del self._reader_inputs[attempt]
        for view in self.workers.values():
            view.plans_sent.discard(job_id)
            view.conn.send_nowait(DropJobs([job_id]))

    def leader_hint(self) -> str | None:
        """The client address of the leader, as far as this replica knows."""
        return self.address if self.leading else self.log.leader_address

    def all_events(self) -> list[Event]:
        return list(self.events)

    def coordinator_members(self, pid: int) -> list[MemberInfo]:
        role = "leader" if self.leading else "follower"
        return [MemberInfo("coordinator", self.member_id, pid, self.address, role)]

    def job_record(self, job_id: str) -> JobRecord | None:
        return self.machine.jobs.job(job_id)

    def encode_record(self, rec: JobRecord) -> bytes:
        return _record_encoder.encode(rec)

    def new_job_id(self) -> str:
        return "j" + uuid.uuid4().hex[:12]

    @staticmethod
    def validate_plan(plan: bytes) -> None:
        decode_plan(plan)

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
        if reg.worker in self.lost or reg.worker in self.workers or reg.slots <= 0:
            # A lost incarnation may hold stale attempts: it must rejoin as a new one.
            await conn.send(Registered(self.address, self.config.heartbeat_interval_s, False))
            return
        for old in [v for v in self.workers.values() if reg.node and v.node == reg.node]:
            # The node restarted before its old agent was found dead: that one is gone.
            self._lose_worker(old, f"its node {reg.node} rejoined as {reg.worker}")
        view = WorkerView(reg, conn)
        self.workers[reg.worker] = view
        now = time.monotonic()
        self.phi.heartbeat(reg.worker, now)
        await conn.send(Registered(self.address, self.config.heartbeat_interval_s, True))
        self.event("worker_joined", f"{reg.name} ({reg.worker}) pid {reg.pid} at {reg.address}")
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
                self._lose_worker(view, "connection closed")

    def _on_worker_message(self, view: WorkerView, msg: CoordinatorMessage) -> None:
        now = time.monotonic()
        self.phi.heartbeat(view.worker_id, now)
        if isinstance(msg, Heartbeat):
            view.executors = list(msg.executors)
            view.running = list(msg.running)
            view.storage = msg.storage
            self.members_changed.set()
        elif isinstance(msg, StorageNotice):
            self.storage.on_notice(view, msg)
        elif isinstance(msg, Reports):
            for rep in msg.reports:
                ev = msgspec.structs.replace(rep, now=now)
                inputs = (
                    self._reader_inputs.pop(ev.attempt, None)
                    if not isinstance(ev, TaskStarted)
                    else None
                )
                if isinstance(ev, TaskFailed) and ev.kind == "infra":
                    self.event(
                        "task_failed",
                        f"stage {ev.attempt.stage} partition "
                        f"{ev.attempt.partition} on {view.name}: {ev.message}",
                        ev.attempt.job_id,
                    )
                elif isinstance(ev, FetchFailed):
                    self.step(self._fetch_failure(ev, inputs))
                    continue
                self.step(ev)
        else:
            raise ValueError(f"worker sent {type(msg).__name__}")

    def _fetch_failure(self, ev: FetchFailed, inputs: list[OutputRef] | None) -> FetchFailed:
        """Pass a fetch failure on, marked stale when the output was known bad.

        A reader dispatched before an output was found bad still holds the old
        ref; when it fails on it too, the producer is already being re-made, and
        counting that against the reader's retries could fail a healthy job. The
        core cannot tell (the report names the map task, not the output), so the
        shell, which saw the dispatch, marks a second failure on the same output,
        or one on a worker already declared lost, as ``stale``.
        """
        job_id = ev.attempt.job_id
        block = None
        if inputs is not None and 0 <= ev.map_partition < len(inputs):
            # One map output serves every reader, each its own bucket: key on the
            # output (the block name without its ":bucket" suffix).
            block = inputs[ev.map_partition].block.rsplit(":", 1)[0]
        key = (job_id, ev.source_worker, block or "")
        stale = ev.source_worker in self.lost or (block is not None and key in self._bad_outputs)
        detail = f"stage {ev.map_stage} map {ev.map_partition} from {ev.source_worker}"
        if stale:
            self.event("fetch_failed", detail + " (known bad)", job_id)
            return msgspec.structs.replace(ev, stale=True)
        if block is not None:
            self._bad_outputs.add(key)
        self.event("fetch_failed", detail, job_id)
        return msgspec.structs.replace(ev, stale=False) if ev.stale else ev  # ours to set

    def _lose_worker(self, view: WorkerView, why: str) -> None:
        if self.workers.pop(view.worker_id, None) is None:
            return
        self.lost.append(view.worker_id)
        self.phi.remove(view.worker_id)
        self.event("worker_lost", f"{view.name} ({view.worker_id}): {why}")
        self.members_changed.set()
        self.storage.members_changed()
        view.conn.writer.close()
        self.step(WorkerLost(view.worker_id, time.monotonic()))

    def executor_infos(self) -> list[tuple[WorkerView, ExecutorInfo]]:
        return [(v, e) for v in self.workers.values() for e in v.executors]


def next_epoch(data_dir: str) -> int:
    """A new leadership epoch per coordinator start, persisted so it never repeats."""
    path = os.path.join(data_dir, "epoch")
    epoch = 0
    with contextlib.suppress(FileNotFoundError, ValueError), open(path) as f:
        epoch = int(f.read().strip())
    epoch += 1
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(epoch))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return epoch


async def serve_coordinator(
    sock: socket.socket, token: str, data_dir: str, config: CoordinatorConfig
) -> None:
    from lepton_ai.node.local_log import LocalLog, LocalLogConfig

    host, port = sock.getsockname()[:2]
    address = f"{host}:{port}"
    os.makedirs(data_dir, exist_ok=True)
    machine = JobsMachine(JobStateConfig(finished_jobs_max=config.finished_jobs_max))
    local_log = LocalLog(
        os.path.join(data_dir, "log"), machine, LocalLogConfig(fsync=config.fsync), address
    )
    coordinator = Coordinator(local_log, machine, address, config, token=token)
    # A local log is always its own leader; a replicated one calls this on every
    # election won or lost, with its ballot as the epoch.
    epoch = next_epoch(data_dir)
    local_log.on_leadership(lambda leading: coordinator.on_leadership(leading, epoch))
    try:
        await coordinator.run(sock)
    finally:
        await local_log.close()


def run_coordinator(
    token: str,
    data_dir: str,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    listen_fd: int | None = None,
    fsync: bool = True,
    announce: bool = True,
    node_id: int | None = None,
    peers: dict[int, str] | None = None,
    paxos_fd: int | None = None,
    finished_jobs_max: int = 256,
    job_retention_s: float = 0.0,
) -> None:
    """Entry point of ``lepton coordinator``: run until killed.

    With ``peers`` (and ``node_id``) the coordinator is one replica of the
    Multi-Paxos log (``node.replicated``); without, it runs on a local log.
    """
    from lepton_ai.node.netutil import bind_listener
    from lepton_ai.node.process import watch_parent

    if (peers is None) != (node_id is None):
        raise ValueError("--id and --peers go together")
    if peers is not None and node_id not in peers:
        raise ValueError(f"--id {node_id} is not in --peers ({', '.join(map(str, peers))})")
    watch_parent()
    logging.basicConfig(level=os.environ.get("LEPTON_LOG_LEVEL", "WARNING"))
    sock = socket.socket(fileno=listen_fd) if listen_fd is not None else bind_listener(host, port)
    if announce:
        h, p = sock.getsockname()[:2]
        print(json.dumps({"address": f"{h}:{p}", "pid": os.getpid()}), flush=True)
    if finished_jobs_max < 1:
        raise ValueError(f"--finished-jobs-max must be >= 1, got {finished_jobs_max}")
    if job_retention_s < 0:
        raise ValueError(f"--job-retention-s must be >= 0, got {job_retention_s}")
    config = CoordinatorConfig(
        fsync=fsync, finished_jobs_max=finished_jobs_max, job_retention_s=job_retention_s
    )
    if peers is None or node_id is None:
        main_coro = serve_coordinator(sock, token, data_dir, config)
    else:
        from lepton_ai.node.replicated import serve_replicated

        paxos_sock = socket.socket(fileno=paxos_fd) if paxos_fd is not None else None
        main_coro = serve_replicated(
            sock,
            paxos_sock,
            node_id=node_id,
            peers=peers,
            token=token,
            data_dir=data_dir,
            config=config,
        )
    with contextlib.suppress(KeyboardInterrupt):
        eventloop.run(main_coro)


def run_from_args(args: object) -> None:
    """``lepton coordinator`` and ``python -m lepton_ai.node.coordinator``."""
    from lepton_ai.consensus.server import parse_peers
    from lepton_ai.wire import resolve_token

    peers_text = getattr(args, "peers", None)
    run_coordinator(
        resolve_token(getattr(args, "token", None)),
        str(getattr(args, "data_dir", "")),
        host=str(getattr(args, "host", "127.0.0.1")),
        port=int(getattr(args, "port", 0)),
        listen_fd=getattr(args, "listen_fd", None),
        fsync=not getattr(args, "no_fsync", False),
        announce=not getattr(args, "quiet", False),
        node_id=getattr(args, "id", None),
        peers=parse_peers(peers_text) if peers_text else None,
        paxos_fd=getattr(args, "paxos_fd", None),
        finished_jobs_max=int(getattr(args, "finished_jobs_max", 256)),
        job_retention_s=float(getattr(args, "job_retention_s", 0.0)),
    )


def main(argv: list[str] | None = None) -> None:
    import argparse

    from lepton_ai.node.cli import add_coordinator_args

    parser = argparse.ArgumentParser(prog="lepton coordinator")
    add_coordinator_args(parser)
    run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    main()
