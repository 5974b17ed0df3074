"""``cluster.storage``: the object store API of a running cluster.

    info = cluster.storage.put("models/iris.joblib", data, replicas=2)
    cluster.storage.get(key); cluster.storage.open(key); cluster.storage.stat(key)
    cluster.storage.list(prefix=""); cluster.storage.delete(key)

A put asks the leader where to write, streams the bytes in checksummed chunks to
the chosen nodes (all at once), and commits the reference through the log only
once they confirmed: a writer that dies half way leaves nothing visible. A read
streams from a live replica and goes on at another one, from the chunk where the
first failed, if a node dies or a chunk fails its checksum mid-stream.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from lepton_ai.errors import DataLost, StorageFull, Unavailable
from lepton_ai.storage.checksum import crc32c
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
)
from lepton_ai.storage.dataclient import DataClient, DataClientConfig
from lepton_ai.storage.messages import ObjectMeta
from lepton_ai.storage.meta import check_key

T = TypeVar("T")
Request = Callable[[Any, float], Any]  # one control request, ErrorReply already raised
Runner = Callable[[Coroutine[Any, Any, Any]], Any]  # run a coroutine on the client loop

TMP_INPUTS = "_tmp/inputs/"
LIST_PAGE = 1000
PUT_ATTEMPTS_MAX = 3  # placements tried when a node fails during a put
PUTS_IN_BACKGROUND_MAX = 2  # put_temp_soon writes at once
FILE_READ_BYTES = 8 << 20  # read size while checksumming a file to put


@dataclass(frozen=True)
class ObjectStat:
    """What ``put`` and ``stat`` return. ``checksum``: crc32c of the content (hex);
    ``replicas``: node ids, the ``node`` field of ``cluster.status()`` members."""

    key: str
    size: int
    checksum: str
    replicas: list[str]
    want: int
    created_at: float
    oid: str

    @classmethod
    def of(cls, meta: ObjectMeta) -> ObjectStat:
        return cls(
            meta.key,
            meta.size,
            f"{meta.crc:08x}",
            list(meta.replicas),
            meta.want,
            meta.created_at,
            meta.oid,
        )


class StorageClient:
    """The object store of one cluster (``cluster.storage``)."""

    def __init__(
        self, request: Request, run: Runner, token: str, data: DataClientConfig | None = None
    ) -> None:
        self._request = request
        self._run = run
        self._data = DataClient(token, data or DataClientConfig())
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.timeout_s = 30.0

    # -- writing ---------------------------------------------------------------------
    def put(
        self,
        key: str,
        data: bytes | bytearray | memoryview | BinaryIO | os.PathLike[str],
        replicas: int | None = None,
        *,
        if_absent: bool = False,
    ) -> ObjectStat:
        """Store ``data`` (bytes, a binary file object, or a path) under ``key``,
        replacing what was there, as ``replicas`` copies on distinct nodes (default:
        the cluster's, 2 when there are 2+ nodes). ``StorageFull`` if the nodes
        lack room (nothing is stored); ``FileExistsError`` with ``if_absent``."""
        _check_key(key)
        if replicas is not None and (not isinstance(replicas, int) or replicas < 1):
            raise ValueError(f"replicas must be an int >= 1, got {replicas!r}")
        if isinstance(data, os.PathLike):
            # Streamed from the file, a chunk at a time: its size is not bounded by memory.
            return ObjectStat.of(self._put(key, Path(data), replicas or 0, if_absent, ""))
        return ObjectStat.of(self._put(key, _as_bytes(data), replicas or 0, if_absent, ""))

    def put_temp(self, data: bytes) -> ObjectMeta:
        """Store a job input (``parallelize``) under ``_tmp/inputs/``: deleted by the
        leader once no running job reads it and its time to live is over."""
        return self._put(f"{TMP_INPUTS}{uuid.uuid4().hex}", memoryview(data), 0, False, "")

    def put_temp_soon(self, data: bytes) -> concurrent.futures.Future[ObjectMeta]:
        """``put_temp`` in the background: the caller pickles the next chunk while
        this one is written (the writes release the GIL). At most
        ``PUTS_IN_BACKGROUND_MAX`` run at once; the caller bounds how many wait."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                PUTS_IN_BACKGROUND_MAX, thread_name_prefix="lepton-put"
            )
        return self._pool.submit(self.put_temp, data)

    def _put(
        self, key: str, data: memoryview | Path, replicas: int, if_absent: bool, job: str
    ) -> ObjectMeta:
        size, crc = _size_and_crc(data)
        for _ in range(PUT_ATTEMPTS_MAX):
            place = self._control(PlaceObject(size, replicas), Placement)
            holders = self._write(place, data, crc)
            if holders:
                meta = ObjectMeta(
                    key, place.oid, size, crc, place.chunk_bytes, holders, place.want, 0.0, job
                )
                info = self._control(CommitObject(meta, if_absent), ObjectInfo)
                return info.meta
        raise Unavailable(f"no storage node accepted {key!r} in {PUT_ATTEMPTS_MAX} placements")

    def _write(self, place: Placement, data: memoryview | Path, crc: int) -> list[str]:
        """Stream to the placement's first ``want`` nodes, then its spares for those
        that failed; the node ids that confirmed (the first ``want`` of them)."""
        by_address = {t.address: t.node for t in place.targets}
        queue = [t.address for t in place.targets]
        done: list[str] = []
        full: list[str] = []
        while queue and len(done) < place.want:
            batch, queue = queue[: place.want - len(done)], queue[place.want - len(done) :]
            if isinstance(data, Path):
                ok, errors = self._run(
                    self._data.put_file(place.oid, data, batch, place.chunk_bytes)
                )
            else:
                put = self._data.put(place.oid, data, batch, place.chunk_bytes, crc=crc)
                ok, errors = self._run(put)
            done += [by_address[a] for a in ok]
            full += [a for a, e in errors.items() if isinstance(e, StorageFull)]
        if not done and full:
            raise StorageFull(f"every node placed for the object is full ({', '.join(full)})")
        return done

    # -- reading ---------------------------------------------------------------------
    def stat(self, key: str) -> ObjectStat:
        """Size, checksum and replica nodes; ``KeyError`` if there is no such object."""
        _check_key(key)
        return ObjectStat.of(self._control(StatObject(key), ObjectInfo).meta)

    def get(self, key: str) -> bytes:
        """The whole object, verified chunk by chunk; ``KeyError``, ``DataLost``."""
        _check_key(key)
        return self._read(self._control(StatObject(key), ObjectInfo))

    def fetch(self, meta: ObjectMeta) -> bytes:
        """A stored object by reference (a job's result part), from a live replica."""
        return self._read(self._control(StatObject(oid=meta.oid), ObjectInfo))

    def _read(self, info: ObjectInfo) -> bytes:
        sources = [s.address for s in info.sources]
        if not sources and info.meta.size > 0:
            raise DataLost(f"object {info.meta.key!r}: no replica is on a live node")
        data: bytes = self._run(self._data.get(info.meta.oid, sources))
        return data

    def open(self, key: str) -> ObjectFile:
        """A read-only, seekable binary file over the object, streamed in chunks."""
        _check_key(key)
        return ObjectFile(self, self._control(StatObject(key), ObjectInfo))

    def list(self, prefix: str = "") -> list[ObjectStat]:
        """Every object whose key starts with ``prefix``, sorted by key."""
        out: list[ObjectStat] = []
        after = ""
        while True:
            page = self._control(ListObjects(prefix, after, LIST_PAGE), ObjectList)
            out += [ObjectStat.of(m) for m in page.objects]
            if not page.more or not page.objects:
                return out
            after = page.objects[-1].key

    def delete(self, key: str) -> None:
        """Remove the object (its bytes go from every node); ``KeyError`` if absent."""
        _check_key(key)
        self._request(DeleteObject(key), self.timeout_s)

    def fsck(self, limit: int = 1000, *, quick: bool = False) -> StorageReport:
        """Objects short of replicas, objects lost, and every node's usage.
        ``quick``: only those with a copy on a node that is down (cheap: for polling)."""
        report: StorageReport = self._control(StorageCheck(limit, quick), StorageReport)
        return report

    def _control(self, msg: Any, want: type[T]) -> T:
        reply = self._request(msg, self.timeout_s)
        if not isinstance(reply, want):
            raise Unavailable(f"unexpected reply {type(reply).__name__} to {type(msg).__name__}")
        return reply

    def read_chunks(self, info: ObjectInfo, first: int) -> bytes:
        """Chunks from ``first`` to the end (``ObjectFile`` reads in windows of these)."""
        sources = [s.address for s in info.sources]
        data: bytes = self._run(self._data.get_range(info.meta.oid, sources, first, 1))
        return data

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._run(self._data.close())


