"""The leader's side of the storage layer: placement, commits, reads of metadata, repair.

Object metadata is replicated state (``storage.meta.StorageStateMachine``, in the
same log as the jobs); which nodes are alive and how full they are is soft state
from the agents' registrations and heartbeats. Only the leader places objects,
runs the re-replication reconciler (``heal.replication``) and tells nodes to
delete bytes; a new leader starts afresh from the log and the agents' reports.

Job results stored as objects are linked to the storage state in ``apply`` (the
same on every replica): a stored result becomes the object
``_jobs/<job>/result-<partition>`` owned by the job, and the objects of a job are
deleted when the job fails or is forgotten.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec

from lepton_ai.compute.job_state import (
    ApplyResult,
    JobCommand,
    JobDeleted,
    JobFailedCmd,
    JobFinished,
    JobStateMachine,
    TaskFinished,
)
from lepton_ai.compute.plan import decode_plan
from lepton_ai.data.outputs import LEP, part_name, stored_prefix
from lepton_ai.data.sources import BlobSource
from lepton_ai.errors import LeptonError
from lepton_ai.heal.replication import (
    CopyReplica,
    DataLostReport,
    DropReplica,
    NodeView,
    ReplicationConfig,
    ReplicationReconciler,
)
from lepton_ai.monitor.events import EventKind
from lepton_ai.node.messages import (
    ClientReply,
    CopyObjects,
    CopyOrder,
    DropObjects,
    ErrorReply,
    NodeDirectory,
    Ok,
    StorageNotice,
)
from lepton_ai.storage.control import (
    CommitObject,
    DeleteObject,
    ListObjects,
    ObjectInfo,
    ObjectList,
    Placement,
    PlaceObject,
    StatObject,
    StorageCheck,
    StorageReport,
    StorageUsage,
)
from lepton_ai.storage.messages import (
    CHUNK_BYTES_DEFAULT,
    NodeAddr,
    ObjectMeta,
)
from lepton_ai.storage.meta import (
    JobObjectsDeleted,
    ObjectDeleted,
    ObjectPut,
    ReplicaAdded,
    ReplicaDropped,
    StorageCommand,
    StorageResult,
    StorageStateMachine,
    check_key,
    decode_storage_result,
    encode_storage_command,
)

if TYPE_CHECKING:
    from lepton_ai.node.coord_client_api import WorkerView
    from lepton_ai.node.coordinator import Coordinator

log = logging.getLogger("lepton_ai.coordinator.storage")

TMP_PREFIX = "_tmp/"  # parallelized inputs and other objects with a time to live
JOBS_PREFIX = "_jobs/"  # objects owned by a job (its stored results)


@dataclass(frozen=True)
class StorageControlConfig:
    replicas_default: int = 2  # copies of an object (fewer when fewer nodes live)
    chunk_bytes: int = CHUNK_BYTES_DEFAULT
    spares_max: int = 2  # extra placement targets a writer may try when one fails
    # After a leader change, agents re-register within a second or so: judging
    # replicas before would take live nodes for dead ones and copy needlessly.
    repair_grace_s: float = 2.0
    repair_interval_s: float = 0.5
    place_wait_s: float = 5.0  # after becoming leader: how long a put waits for nodes
    tmp_ttl_s: float = 3600.0  # unreferenced ``_tmp/`` objects older than this go
    tmp_sweep_interval_s: float = 60.0
    tmp_sweep_max: int = 1000  # ``_tmp/`` objects examined per sweep
    replication: ReplicationConfig = field(default_factory=ReplicationConfig)


def input_keys(plan: bytes) -> set[str]:
    """The stored inputs (``BlobSource`` keys) of a job's plan."""
    try:
        stages = decode_plan(plan).stages
    except ValueError:
        return set()
    keys = {s.key for s in stages[0].sources or [] if isinstance(s, BlobSource)}
    return keys | {s.ops_ref.key for s in stages if s.ops_ref is not None}


def result_key(job_id: str, partition: int) -> str:
    return f"{JOBS_PREFIX}{job_id}/result-{partition}"


