"""The storage layer's vocabulary: object references and the data-plane protocol.

Two planes (DESIGN.md section 3). The *control plane* (the Paxos log) holds
only ``ObjectMeta``: a key's object id, size, checksums and which nodes hold a
replica. The *data plane* moves the bytes, node to node and node to client,
on each worker node's data port (the same port as the shuffle server), in
chunks of ``chunk_bytes`` each carrying its own crc32c, so no frame ever holds
a whole object and every chunk is verified where it is read.

Data-plane conversations (one request at a time per connection):

* put:  client ``PutObject`` -> ``Chunk`` x n (index 0..n-1) -> server ``PutDone``
  (or ``DataError``; the server may answer early with ``DataError`` and close).
* get:  client ``GetObject(oid, first, count)`` -> server ``ObjectHeader`` then
  the chunks ``first..first+count-1`` as ``Chunk`` frames, or ``DataError``.
  A chunk the server finds corrupt on disk ends the stream with ``DataError``
  (kind "corrupt"); the reader goes on from that chunk at another replica.
* delete: ``DeleteObjects(oids)`` -> ``PutDone``-less ``DataOk``.

Names: ``oid`` is 32 lowercase hex digits, new for every put (a key written
again gets a new object; the old one is deleted once the new one commits).
"""

from __future__ import annotations

import re
from typing import Literal

import msgspec

OID_RE = re.compile(r"^[0-9a-f]{32}$")
CHUNK_BYTES_DEFAULT = 1 << 20
CHUNK_BYTES_MAX = 16 << 20
KEY_BYTES_MAX = 1024


def check_oid(oid: object) -> str:
    if not isinstance(oid, str) or not OID_RE.fullmatch(oid):
        raise ValueError(f"not an object id: {oid!r}")
    return oid


def chunk_count(size: int, chunk_bytes: int) -> int:
    """Chunks of an object of ``size`` bytes (an empty object has none)."""
    return (size + chunk_bytes - 1) // chunk_bytes


# ------------------------------------------------------------------ metadata


class ObjectMeta(msgspec.Struct, frozen=True):
    """One stored object, as committed in the log.

    ``crc`` is the crc32c of the whole content (what ``stat`` shows and a reader
    may check end to end); each chunk has its own crc32c on the nodes.
    ``replicas``: node ids (``status()`` members' ``node``) holding a verified
    copy; ``want``: how many copies the reconciler keeps. ``job``: the job that
    owns the object (its inputs, results, outputs): deleted with the job.
    """

    key: str
    oid: str
    size: int
    crc: int
    chunk_bytes: int
    replicas: list[str]
    want: int
    created_at: float = 0.0
    job: str = ""


class NodeAddr(msgspec.Struct, frozen=True):
    """A worker node's stable id and its data-plane address ``host:port``; ``worker``:
    the agent incarnation serving it now (the scheduler's worker id)."""

    node: str
    address: str
    worker: str = ""


# ------------------------------------------------------------------ data plane


class PutObject(msgspec.Struct, frozen=True, tag=True):
    """Store ``size`` bytes as ``oid``; ``Chunk`` frames follow. ``crc``: whole object."""

    oid: str
    size: int
    chunk_bytes: int
    crc: int
    fsync: bool = False


class Chunk(msgspec.Struct, frozen=True, tag=True):
    index: int
    crc: int
    data: bytes


class GetObject(msgspec.Struct, frozen=True, tag=True):
    """Stream chunks ``first .. first + count - 1`` (``count`` < 0: to the end)."""

    oid: str
    first: int = 0
    count: int = -1


class ObjectHeader(msgspec.Struct, frozen=True, tag=True):
    oid: str
    size: int
    chunk_bytes: int
    crc: int


class PutDone(msgspec.Struct, frozen=True, tag=True):
    oid: str


class DeleteObjects(msgspec.Struct, frozen=True, tag=True):
    oids: list[str]


class DataOk(msgspec.Struct, frozen=True, tag=True):
    pass


DataErrorKind = Literal["missing", "corrupt", "full", "invalid", "busy"]


class DataError(msgspec.Struct, frozen=True, tag=True):
    kind: DataErrorKind
    message: str


ObjectMessage = (
    PutObject | Chunk | GetObject | ObjectHeader | PutDone | DeleteObjects | DataOk | DataError
)
