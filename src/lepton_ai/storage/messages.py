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
* short-circuit put (client and node on one host, ``PutObject.local_ok``): the
  server reserves the space and answers ``PutLocal(path)``, a new empty file in
  its store's tmp directory; the client writes the whole object file there
  itself (``objects.write_object_file``: the on-disk format) and sends
  ``PutDone(oid)``; the server checks the file (size, header and table crc),
  renames it into place and answers ``PutDone`` (or ``DataError``, the
  temporary removed). ``PutLocal("")``: the server does not see one host,
  the client streams the chunks as above. A client that cannot write the file
  closes the connection (the server drops the temporary and the reservation)
  and streams on a new one. (The commit is a ``PutDone`` rather than a message
  of its own so the node's port, whose codec lists the request types it
  decodes, needs no new request type.)
* get:  client ``GetObject(oid, first, count)`` -> server ``ObjectHeader`` then
  the chunks ``first..first+count-1`` as ``Chunk`` frames, or ``DataError``.
  A chunk the server finds corrupt on disk ends the stream with ``DataError``
  (kind "corrupt"); the reader goes on from that chunk at another replica.
  With ``local_ok`` and one host, the header carries ``path`` (the object
  file) and no chunks follow: the client reads and verifies the file itself
  (HDFS's short-circuit local read) and, if that fails, asks the same server
  again without ``local_ok`` from the chunk where it stopped (so a corrupt
  replica is still found, deleted and reported by its node).
* delete: ``DeleteObjects(oids)`` -> ``PutDone``-less ``DataOk``.

Names: ``oid`` is 32 lowercase hex digits, new for every put (a key written
again gets a new object; the old one is deleted once the new one commits).
"""

from __future__ import annotations

import re
import struct
from typing import Any, Literal

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
    # The client could write the object file itself if the node is on its host.
    local_ok: bool = False


class Chunk(msgspec.Struct, frozen=True, tag=True):
    index: int
    crc: int
    data: bytes


class ChunkView(msgspec.Struct, frozen=True, tag="Chunk"):
    """A received ``Chunk`` whose ``data`` is a view into the frame (decoded without a copy)."""

    index: int
    crc: int
    data: memoryview


class GetObject(msgspec.Struct, frozen=True, tag=True):
    """Stream chunks ``first .. first + count - 1`` (``count`` < 0: to the end)."""

    oid: str
    first: int = 0
    count: int = -1
    # The client could read the object file itself if the node is on its host.
    local_ok: bool = False


class ObjectHeader(msgspec.Struct, frozen=True, tag=True):
    oid: str
    size: int
    chunk_bytes: int
    crc: int
    # Absolute path of the object file when a ``local_ok`` get is served short-circuit.
    path: str = ""


class PutLocal(msgspec.Struct, frozen=True, tag=True):
    """Answer to a ``local_ok`` put: write the object file at ``path`` ("": stream)."""

    oid: str
    path: str


class LocalWritten(msgspec.Struct, frozen=True, tag=True):
    """Client -> server after a ``PutLocal``: the file at its path is complete."""

    oid: str


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
    PutObject
    | Chunk
    | GetObject
    | ObjectHeader
    | PutLocal
    | LocalWritten
    | PutDone
    | DeleteObjects
    | DataOk
    | DataError
)

# What the data plane decodes: ``Chunk`` frames as ``ChunkView`` (no copy of the data).
ObjectWireMessage = (
    PutObject
    | ChunkView
    | GetObject
    | ObjectHeader
    | PutLocal
    | LocalWritten
    | PutDone
    | DeleteObjects
    | DataOk
    | DataError
)

_FRAME_LEN = struct.Struct(">I")
_CHUNK_ENCODER = msgspec.msgpack.Encoder()
_EMPTY_BIN = b"\xc4\x00"


def _bin_header(length: int) -> bytes:
    if length < 1 << 8:
        return b"\xc4" + bytes((length,))
    if length < 1 << 16:
        return b"\xc5" + length.to_bytes(2, "big")
    return b"\xc6" + length.to_bytes(4, "big")


def chunk_frame_head(index: int, crc: int, length: int) -> bytes:
    """The bytes of a ``Chunk(index, crc, data)`` frame before its ``length`` data bytes.

    A frame is a 4-byte length and the msgpack map of the struct; ``data`` is its
    last field, so the encoding is this head followed by the data itself: a chunk
    is sent as two writes, never copied into an encoded message and a frame.
    """
    body = _CHUNK_ENCODER.encode(Chunk(index, crc, b""))
    if not body.endswith(_EMPTY_BIN):  # pragma: no cover - msgspec's map order changed
        raise AssertionError("unexpected msgpack encoding of Chunk")
    head = body[: -len(_EMPTY_BIN)] + _bin_header(length)
    return _FRAME_LEN.pack(len(head) + length) + head


def same_host(writer: Any) -> bool:
    """True if the connection's two ends have one IP address (loopback, or a host
    talking to itself on its own address): the peer can open our files."""
    local = writer.get_extra_info("sockname")
    peer = writer.get_extra_info("peername")
    return (
        isinstance(local, tuple)
        and isinstance(peer, tuple)
        and bool(local)
        and bool(peer)
        and local[0] == peer[0]
    )
