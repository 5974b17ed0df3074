"""The coordinator's client-facing requests and its view of each worker."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from typing import TYPE_CHECKING

import msgspec

from lepton_ai.compute.job_state import ErrorInfo, JobDeleted, JobFailedCmd, JobRecord, JobSubmitted
from lepton_ai.compute.plan import PLAN_BYTES_MAX, decode_plan
from lepton_ai.compute.scheduler_events import RunningReport
from lepton_ai.errors import LeptonError
from lepton_ai.node.messages import (
    CancelJob,
    ClientReply,
    ClusterInfo,
    CoordinatorMessage,
    DeleteJob,
    ErrorReply,
    EventList,
    ExecutorInfo,
    GetEvents,
    GetJobTasks,
    GetStatus,
    JobAccepted,
    JobInfo,
    JobList,
    JobTasks,
    ListJobs,
    MemberInfo,
    Ok,
    RecordEvent,
    Register,
    SubmitJob,
    WaitJob,
)
from lepton_ai.serve.spec import ReplicaReport
from lepton_ai.storage.control import StorageUsage
from lepton_ai.wire import Connection

if TYPE_CHECKING:
    from lepton_ai.node.coordinator import Coordinator

NO_LEADER_WAIT_S = 0.5  # a follower that knows no leader holds a client request this long
NO_LEADER_POLL_S = 0.01
_record_encoder = msgspec.msgpack.Encoder()


class WorkerView:
    """What the coordinator knows about one registered worker incarnation."""

    def __init__(self, reg: Register, conn: Connection[CoordinatorMessage]) -> None:
        self.worker_id = reg.worker
        self.name = reg.name
        self.address = reg.address
        self.pid = reg.pid
        self.slots = reg.slots
        self.conn = conn
        self.plans_sent: set[str] = set()
        self.executors: list[ExecutorInfo] = []
        self.running: list[RunningReport] = list(reg.running)
        self.node = reg.node  # the storage node (stable id) behind this incarnation
        self.storage: StorageUsage | None = reg.storage
        self.serve_url = reg.serve_url  # its balancer ("" : it serves nothing)
        self.serve_slots = reg.serve_slots
        self.replicas: list[ReplicaReport] = list(reg.replicas)
        self.inflight: dict[str, int] = {}  # per deployment, from its last heartbeat
        self.metrics = reg.metrics  # its agent's /metrics (host:port)

    @property
    def ready(self) -> bool:
        # ``slots`` counts scheduler slots (executors x pipeline depth), so
        # readiness is judged from the executors the heartbeat lists.
        return bool(self.executors) and all(e.state != "starting" for e in self.executors)


def job_info(rec: JobRecord, with_record: bytes | None) -> JobInfo:
    done, total = rec.progress()
    return JobInfo(
        rec.job_id,
        rec.status,
        done,
        total,
        rec.options.name,
        rec.submitted_at,
        rec.finished_at,
        with_record,
    )


class ClientApi:
    """One request in, one reply out."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator

    async def handle(self, msg: CoordinatorMessage) -> ClientReply:
        if not self.c.leading and not isinstance(msg, GetEvents):
            # A follower's state may lag and it cannot order commands: send the
            # client to the leader ("" when unknown: the client tries the others).
            hint = await self._leader_hint_soon()
            if not self.c.leading:
                return ErrorReply("redirect", hint or "")
        if isinstance(msg, DeleteJob):
            return await self._delete(msg)
        if isinstance(msg, CancelJob):
            return await self._cancel(msg)
        if isinstance(msg, SubmitJob):
            return await self._submit(msg)
        if isinstance(msg, WaitJob):
            return await self._wait_job(msg)
        if isinstance(msg, ListJobs):
            recs = sorted(self.c.machine.jobs.state.jobs.values(), key=lambda r: r.seq)
            return JobList([job_info(r, None) for r in recs])
        if isinstance(msg, GetStatus):
            return await self._status(msg)
        if isinstance(msg, GetEvents):
            events = [
                e for e in self.c.all_events() if not msg.job_id or e.job_id in ("", msg.job_id)
            ]
            return EventList(events)
        if isinstance(msg, RecordEvent):
            self.c.events.append(msg.event)
            return Ok()
        if isinstance(msg, GetJobTasks):
            spans, dropped = self.c.monitor.tasklog.spans(msg.job_id)
            if not spans and self.c.machine.jobs.job(msg.job_id) is None:
                return ErrorReply("not_found", f"no job {msg.job_id!r}")
            return JobTasks(msg.job_id, spans, dropped)
        stored = await self.c.storage.handle(msg)
        if stored is not None:
            return stored
        served = await self.c.serving.handle(msg)
        if served is not None:
            return served
        return ErrorReply("invalid", f"{type(msg).__name__} is not a client request")

    async def _leader_hint_soon(self) -> str | None:
        """The leader's address; while none is known (an election, a cluster starting),
        wait up to ``NO_LEADER_WAIT_S`` for one: the client is then sent on at once
        instead of backing off and asking round the coordinators again."""
        deadline = time.monotonic() + NO_LEADER_WAIT_S
        hint = self.c.leader_hint()
        while hint is None and not self.c.leading and time.monotonic() < deadline:
            await asyncio.sleep(NO_LEADER_POLL_S)
            hint = self.c.leader_hint()
        return hint

    async def _submit(self, msg: SubmitJob) -> ClientReply:
        if not self.c.leading:
            leader = self.c.log.leader_address or "another coordinator"
            return ErrorReply("unavailable", f"not the leader; try {leader}")
        if len(msg.plan) > PLAN_BYTES_MAX:
            return ErrorReply(
                "limit", f"job plan of {len(msg.plan)} bytes over PLAN_BYTES_MAX={PLAN_BYTES_MAX}"
            )
        try:
            decode_plan(msg.plan)  # validates it
        except ValueError as exc:
            return ErrorReply("invalid", str(exc))
        job_id = msg.job_id or "j" + uuid.uuid4().hex[:12]
        if not job_id.isascii() or not job_id.replace("-", "").replace("_", "").isalnum():
            return ErrorReply("invalid", f"bad job id {job_id!r}")
        result = await self.c.submit_command(
            JobSubmitted(job_id, msg.plan, msg.options, time.time())
        )
        if not result.accepted and result.reason != "duplicate job id":
            unavailable = result.reason.startswith(("not the leader", "log unavailable"))
            return ErrorReply("unavailable" if unavailable else "invalid", result.reason)
        if result.accepted:
            self.c.monitor.job_submitted()
        return JobAccepted(job_id)

    async def _delete(self, msg: DeleteJob) -> ClientReply:
        rec = self.c.machine.jobs.job(msg.job_id)
        if rec is None:
            return ErrorReply("not_found", f"no job {msg.job_id!r}")
        if rec.status == "running":
            return ErrorReply(
                "invalid", f"job {msg.job_id} is running; it can be removed once over"
            )
        result = await self.c.submit_command(JobDeleted(msg.job_id))
        if not result.accepted:
            kind = "not_found" if result.reason == "unknown job" else "unavailable"
            return ErrorReply(kind, result.reason)
        return Ok()

    async def _cancel(self, msg: CancelJob) -> ClientReply:
        rec = self.c.machine.jobs.job(msg.job_id)
        if rec is None:
            return ErrorReply("not_found", f"no job {msg.job_id!r}")
        if rec.status != "running":
            return ErrorReply("invalid", f"job {msg.job_id} is {rec.status}: nothing to cancel")
        error = ErrorInfo("cancelled", "cancelled by the user")
        result = await self.c.submit_command(JobFailedCmd(msg.job_id, error, time.time()))
        if not result.accepted:
            # It ended meanwhile (the job's own outcome won the log), or the log is busy.
            done = self.c.machine.jobs.job(msg.job_id)
            if done is not None and done.status != "running":
                return ErrorReply(
                    "invalid", f"job {msg.job_id} is {done.status}: nothing to cancel"
                )
            return ErrorReply("unavailable", result.reason)
        return Ok()

    async def _wait_job(self, msg: WaitJob) -> ClientReply:
        try:
            # Confirm leadership first: a leader cut off from its quorum must not
            # answer from state that a new leader may have moved past.
            await self.c.log.read_barrier()
        except LeptonError as exc:  # NotLeader, Unavailable
            return ErrorReply("unavailable", f"log unavailable: {exc}")
        rec = self.c.machine.jobs.job(msg.job_id)
        if rec is None:
            return ErrorReply("not_found", f"no job {msg.job_id!r}")
        timeout = min(max(msg.timeout_s, 0.0), self.c.config.wait_timeout_max_s)
        if rec.status == "running" and timeout > 0:
            done = self.c.job_done.setdefault(msg.job_id, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), timeout)
            rec = self.c.machine.jobs.job(msg.job_id)
            if rec is None:
                return ErrorReply("not_found", f"job {msg.job_id!r} was deleted")
        record = _record_encoder.encode(rec) if rec.status != "running" else None
        return job_info(rec, record)

    async def _status(self, msg: GetStatus) -> ClientReply:
        deadline = time.monotonic() + min(max(msg.timeout_s, 0.0), self.c.config.wait_timeout_max_s)
        while True:
            ready = sum(v.ready for v in self.c.workers.values())
            left = deadline - time.monotonic()
            if ready >= msg.workers or left <= 0:
                break
            self.c.members_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.c.members_changed.wait(), left)
        leader = self.c.leader_hint() or ""
        return ClusterInfo(leader, self._members())

    def _members(self) -> list[MemberInfo]:
        now = time.monotonic()
        members = self.c.coordinator_members(os.getpid())
        for v in sorted(self.c.workers.values(), key=lambda v: v.name):
            phi = self.c.phi.phi(v.worker_id, now)
            health = "suspect" if phi >= self.c.config.phi.threshold / 2 else "alive"
            members.append(
                MemberInfo(
                    "worker",
                    v.name,
                    v.pid,
                    v.address,
                    health,
                    v.node or v.worker_id,
                    phi,
                    metrics=v.metrics,
                    serve=v.serve_url,
                )
            )
            for e in v.executors:
                if e.state == "spare":  # a warm replacement, not a slot: its own role
                    spare_id = f"{v.name}.spare{-1 - e.slot}"
                    members.append(
                        MemberInfo(
                            "spare",
                            spare_id,
                            e.pid,
                            "",
                            "idle",
                            v.node or v.worker_id,
                            metrics=v.metrics,
                        )
                    )
                    continue
                members.append(
                    MemberInfo(
                        "executor",
                        f"{v.name}.{e.slot}",
                        e.pid,
                        "",
                        e.state,
                        v.node or v.worker_id,
                        metrics=v.metrics,  # its agent exports it (label executor)
                    )
                )
        return members
