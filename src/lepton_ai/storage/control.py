"""The storage layer's control-plane requests: client <-> leading coordinator.

A put asks the leader where to write (``PlaceObject`` -> ``Placement``), streams
the bytes to those nodes itself (the data plane, ``storage.messages``), then
commits the reference (``CommitObject``): only then is the object visible, so a
writer that dies half way leaves nothing visible (its partial bytes are orphans
the nodes' sweep removes). Reads ask for the live replicas (``StatObject``).
"""

from __future__ import annotations

import msgspec

from lepton_ai.storage.messages import NodeAddr, ObjectMeta


class StorageUsage(msgspec.Struct, frozen=True):
    """One node's object store: bytes held, its capacity, objects held."""

    used_bytes: int
    capacity_bytes: int
    objects: int

    @property
    def free_bytes(self) -> int:
        return max(0, self.capacity_bytes - self.used_bytes)


class PlaceObject(msgspec.Struct, frozen=True, tag=True):
    """Where to store ``size`` bytes as ``replicas`` copies (0: the cluster default)."""

    size: int
    replicas: int = 0


class Placement(msgspec.Struct, frozen=True, tag=True):
    oid: str
    chunk_bytes: int
    want: int
    targets: list[NodeAddr]  # ``want`` distinct nodes first, then spares to try on a failure


class CommitObject(msgspec.Struct, frozen=True, tag=True):
    """Make ``meta`` visible under ``meta.key`` (its replicas confirmed the bytes).
    ``if_absent``: only if the key does not exist (else ``ErrorReply("exists")``)."""

    meta: ObjectMeta
    if_absent: bool = False


class StatObject(msgspec.Struct, frozen=True, tag=True):
    key: str = ""
    oid: str = ""  # look up by object id instead (a job's result part)


class ObjectInfo(msgspec.Struct, frozen=True, tag=True):
    meta: ObjectMeta
    sources: list[NodeAddr]  # live replicas' data-plane addresses


class ListObjects(msgspec.Struct, frozen=True, tag=True):
    prefix: str = ""
    start_after: str = ""
    limit: int = 1000


class ObjectList(msgspec.Struct, frozen=True, tag=True):
    objects: list[ObjectMeta]
    more: bool = False


class DeleteObject(msgspec.Struct, frozen=True, tag=True):
    key: str


class StorageCheck(msgspec.Struct, frozen=True, tag=True):
    """fsck: the objects short of replicas or lost, and every node's usage.

    ``quick``: only objects with a copy on a node that is down, found through the
    per-node index (what a dashboard polls: its cost is what the down nodes held,
    where the full check reads every object in the log)."""

    limit: int = 1000
    quick: bool = False


class StorageReport(msgspec.Struct, frozen=True, tag=True):
    objects: int
    bytes: int
    under_replicated: list[ObjectMeta]
    lost: list[ObjectMeta]
    nodes: dict[str, StorageUsage]
    copies_inflight: int = 0