def link_job_command(
    storage: StorageStateMachine,
    jobs: JobStateMachine,
    cmd: JobCommand,
    result: ApplyResult,
    jobs_before: set[str] | None,
    *,
    plan: bytes | None = None,
) -> list[ObjectMeta]:
    """Storage effects of an applied job command; the objects it removed.

    Deterministic (run in ``apply`` on every replica): ``jobs_before`` is the set
    of job ids before a command that can close or evict jobs, ``plan`` the plan of
    the job a ``JobFinished`` closes (read before: closing may evict its record).
    """
    removed: list[ObjectMeta] = []
    if not result.accepted:
        return removed
    if isinstance(cmd, TaskFinished) and len(cmd.outputs) == 1:
        obj = cmd.outputs[0].obj
        if obj is not None:
            meta = ObjectMeta(
                result_key(cmd.job_id, cmd.partition),
                obj.oid,
                obj.size,
                obj.crc,
                obj.chunk_bytes,
                list(obj.replicas),
                max(1, obj.want),
                obj.created_at,
                cmd.job_id,
            )
            removed += storage.apply_command(ObjectPut(meta)).removed
    if isinstance(cmd, JobFinished) and plan is not None:
        removed += commit_output(storage, plan, cmd.job_id)
    gone: set[str] = set()
    if jobs_before is not None:
        gone = jobs_before - set(jobs.state.jobs)
    if isinstance(cmd, JobFailedCmd):
        gone.add(cmd.job_id)  # a failed job keeps no result
    for job_id in sorted(gone):
        while True:
            res = storage.apply_command(JobObjectsDeleted(job_id))
            removed += res.removed
            if not res.more:
                break
    return removed


def commit_output(storage: StorageStateMachine, plan: bytes, job_id: str) -> list[ObjectMeta]:
    """A finished ``write`` to ``lep://prefix``: its parts (the job's stored results)
    become ``prefix/part-NNNNN.ext``, and what was under the prefix goes, all in this
    one command; the objects it removed."""
    result_stage = decode_plan(plan).result_stage
    spec = result_stage.result
    if spec is None or spec.write is None or not spec.write.url.startswith(LEP):
        return []
    prefix = stored_prefix(spec.write.url)
    removed: list[ObjectMeta] = []
    while True:
        old = storage.list(prefix + "/", "", storage.config.list_max)
        gone = [m for meta in old for m in storage.apply_command(ObjectDeleted(meta.key)).removed]
        removed += gone
        if len(old) < storage.config.list_max or not gone:
            break
    for partition in range(result_stage.num_partitions):
        part = storage.get(result_key(job_id, partition))
        if part is None:
            continue  # not stored: the job's record still holds it (cannot happen)
        storage.apply_command(ObjectDeleted(part.key, part.oid))
        final = msgspec.structs.replace(
            part, key=f"{prefix}/{part_name(partition, spec.write.fmt)}", job=""
        )
        storage.apply_command(ObjectPut(final))
    return removed


def closes_jobs(cmd: JobCommand) -> bool:
    return isinstance(cmd, JobFinished | JobFailedCmd | JobDeleted)


