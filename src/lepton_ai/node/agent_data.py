"""The worker agent's data port and its copies of task outputs (a mixin of ``WorkerAgent``).

What moves bytes between nodes for the compute layer:

* the data port's server side: shuffle buckets for reducers (``FetchBlocks``),
  copies of shuffle files from other agents (``PutShuffle``) and stored objects
  (``storage.dataserver``);
* before an attempt runs: its shuffle input fetched from other nodes (batched per
  node; this node's own blocks are read by the executor itself), and what it
  reads from storage (a stored source partition, stored stage functions)
  brought to this node;
* after it ran: a stored result copied to ``result_replicas`` nodes and a map
  output's shuffle file to ``shuffle_replicas - 1`` other workers, before the
  attempt is reported, so the report names every copy.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import TYPE_CHECKING

import msgspec

from lepton_ai.compute.job_state import OutputRef
from lepton_ai.compute.plan import JobPlan, decode_plan
from lepton_ai.compute.scheduler_events import TaskAttempt
from lepton_ai.data.sources import BlobSource
from lepton_ai.errors import DataLost, LeptonError, StorageFull
from lepton_ai.node.messages import (
    BlockData,
    ExecRun,
    FetchBlocks,
    FetchFailedReport,
    PutShuffle,
    ShuffleMessage,
    TaskOrder,
)
from lepton_ai.node.node_net import parse_address
from lepton_ai.node.shuffle_copy import (
    ShuffleCopyFailed,
    receive_shuffle,
    send_shuffle,
)
from lepton_ai.storage.blockstore import BlockCorrupt, BlockMissing, BlockStore, ShuffleKey
from lepton_ai.storage.messages import ObjectMeta
from lepton_ai.wire import Codec, Connection, connect

if TYPE_CHECKING:
    from lepton_ai.node.node_storage import NodeStorage
    from lepton_ai.node.worker import WorkerConfig

log = logging.getLogger("lepton_ai.worker")

SHUFFLE_CODEC = Codec[ShuffleMessage](ShuffleMessage)
COPY_TIMEOUT_BASE_S = 5.0  # a shuffle file copy may take this long, plus its size at ...
COPY_BYTES_PER_S_MIN = 20 * 1024 * 1024  # ... this rate, before it is given up


class DataPort:
    """Mixed into ``WorkerAgent``; the attributes below are the agent's."""

    shuffle_bytes_served: int  # shuffle blocks sent to other nodes (for /metrics)

    token: str
    node_id: str
    worker_id: str
    store: BlockStore
    storage: NodeStorage
    config: WorkerConfig
    _fetch_conns: dict[str, Connection[ShuffleMessage]]
    _fetch_locks: dict[str, asyncio.Lock]
    _shuffle_replicas: dict[str, int]
    _decoded: OrderedDict[str, JobPlan]

    async def _replicated(self, ref: OutputRef) -> OutputRef:
        """``ref`` with its stored object copied to ``result_replicas`` nodes."""
        if ref.obj is None:
            return ref
        self.storage.store.note_external(ref.obj.oid)  # an executor wrote it
        want = min(self.config.storage.result_replicas, max(1, len(self.storage.directory)))
        holders = await self.storage.replicate(ref.obj, want)
        obj = msgspec.structs.replace(ref.obj, replicas=holders, want=want)
        return msgspec.structs.replace(ref, obj=obj)

    async def _copy_shuffle(self, a: TaskAttempt, refs: list[OutputRef]) -> list[OutputRef]:
        """Push the attempt's shuffle file to ``shuffle_replicas - 1`` other workers."""
        want = self._shuffle_replicas.get(a.job_id, 1) - 1
        key = ShuffleKey(a.job_id, a.stage, a.partition, a.epoch, a.attempt)
        if want <= 0 or not self.store.has_shuffle(key):
            return refs
        copies: list[str] = []
        for node, address in sorted(self.storage.directory.items()):
            worker = self.storage.workers.get(node, "")
            if len(copies) >= want or node == self.node_id or not worker:
                continue
            lock = self._fetch_locks.setdefault(address, asyncio.Lock())
            async with lock:
                try:
                    # Bounded: a paused peer must not hold this attempt's report for ever
                    # (the copy is then given up; the output keeps its other copies).
                    size = self.store.shuffle_path(key).stat().st_size
                    limit = COPY_TIMEOUT_BASE_S + size / COPY_BYTES_PER_S_MIN
                    conn = await self._fetch_conn(address)
                    await asyncio.wait_for(send_shuffle(conn, self.store, key), limit)
                except (OSError, TimeoutError, LeptonError) as exc:
                    log.info("shuffle copy to %s failed: %s", address, exc)
                    old = self._fetch_conns.pop(address, None)
                    if old is not None:
                        await old.close()
                    continue
            copies.append(worker)
        return [msgspec.structs.replace(r, replicas=copies) for r in refs] if copies else refs

    async def _bring_inputs(self, a: TaskAttempt, plan: bytes) -> str | None:
        """Bring what the attempt reads from storage (its source partition, its
        stage's functions) to this node; why not, or None."""
        for key, meta in self._stored_inputs(a, plan):
            try:
                await self.storage.bring_local(meta)
            except (DataLost, StorageFull, OSError, LeptonError) as exc:
                return f"input {key} not readable: {exc}"
        return None

    def _stored_inputs(self, a: TaskAttempt, plan: bytes) -> list[tuple[str, ObjectMeta]]:
        decoded = self._decoded.get(a.job_id)
        if decoded is None:
            decoded = decode_plan(plan)
            self._decoded[a.job_id] = decoded
            while len(self._decoded) > self.config.plans_max:
                del self._decoded[next(iter(self._decoded))]
        if not 0 <= a.stage < len(decoded.stages):
            return []
        stage = decoded.stages[a.stage]
        out = [] if stage.ops_ref is None else [(stage.ops_ref.key, stage.ops_ref)]
        sources = stage.sources or []
        source = sources[a.partition] if 0 <= a.partition < len(sources) else None
        if isinstance(source, BlobSource) and source.obj is not None:
            out.append((source.key, source.obj))
        return out

    async def _gather_inputs(self, d: TaskOrder) -> ExecRun | FetchFailedReport:
        """The attempt's run message: remote inputs fetched here, this node's own
        blocks named for the executor to read (``ExecRun.local``)."""
        a = d.attempt
        out: list[bytes] = [b""] * len(d.inputs)
        local: dict[int, str] = {}
        remote: dict[str, list[int]] = {}
        for m, ref in enumerate(d.inputs):
            if ref.size_bytes == 0:
                continue
            if ref.worker == self.worker_id:
                local[m] = ref.block
            else:
                remote.setdefault(ref.worker, []).append(m)
        for worker, maps in remote.items():
            bad = await self._fetch_remote(d, worker, maps, out)
            if bad is not None:
                return FetchFailedReport(a, a.stage - 1, bad, worker)
        return ExecRun(a, out, local)

    async def _fetch_remote(
        self, d: TaskOrder, worker: str, maps: list[int], out: list[bytes]
    ) -> int | None:
        """Fill ``out`` for ``maps`` from ``worker``; the first map that failed, or None."""
        address = d.addresses.get(worker)
        if address is None:
            return maps[0]
        lock = self._fetch_locks.setdefault(address, asyncio.Lock())
        async with lock:
            try:
                conn = await self._fetch_conn(address)
                await conn.send(FetchBlocks(d.attempt.job_id, [d.inputs[m].block for m in maps]))
                reply = await conn.recv()
            except (OSError, TimeoutError, LeptonError):
                old = self._fetch_conns.pop(address, None)
                if old is not None:
                    await old.close()
                return maps[0]
        if not isinstance(reply, BlockData) or len(reply.status) != len(maps):
            return maps[0]
        for m, status, data in zip(maps, reply.status, reply.data, strict=True):
            if status != "ok":
                return m
            out[m] = data
        return None

    async def _fetch_conn(self, address: str) -> Connection[ShuffleMessage]:
        conn = self._fetch_conns.get(address)
        if conn is not None and not conn.closed:
            return conn
        if len(self._fetch_conns) >= self.config.fetch_connections_max:
            _, oldest = self._fetch_conns.popitem()
            await oldest.close()
        host, port = parse_address(address)
        conn = await connect(
            host, port, token=self.token, codec=SHUFFLE_CODEC, config=self.config.wire
        )
        self._fetch_conns[address] = conn
        return conn

    async def _serve_blocks(self, conn: Connection[ShuffleMessage]) -> None:
        async for msg in conn:
            if await self.storage.server.handle(conn, msg):
                continue
            if isinstance(msg, PutShuffle):
                try:
                    await receive_shuffle(conn, self.store, msg)
                except ShuffleCopyFailed as exc:
                    log.warning("closing %s: %s", conn.peer, exc)
                    return
                continue
            if not isinstance(msg, FetchBlocks):
                return
            status: list[str] = []
            data: list[bytes] = []
            for block in msg.blocks:
                try:
                    data.append(self.store.read_block(msg.job_id, block))
                    status.append("ok")
                except BlockMissing:
                    status.append("missing")
                    data.append(b"")
                except (BlockCorrupt, ValueError):
                    status.append("corrupt")
                    data.append(b"")
            self.shuffle_bytes_served += sum(map(len, data))
            await conn.send(BlockData(status, data))
