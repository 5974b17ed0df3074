"""A worker node's part in the storage layer (the agent's side of the data plane).

The agent owns the node's ``ObjectStore`` (objects that survive the agent: they
live in the node's own directory, named by its stable node id) and serves it on
its data port next to the shuffle buckets. What it does for the leader:

* reports its usage (capacity, bytes, objects) on registration and heartbeats;
* ``CopyObjects``: pulls objects from live replicas (re-replication), answering
  each with ``StorageNotice.copies``; ``DropObjects``: deletes bytes;
* scrubs its objects in the background at a bounded rate; a corrupt replica is
  deleted and reported (``StorageNotice.corrupt``) so the leader re-replicates;
* sweeps: objects older than ``orphan_grace_s`` are sent to the leader to judge
  (``StorageNotice.check``); it answers ``DropObjects`` for those no committed
  object lists here (a put whose writer died before its commit, a losing
  speculative result, a cached input copy).

And for its own tasks: it brings a stored input (``BlobSource``) to this node
before the executor runs the task, and replicates a stored task result to other
nodes before reporting the task done.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lepton_ai.errors import DataLost, LeptonError, StorageFull
from lepton_ai.node.messages import (
    CopyObjects,
    CopyOrder,
    CopyResult,
    DropObjects,
    NodeDirectory,
    StorageNotice,
)
from lepton_ai.storage.control import StorageUsage
from lepton_ai.storage.dataclient import DataClient, DataClientConfig
from lepton_ai.storage.dataserver import DataServerConfig, ObjectServer, scrub_loop
from lepton_ai.storage.messages import NodeAddr, ObjectMeta
from lepton_ai.storage.objects import ObjectStore, ObjectStoreConfig

log = logging.getLogger("lepton_ai.worker.storage")

NODE_ID_FILE = "node-id"
LOCK_FILE = "lock"


@dataclass(frozen=True)
class NodeStorageConfig:
    capacity_bytes: int = 0  # 0: the disk's free space at start, less a reserve
    fsync: bool = True
    result_replicas: int = 2  # copies of a stored task result (fewer if fewer nodes)
    scrub_bytes_per_s: float = 32 * 1024 * 1024
    scrub_interval_s: float = 60.0  # pause between two passes over every object
    orphan_grace_s: float = 120.0  # an unlisted object younger than this is left alone
    orphan_check_interval_s: float = 30.0
    orphan_batch_max: int = 1000  # oids per StorageNotice.check
    copies_parallel_max: int = 4  # CopyObjects orders run at once here
    notice_items_max: int = 10_000  # notices kept while no leader listens


class NodeBusy(LeptonError):
    """Another worker agent uses this node directory."""


def open_node_dir(data_dir: str, name: str) -> tuple[Path, str, Any]:
    """The node's directory, its stable id (made at first start) and a held lock.

    Two agents on one directory would delete each other's objects: the second
    one gets ``NodeBusy`` at once, naming the directory.
    """
    node_dir = Path(data_dir) / name
    node_dir.mkdir(parents=True, exist_ok=True)
    lock = open(node_dir / LOCK_FILE, "a+")  # noqa: SIM115 - held for the process's life
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise NodeBusy(
            f"{node_dir} is in use by another worker; give each worker its own --name"
        ) from None
    id_path = node_dir / NODE_ID_FILE
    if id_path.exists():
        node_id = id_path.read_text().strip()
    else:
        node_id = f"{name}-{os.urandom(3).hex()}"
        tmp = id_path.with_suffix(".tmp")
        tmp.write_text(node_id)
        os.replace(tmp, id_path)
    return node_dir, node_id, lock


class NodeStorage:
    """The objects of one node and what the agent does with them."""

    def __init__(
        self,
        node_dir: Path,
        node_id: str,
        token: str,
        config: NodeStorageConfig,
        notify: Callable[[StorageNotice], None],
    ) -> None:
        self.node_id = node_id
        self.config = config
        self.store = ObjectStore(
            node_dir / "store",
            ObjectStoreConfig(capacity_bytes=config.capacity_bytes, fsync=config.fsync),
        )
        self.server = ObjectServer(self.store, DataServerConfig(), on_corrupt=self._corrupt)
        self.client = DataClient(token, DataClientConfig())
        self._notify = notify
        self.directory: dict[str, str] = {}  # live node id -> data-plane address
        self.workers: dict[str, str] = {}  # live node id -> its agent's worker id
        self.address = ""  # this node's data-plane address (set once serving)
        self._copies = asyncio.Semaphore(config.copies_parallel_max)
        self._copy_tasks: set[asyncio.Task[None]] = set()

    # -- reports ---------------------------------------------------------------------
    def usage(self) -> StorageUsage:
        return StorageUsage(
            self.store.used_bytes, self.store.capacity_bytes, self.store.object_count
        )

    def _corrupt(self, oid: str) -> None:
        log.warning("object %s failed its checksum here; deleted, reported", oid)
        self._notify(StorageNotice(corrupt=[oid]))

    # -- the leader's orders ---------------------------------------------------------
    def on_message(self, msg: object) -> bool:
        """Handle a leader message of the storage layer; False if it is not one."""
        if isinstance(msg, NodeDirectory):
            self.directory = {n.node: n.address for n in msg.nodes}
            self.workers = {n.node: n.worker for n in msg.nodes}
        elif isinstance(msg, DropObjects):
            for oid in msg.oids:
                self.store.delete(oid)
        elif isinstance(msg, CopyObjects):
            for order in msg.orders:
                task = asyncio.get_running_loop().create_task(self._copy(order))
                self._copy_tasks.add(task)
                task.add_done_callback(self._copy_tasks.discard)
        else:
            return False
        return True

    async def _copy(self, order: CopyOrder) -> None:
        async with self._copies:
            try:
                if not self.store.has(order.oid):
                    await self.client.fetch_to_store(order.oid, order.sources, self.store)
                result = CopyResult(order.oid, True)
            except (DataLost, StorageFull, OSError, LeptonError) as exc:
                result = CopyResult(order.oid, False, f"{type(exc).__name__}: {exc}")
        self._notify(StorageNotice(copies=[result]))

    # -- background duties -----------------------------------------------------------
    async def run(self) -> None:
        """Scrub and sweep until cancelled."""
        cfg = self.config
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(
                    scrub_loop(
                        self.store, cfg.scrub_bytes_per_s, cfg.scrub_interval_s, self._corrupt
                    )
                )
                tg.create_task(self._sweep_loop())
        finally:
            for task in list(self._copy_tasks):
                task.cancel()
            await self.client.close()

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.orphan_check_interval_s)
            # A stat per object: off the loop (a node may hold a million of them).
            old = await asyncio.to_thread(self.old_oids, time.time() - self.config.orphan_grace_s)
            for i in range(0, len(old), self.config.orphan_batch_max):
                self._notify(StorageNotice(check=old[i : i + self.config.orphan_batch_max]))

    def old_oids(self, before: float) -> list[str]:
        """Objects whose file is older than ``before`` (wall clock)."""
        out = []
        for oid in self.store.oids():
            with contextlib.suppress(FileNotFoundError):
                if self.store.path(oid).stat().st_mtime < before:
                    out.append(oid)
        return out

    # -- for this node's tasks -------------------------------------------------------
    def sources_of(self, meta: ObjectMeta) -> list[str]:
        """Data-plane addresses to read ``meta`` from: its replicas, then every other
        live node (a replica may have moved since the reference was made)."""
        listed = [self.directory[n] for n in meta.replicas if n in self.directory]
        rest = [a for n, a in sorted(self.directory.items()) if n not in meta.replicas]
        return [a for a in listed + rest if a != self.address]

    async def bring_local(self, meta: ObjectMeta) -> None:
        """Make sure this node holds ``meta``'s bytes (a task's stored input)."""
        if self.store.has(meta.oid):
            return
        await self.client.fetch_to_store(meta.oid, self.sources_of(meta), self.store)

    async def replicate(self, meta: ObjectMeta, want: int) -> list[str]:
        """Copy a local object to other nodes until ``want`` nodes hold it; returns the
        node ids holding it (this one first). Fewer if too few nodes answer: the
        leader's reconciler completes the count later."""
        holders = [self.node_id]
        others = [(n, a) for n, a in sorted(self.directory.items()) if n != self.node_id]
        need = max(0, want - 1)
        while need > 0 and others:
            batch, others = others[:need], others[need:]
            result = await self.client.put_from_store(self.store, meta.oid, [a for _, a in batch])
            confirmed = set(result.ok)
            holders += [n for n, a in batch if a in confirmed]
            need = max(0, want - len(holders))
        return holders

    def node_addr(self) -> NodeAddr:
        return NodeAddr(self.node_id, self.address)