class StorageControl:
    """The leader's storage duties, attached to a ``Coordinator``."""

    def __init__(self, coordinator: Coordinator, config: StorageControlConfig) -> None:
        self.c = coordinator
        self.config = config
        self.reconciler = ReplicationReconciler(config.replication)
        self.leading_since = 0.0
        self._last_repair = 0.0
        self._last_tmp_sweep = time.monotonic()
        self._directory_dirty = False

    @property
    def state(self) -> StorageStateMachine:
        return self.c.machine.storage

    # -- leadership and membership ---------------------------------------------------
    def became_leader(self) -> None:
        self.reconciler = ReplicationReconciler(self.config.replication)
        self.leading_since = time.monotonic()

    def live_views(self) -> dict[str, WorkerView]:
        return {v.node: v for v in self.c.workers.values() if v.node}

    def addrs(self, nodes: list[str]) -> list[NodeAddr]:
        """The live ones of ``nodes``, the least suspect first (the failure detector's
        phi): a reader tries a node gone quiet only after the others."""
        live = self.live_views()
        now = time.monotonic()
        held = sorted(
            (self.c.phi.phi(live[n].worker_id, now), i, n) for i, n in enumerate(nodes) if n in live
        )
        return [NodeAddr(n, live[n].address) for _, _, n in held]

    def members_changed(self) -> None:
        """A node joined or was lost: every agent gets the new directory (batched)."""
        if not self._directory_dirty:
            self._directory_dirty = True
            asyncio.get_running_loop().call_soon(self._push_directory)

    def _push_directory(self) -> None:
        self._directory_dirty = False
        nodes = [NodeAddr(n, v.address, v.worker_id) for n, v in sorted(self.live_views().items())]
        for view in self.c.workers.values():
            view.conn.send_nowait(NodeDirectory(nodes))

    # -- proposals -------------------------------------------------------------------
    async def propose(self, cmd: StorageCommand) -> StorageResult | ErrorReply:
        try:
            raw = await self.c.log.submit(encode_storage_command(cmd))
        except LeptonError as exc:  # NotLeader, Unavailable, a slot lost in an election
            return ErrorReply("unavailable", f"log unavailable: {exc}")
        return decode_storage_result(raw)

    def propose_soon(self, cmd: StorageCommand) -> None:
        if self.c._tg is None:
            raise AssertionError("proposal before the coordinator runs")
        self.c._tg.create_task(self._propose_quietly(cmd))

    async def _propose_quietly(self, cmd: StorageCommand) -> None:
        res = await self.propose(cmd)
        if isinstance(res, ErrorReply):
            log.info("%s not committed: %s", type(cmd).__name__, res.message)

    def on_removed(self, removed: list[ObjectMeta]) -> None:
        """Objects left the state (on every replica): the leader deletes their bytes."""
        if not self.c.leading or not removed:
            return
        by_node: dict[str, list[str]] = {}
        for meta in removed:
            for node in meta.replicas:
                by_node.setdefault(node, []).append(meta.oid)
        live = self.live_views()
        for node, oids in by_node.items():
            view = live.get(node)
            if view is not None:
                view.conn.send_nowait(DropObjects(oids))

    # -- client requests -------------------------------------------------------------
    async def handle(self, msg: object) -> ClientReply | None:
        """Answer a storage request; None if ``msg`` is not one."""
        if isinstance(msg, PlaceObject):
            await self._nodes_settled(msg.replicas)
            return self._place(msg)
        if isinstance(msg, CommitObject):
            return await self._commit(msg)
        if isinstance(msg, DeleteObject):
            return await self._delete(msg)
        if isinstance(msg, StatObject | ListObjects | StorageCheck):
            try:
                # Confirm leadership first: a deposed leader must not answer from
                # state a new leader may have moved past.
                await self.c.log.read_barrier()
            except LeptonError as exc:
                return ErrorReply("unavailable", f"log unavailable: {exc}")
            if isinstance(msg, StatObject):
                meta = self.state.by_oid(msg.oid) if msg.oid else self.state.get(msg.key)
                if meta is not None:
                    await self._replica_settled(meta)
                return self._stat(msg)
            if isinstance(msg, ListObjects):
                return self._list(msg)
            return self._check(msg)
        return None

    async def _nodes_settled(self, replicas: int) -> None:
        """Just after a leader change the agents are still re-registering: wait (up to
        ``place_wait_s``) for enough nodes, rather than refuse a put that would fit."""
        deadline = self.leading_since + self.config.place_wait_s
        while len(self._usable_nodes()) < max(1, replicas):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.c.members_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.c.members_changed.wait(), left)

    async def _replica_settled(self, meta: ObjectMeta) -> None:
        """As ``_nodes_settled``, for a read: wait for a node holding a copy to rejoin."""
        deadline = self.leading_since + self.config.place_wait_s
        while not self.addrs(meta.replicas) and time.monotonic() < deadline:
            self.c.members_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.c.members_changed.wait(), deadline - time.monotonic())

    def _place(self, msg: PlaceObject) -> ClientReply:
        if msg.size < 0 or msg.replicas < 0:
            return ErrorReply("invalid", "size and replicas must be >= 0")
        nodes = self._usable_nodes()
        if not nodes:
            return ErrorReply("unavailable", "no storage node is live")
        want = msg.replicas or min(self.config.replicas_default, len(nodes))
        if want > len(nodes):
            return ErrorReply(
                "invalid",
                f"replicas={want} but only {len(nodes)} storage nodes are live "
                "(each replica needs its own node)",
            )
        # Most free room first; nodes without room for this object are not targets.
        fits = [(n, u) for n, u in nodes if u.free_bytes >= msg.size]
        if len(fits) < want:
            most = max(u.free_bytes for _, u in nodes)
            return ErrorReply(
                "full",
                f"no room for {msg.size} bytes x {want} replicas: {len(fits)} of "
                f"{len(nodes)} nodes have room (largest free: {most} bytes; "
                "raise --storage-bytes-max or delete objects)",
            )
        fits.sort(key=lambda nu: (-nu[1].free_bytes, nu[0]))
        chosen = [n for n, _ in fits[: want + self.config.spares_max]]
        return Placement(os.urandom(16).hex(), self.config.chunk_bytes, want, self.addrs(chosen))

    def _usable_nodes(self) -> list[tuple[str, StorageUsage]]:
        return [
            (n, v.storage) for n, v in sorted(self.live_views().items()) if v.storage is not None
        ]

    async def _commit(self, msg: CommitObject) -> ClientReply:
        meta = msg.meta
        # The state machine checks the key and the rest as well; these two here so
        # that a bad request costs no log slot.
        why = check_key(meta.key) or ("" if meta.replicas else "an object needs a replica")
        if why:
            return ErrorReply("invalid", why)
        meta = ObjectMeta(
            meta.key,
            meta.oid,
            meta.size,
            meta.crc,
            meta.chunk_bytes,
            list(meta.replicas),
            meta.want,
            time.time(),
            meta.job,
        )
        res = await self.propose(ObjectPut(meta, if_absent=msg.if_absent))
        if isinstance(res, ErrorReply):
            return res
        if not res.accepted and res.reason.startswith("duplicate put"):
            # A retry of a commit that went through (its reply was lost in a
            # failover): the object is there, as the writer wanted.
            current = self.state.get(meta.key)
            return ObjectInfo(current or meta, self.addrs((current or meta).replicas))
        if not res.accepted:
            kind = "invalid"
            if res.reason == "key exists":
                kind = "exists"
            elif res.reason.startswith("too many objects"):
                kind = "limit"
            return ErrorReply(kind, res.reason)
        return ObjectInfo(meta, self.addrs(meta.replicas))

    async def _delete(self, msg: DeleteObject) -> ClientReply:
        res = await self.propose(ObjectDeleted(msg.key))
        if isinstance(res, ErrorReply):
            return res
        if not res.accepted:
            return ErrorReply("not_found", f"no object {msg.key!r}")
        return Ok()

    def _stat(self, msg: StatObject) -> ClientReply:
        meta = self.state.by_oid(msg.oid) if msg.oid else self.state.get(msg.key)
        if meta is None:
            return ErrorReply("not_found", f"no object {msg.key or msg.oid!r}")
        return ObjectInfo(meta, self.addrs(meta.replicas))

    def _list(self, msg: ListObjects) -> ClientReply:
        limit = max(1, min(msg.limit, self.state.config.list_max))
        found = self.state.list(msg.prefix, msg.start_after, limit + 1)
        return ObjectList(found[:limit], len(found) > limit)

    def _check(self, msg: StorageCheck) -> ClientReply:
        live = set(self.live_views())
        under: list[ObjectMeta] = []
        lost: list[ObjectMeta] = []
        if msg.quick:
            under, lost = self.state.on_down_nodes(live, max(1, msg.limit))
        else:
            for meta in self.state.under_replicated(live):
                alive = [n for n in meta.replicas if n in live]
                (under if alive else lost).append(meta)
        limit = max(1, msg.limit)
        usage = {n: u for n, u in self._usable_nodes()}
        return StorageReport(
            self.state.total_objects,
            sum(self.state.bytes_by_node().values()),
            under[:limit],
            lost[:limit],
            usage,
            len(self.reconciler.inflight()),
        )

    # -- agents' notices -------------------------------------------------------------
    def on_notice(self, view: WorkerView, notice: StorageNotice) -> None:
        now = time.monotonic()
        for oid in notice.corrupt:
            self.c.event(EventKind.REPLICA_CORRUPT, f"object {oid} on {view.name}: deleted there")
            self.propose_soon(ReplicaDropped(oid, view.node))
        for copy in notice.copies:
            self.reconciler.copy_done(copy.oid, view.node, copy.ok, now)
            if copy.ok:
                self.propose_soon(ReplicaAdded(copy.oid, view.node))
            else:
                self.c.event(
                    EventKind.REPLICA_COPY_FAILED,
                    f"object {copy.oid} to {view.name}: {copy.message}",
                )
        if notice.check:
            unknown = [oid for oid in notice.check if not self._listed_on(oid, view.node)]
            if unknown:
                view.conn.send_nowait(DropObjects(unknown))

    def _listed_on(self, oid: str, node: str) -> bool:
        meta = self.state.by_oid(oid)
        return meta is not None and node in meta.replicas

    # -- the reconciler (leader only, from the coordinator's tick) --------------------
    def tick(self, now: float) -> None:
        if now - self.leading_since < self.config.repair_grace_s:
            return
        if now - self._last_repair >= self.config.repair_interval_s:
            self._last_repair = now
            self._repair(now)
        if now - self._last_tmp_sweep >= self.config.tmp_sweep_interval_s:
            self._last_tmp_sweep = now
            for key in self._expired_inputs():
                self.propose_soon(ObjectDeleted(key))

    def _expired_inputs(self) -> list[str]:
        """``_tmp/`` objects past their time to live that no running job reads.

        A dataset's inputs are put when it is built and may serve several jobs, so
        they are not owned by one job: they go once idle for ``tmp_ttl_s``.
        """
        older = time.time() - self.config.tmp_ttl_s
        candidates = [
            m.key
            for m in self.state.list(TMP_PREFIX, "", self.config.tmp_sweep_max)
            if m.created_at < older
        ]
        if not candidates:
            return []
        in_use: set[str] = set()
        for rec in self.c.machine.jobs.state.jobs.values():
            if rec.status == "running":
                in_use |= input_keys(rec.plan)
        return [k for k in candidates if k not in in_use]

    async def _drop_replica(self, oid: str, node: str) -> None:
        """An excess replica: out of the log first, then its bytes off the node."""
        res = await self.propose(ReplicaDropped(oid, node))
        view = self.live_views().get(node)
        if isinstance(res, StorageResult) and res.accepted and view is not None:
            view.conn.send_nowait(DropObjects([oid]))

    def _repair(self, now: float) -> None:
        live = self.live_views()
        nodes = {
            n: NodeView(n, True, v.storage.free_bytes if v.storage else 0, 0.0)
            for n, v in live.items()
        }
        orders: dict[str, list[CopyOrder]] = {}
        for action in self.reconciler.step(self.state, nodes, now):
            if isinstance(action, CopyReplica):
                sources = [live[n].address for n in action.source_nodes if n in live]
                orders.setdefault(action.target, []).append(CopyOrder(action.oid, sources))
                self.c.event(EventKind.REPLICA_COPY, f"object {action.oid} to {action.target}")
            elif isinstance(action, DropReplica) and self.c._tg is not None:
                self.c._tg.create_task(self._drop_replica(action.oid, action.node))
            elif isinstance(action, DataLostReport):
                where = ", ".join(action.replicas) or "no node"
                self.c.event(
                    EventKind.DATA_LOST, f"object {action.key}: no live copy (was on {where})"
                )
        for node, batch in orders.items():
            view = live.get(node)
            if view is not None:
                view.conn.send_nowait(CopyObjects(batch))