class ObjectFile(io.RawIOBase):
    """A stored object as a read-only seekable file (what ``storage.open`` returns).

    Reads fetch whole chunks from a live replica as needed and keep only the
    current one, so memory stays at one chunk whatever the object's size.
    """

    def __init__(self, client: StorageClient, info: ObjectInfo) -> None:
        super().__init__()
        self._client = client
        self._info = info
        self.size = info.meta.size
        self._pos = 0
        self._chunk_index = -1
        self._chunk = b""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._pos >= self.size or not len(view):
            return 0
        chunk_bytes = self._info.meta.chunk_bytes
        index = self._pos // chunk_bytes
        if index != self._chunk_index:
            self._chunk = self._client.read_chunks(self._info, index)
            self._chunk_index = index
        start = self._pos - index * chunk_bytes
        n = min(len(view), len(self._chunk) - start)
        view[:n] = self._chunk[start : start + n]
        self._pos += n
        return n


def _check_key(key: object) -> None:
    """At the call, with the state machine's own rule (``storage.meta.check_key``)."""
    if not isinstance(key, str) or not key:
        raise TypeError(f"an object key is a non-empty str, got {key!r}")
    why = check_key(key)
    if why:
        raise ValueError(f"object key {key[:80]!r}: {why}")


def _size_and_crc(data: memoryview | Path) -> tuple[int, int]:
    """Size and crc32c of the bytes or of the file (read in chunks: bounded memory)."""
    if not isinstance(data, Path):
        return len(data), crc32c(data)
    crc = size = 0
    with open(data, "rb") as f:
        while block := f.read(FILE_READ_BYTES):
            crc = crc32c(block, crc)
            size += len(block)
    return size, crc


def _as_bytes(data: object) -> memoryview:
    if isinstance(data, bytes | bytearray | memoryview):
        return memoryview(data).cast("B")
    read = getattr(data, "read", None)
    if callable(read):
        raw = read()
        if not isinstance(raw, bytes | bytearray):
            raise TypeError("put() reads binary files: open it with 'rb'")
        return memoryview(raw)
    if isinstance(data, str):
        raise TypeError(
            "put() takes bytes, a binary file or a pathlib.Path; "
            "for text, pass text.encode(); for a file path, pass Path(path)"
        )
    raise TypeError(f"put() takes bytes, a binary file or a path, got {type(data).__name__}")
