"""A node's durable object files: one checksummed file per stored object.

Layout under the store's root::

    objects/<oid[:2]>/<oid>.obj     committed objects
    tmp/<oid>.<pid>.<seq>.tmp       puts in progress (pid: executors write here too)

An object file is a header, the per-chunk crc32c table, a crc32c of header and
table, then the data::

    magic "LOBJ" | version | size | chunk_bytes | whole crc32c | chunk count
    crc32c of chunk 0 .. n-1
    crc32c(header + table)
    data

A put declares its size up front, so the data offset is known when it begins:
chunks are written in place as they arrive and the header and table (kept in
memory: 4 bytes a chunk) are written last. The file appears under its final
name only by an atomic rename after everything is written (and fsynced, when
configured), so a reader never sees a partial object. Every read verifies the
header and each chunk it returns; damage is ``ObjectCorrupt``, never bytes.

Space is accounted, not discovered: committed files (scanned at start) plus the
space reserved by puts in progress must stay within the capacity, checked when
a put begins, so a put that cannot fit is refused with ``StorageFull`` before a
byte is written and nothing already stored is touched.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
import struct
import sys
import threading
import time
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from lepton_ai.errors import LeptonError, LimitExceeded, StorageFull
from lepton_ai.storage import checksum as crc32c
from lepton_ai.storage.blockstore import BlockCorrupt, BlockMissing
from lepton_ai.storage.messages import CHUNK_BYTES_MAX, check_oid, chunk_count

_MAGIC = b"LOBJ"
_VERSION = 1
# magic, version, size, chunk_bytes, whole-object crc32c, chunk count
_HEAD = struct.Struct("<4sB3xQIIQ")
_CRC = struct.Struct("<I")
_SUFFIX = ".obj"
_CRC_MAX = 0xFFFFFFFF


class ObjectMissing(BlockMissing):
    """The object is not stored on this node."""


class ObjectCorrupt(BlockCorrupt):
    """A stored object failed a checksum or is structurally broken."""


class ChunkCorrupt(BlockCorrupt):
    """Incoming data of a put does not match the crc32c it was sent with."""


class ObjectConflict(LeptonError, ValueError):
    """A put's oid is already stored with different content (oids are never reused)."""


@dataclass(frozen=True)
class ObjectStoreConfig:
    """Limits of one node's object store."""

    # 0: the cap is the store's files at start plus the filesystem's free space
    # then, minus ``reserve_bytes`` (room for logs, shuffle files, the OS).
    capacity_bytes: int = 0
    reserve_bytes: int = 256 << 20
    objects_max: int = 1_000_000
    # Largest chunk a put may declare, and most chunks per object: the chunk crc
    # table (4 bytes a chunk) is held in memory while writing and reading.
    chunk_bytes_max: int = CHUNK_BYTES_MAX
    object_chunks_max: int = 1 << 22
    # fsync the file, then its directory, before a put counts as committed.
    fsync: bool = True
    # Temporaries older than this at start belong to dead writers: removed.
    tmp_max_age_s: float = 3600.0
    # Count the files already stored at start (a node agent's store). A
    # writer-only store (an executor's) may skip the scan of up to
    # ``objects_max`` files: it then accounts only its own puts.
    scan_at_start: bool = True


def _data_offset(chunks: int) -> int:
    return _HEAD.size + _CRC.size * chunks + _CRC.size


def file_bytes(size: int, chunk_bytes: int) -> int:
    """Bytes on disk of an object of ``size`` bytes in chunks of ``chunk_bytes``."""
    return _data_offset(chunk_count(size, chunk_bytes)) + size


def _table_bytes(table: array[int]) -> bytes:
    if sys.byteorder == "big":  # the file format is little-endian
        table = array("I", table)
        table.byteswap()
    return table.tobytes()


def _encode_header(size: int, chunk_bytes: int, crc: int, table: array[int]) -> bytes:
    head = _HEAD.pack(_MAGIC, _VERSION, size, chunk_bytes, crc, len(table)) + _table_bytes(table)
    return head + _CRC.pack(crc32c.crc32c(head))


def _pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ObjectReader:
    """An open, header-verified object; ``read_chunk`` verifies each chunk it returns.

    Reads use ``pread``, so one reader may serve several threads at once.
    """

    def __init__(self, oid: str, path: Path, config: ObjectStoreConfig) -> None:
        self.oid = oid
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise ObjectMissing(f"object {oid} is not stored here") from None
        try:
            self._read_header(config)
        except BaseException:
            os.close(self._fd)
            raise

    def _read_header(self, config: ObjectStoreConfig) -> None:
        head = os.pread(self._fd, _HEAD.size, 0)
        if len(head) != _HEAD.size:
            raise ObjectCorrupt(f"object {self.oid}: truncated header")
        magic, version, size, chunk_bytes, crc, count = _HEAD.unpack(head)
        if magic != _MAGIC or version != _VERSION:
            raise ObjectCorrupt(f"object {self.oid}: bad magic or version")
        if not 0 < chunk_bytes <= config.chunk_bytes_max or count > config.object_chunks_max:
            raise ObjectCorrupt(f"object {self.oid}: implausible chunk_bytes or chunk count")
        if count != chunk_count(size, chunk_bytes):
            raise ObjectCorrupt(f"object {self.oid}: chunk count does not match the size")
        rest = os.pread(self._fd, _CRC.size * (count + 1), _HEAD.size)
        if len(rest) != _CRC.size * (count + 1):
            raise ObjectCorrupt(f"object {self.oid}: truncated chunk table")
        (header_crc,) = _CRC.unpack_from(rest, _CRC.size * count)
        if crc32c.crc32c(rest[: _CRC.size * count], crc32c.crc32c(head)) != header_crc:
            raise ObjectCorrupt(f"object {self.oid}: header failed its checksum")
        self.file_bytes = os.fstat(self._fd).st_size
        if self.file_bytes != _data_offset(count) + size:
            raise ObjectCorrupt(
                f"object {self.oid}: file is {self.file_bytes} bytes, not a whole object"
            )
        table = array("I")
        table.frombytes(rest[: _CRC.size * count])
        if sys.byteorder == "big":
            table.byteswap()
        self.size: int = size
        self.chunk_bytes: int = chunk_bytes
        self.crc: int = crc
        self.chunks: int = count
        self.table = table
        self._offset = _data_offset(count)

    def chunk_length(self, index: int) -> int:
        if not 0 <= index < self.chunks:
            raise ValueError(f"chunk {index} out of range 0..{self.chunks - 1}")
        return min(self.chunk_bytes, self.size - index * self.chunk_bytes)

    def read_chunk(self, index: int) -> tuple[int, bytes]:
        """(crc32c, data) of chunk ``index``; ``ObjectCorrupt`` if it fails its checksum."""
        length = self.chunk_length(index)
        data = os.pread(self._fd, length, self._offset + index * self.chunk_bytes)
        if len(data) != length:
            raise ObjectCorrupt(f"object {self.oid}: chunk {index} truncated")
        crc = self.table[index]
        if crc32c.crc32c(data) != crc:
            raise ObjectCorrupt(f"object {self.oid}: chunk {index} failed its checksum")
        return crc, data

    def read_span(self, first: int, stop: int) -> tuple[bytes, int]:
        """Chunks ``first .. stop - 1`` read at once (one copy, into the result), and how
        many of them, from ``first``, are whole and pass their checksums: the data up to
        there is verified, the chunk after it is not (truncated or corrupt)."""
        if not 0 <= first <= stop <= self.chunks:
            raise ValueError(f"chunks {first}..{stop} outside 0..{self.chunks}")
        start = first * self.chunk_bytes
        length = min(stop * self.chunk_bytes, self.size) - start
        data = os.pread(self._fd, length, self._offset + start) if length else b""
        view = memoryview(data)
        good = 0
        for index in range(first, stop):
            lo = (index - first) * self.chunk_bytes
            piece = view[lo : lo + self.chunk_length(index)]
            if len(piece) != self.chunk_length(index) or crc32c.crc32c(piece) != self.table[index]:
                break
            good += 1
        return data, good

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ObjectReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ObjectFileWriter:
    """Writes one object file at ``path`` in the on-disk format, chunk by chunk, no store.

    ``create``: make ``path`` (it must not exist); else ``path`` must be an
    existing empty regular file (a temporary a node made for a short-circuit
    put: it is never truncated nor followed if a symlink). ``verify``: check
    each chunk's crc32c against its data (off when the caller just computed it).
    ``finish`` writes the header; renaming the file into place is the caller's.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        oid: str,
        size: int,
        chunk_bytes: int,
        *,
        crc: int,
        create: bool = True,
        verify: bool = True,
    ) -> None:
        self.oid = oid
        self.size = size
        self.chunk_bytes = chunk_bytes
        self.crc = crc
        self.chunks = chunk_count(size, chunk_bytes)
        self.file_bytes = file_bytes(size, chunk_bytes)
        self.verify = verify
        self._fd = _open_for_object(path, create)
        self._table = array("I", bytes(_CRC.size * self.chunks))
        self._running_crc = 0
        self._next = 0

    @property
    def next_index(self) -> int:
        return self._next

    def write_chunk(self, index: int, crc: int, data: bytes | bytearray | memoryview) -> None:
        """Verify and write chunk ``index``: ValueError if out of order or of the wrong size."""
        if self._fd < 0:
            raise ValueError(f"put of {self.oid} has already ended")
        if index != self._next:
            raise ValueError(f"chunk {index} of {self.oid} out of order: expected {self._next}")
        if index >= self.chunks:
            raise ValueError(f"chunk {index} of {self.oid} beyond its {self.chunks} chunks")
        expect = min(self.chunk_bytes, self.size - index * self.chunk_bytes)
        if len(data) != expect:
            raise ValueError(f"chunk {index} of {self.oid} is {len(data)} bytes, not {expect}")
        if self.verify:
            if crc32c.crc32c(data) != crc:
                raise ChunkCorrupt(f"chunk {index} of {self.oid} does not match its crc32c")
            self._running_crc = crc32c.crc32c(data, self._running_crc)
        self._write(data, _data_offset(self.chunks) + index * self.chunk_bytes)
        self._table[index] = crc
        self._next += 1

    def _write(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        try:
            _pwrite_all(self._fd, data, offset)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                self._disk_full(exc)
            raise

    def _disk_full(self, exc: OSError) -> None:
        raise StorageFull(f"disk full writing object {self.oid} ({self.size} bytes)") from exc

    def finish(self, fsync: bool) -> None:
        """Check the chunks are complete, write the header, fsync if asked, close the file."""
        if self._fd < 0:
            raise ValueError(f"put of {self.oid} has already ended")
        if self._next != self.chunks:
            raise ValueError(f"put of {self.oid} ended after {self._next}/{self.chunks} chunks")
        if self.verify and self._running_crc != self.crc:
            raise ChunkCorrupt(f"object {self.oid} does not match its whole-object crc32c")
        self._write(_encode_header(self.size, self.chunk_bytes, self.crc, self._table), 0)
        if fsync:
            os.fsync(self._fd)
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _open_for_object(path: str | os.PathLike[str], create: bool) -> int:
    if create:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != 0:
            raise FileExistsError(errno.EEXIST, "not an empty regular file", os.fspath(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_object_file(
    path: str | os.PathLike[str],
    oid: str,
    data: bytes | bytearray | memoryview,
    chunk_bytes: int,
    *,
    crcs: Sequence[int],
    crc: int,
    create: bool = False,
    fsync: bool = False,
) -> None:
    """Write a whole object file (header, chunk crc table, data) at ``path`` at once.

    The writer of a short-circuit put: ``crcs`` (each chunk's crc32c) and
    ``crc`` (the whole content's) were computed from ``data`` by the caller,
    so they are not computed again. ``create``: as ``ObjectFileWriter``.
    One ``pwritev`` of the header and the caller's buffer: the data is copied
    once, by the kernel.
    """
    view = memoryview(data).cast("B")
    size = len(view)
    if len(crcs) != chunk_count(size, chunk_bytes):
        raise ValueError(f"{len(crcs)} chunk crcs for {size} bytes in chunks of {chunk_bytes}")
    header = _encode_header(size, chunk_bytes, crc, array("I", crcs))
    fd = _open_for_object(path, create)
    try:
        parts = [memoryview(header), view]
        offset = 0
        while parts:
            written = os.pwritev(fd, parts[:2], offset)
            offset += written
            while parts and written >= len(parts[0]):
                written -= len(parts[0])
                parts.pop(0)
            if parts:
                parts[0] = parts[0][written:]
        if fsync:
            os.fsync(fd)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFull(f"disk full writing object {oid} ({size} bytes)") from exc
        raise
    finally:
        os.close(fd)


class ObjectWriter(ObjectFileWriter):
    """A put in progress: chunks in order, then ``commit`` or ``abort``.

    Holds a space reservation in its store until it ends either way; as a
    context manager it aborts if the block exits without a commit. For a
    short-circuit put another process writes the file at ``tmp_path`` and
    ``commit_local`` checks and installs it.
    """

    def __init__(
        self, store: ObjectStore, oid: str, size: int, chunk_bytes: int, *, crc: int, tmp: Path
    ) -> None:
        super().__init__(tmp, oid, size, chunk_bytes, crc=crc)
        self._store = store
        self._tmp = tmp
        self._done = False
        self.fsync = store.config.fsync

    def write_chunk(self, index: int, crc: int, data: bytes | bytearray | memoryview) -> None:
        if self._done:
            raise ValueError(f"put of {self.oid} has already ended")
        super().write_chunk(index, crc, data)

    def _disk_full(self, exc: OSError) -> None:
        self.abort()
        raise StorageFull(
            f"object store {self._store.root}: disk full writing {self.oid} ({self.size} bytes)"
        ) from exc

    def commit(self) -> None:
        """Write the header, fsync if configured, and rename into place."""
        if self._done:
            raise ValueError(f"put of {self.oid} has already ended")
        try:
            self.finish(self.fsync)
            self._store._install(self)
        except BaseException:
            self.abort()
            raise
        self._done = True
        self._store._release(self)

    def commit_local(self, verify_chunks: bool = False) -> None:
        """Install the object file another process wrote at ``tmp_path`` (short-circuit put).

        Checks what a reader checks when it opens an object (magic, sizes, the
        header and table crc, the file's length) and that it is the object this
        put declared; ``verify_chunks``: also every chunk's crc32c and the whole
        object's. ``ObjectCorrupt``/``ValueError`` (and the put aborted) if not.
        """
        if self._done:
            raise ValueError(f"put of {self.oid} has already ended")
        try:
            self.close()  # ours was never written: the writer used its own descriptor
            with ObjectReader(self.oid, self._tmp, self._store.config) as r:
                if (r.size, r.chunk_bytes, r.crc) != (self.size, self.chunk_bytes, self.crc):
                    raise ValueError(
                        f"object {self.oid}: the file written holds {r.size} bytes in chunks "
                        f"of {r.chunk_bytes}, crc {r.crc:08x}; the put declared {self.size}, "
                        f"{self.chunk_bytes}, {self.crc:08x}"
                    )
                if verify_chunks:
                    whole = 0
                    for i in range(r.chunks):
                        whole = crc32c.crc32c(r.read_chunk(i)[1], whole)
                    if whole != self.crc:
                        raise ObjectCorrupt(f"object {self.oid}: whole-object crc32c differs")
                if self.fsync:
                    os.fsync(r.fileno())
            self._store._install(self)
        except BaseException:
            self.abort()
            raise
        self._done = True
        self._store._release(self)

    @property
    def tmp_path(self) -> Path:
        return self._tmp

    def abort(self) -> None:
        """Drop the temporary and the reservation; a no-op once ended."""
        if self._done:
            return
        self._done = True
        self.close()
        self._tmp.unlink(missing_ok=True)
        self._store._release(self)

    def __enter__(self) -> ObjectWriter:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.abort()


class ObjectStore:
    """The objects of one node under ``root``, with bounded, accounted space.

    Several processes may write into one root (executors put their results
    while the node agent serves them); each process's store accounts what it
    wrote itself, and learns of another's objects when it opens them,
    ``note_external`` or ``rescan``. Accounting is guarded by a lock so puts
    may run their disk I/O in threads.
    """

    def __init__(self, root: str | os.PathLike[str], config: ObjectStoreConfig | None = None):
        self.root = Path(root)
        self.config = config or ObjectStoreConfig()
        self._objects_dir = self.root / "objects"
        self._tmp_dir = self.root / "tmp"
        self._objects_dir.mkdir(parents=True, exist_ok=True)
        self._tmp_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._sizes: dict[str, int] = {}
        # Their sum, kept as they change: read at every heartbeat and every put, and a
        # node may hold a million objects.
        self._used = 0
        self._reserved = 0
        self._puts = 0
        self._seq = itertools.count()
        self._remove_stale_tmp()
        if self.config.scan_at_start:
            self.rescan()
        if self.config.capacity_bytes > 0:
            self._capacity = self.config.capacity_bytes
        else:
            st = os.statvfs(self.root)
            free = st.f_bavail * st.f_frsize
            self._capacity = max(0, self.used_bytes + free - self.config.reserve_bytes)

    # -- accounting ------------------------------------------------------------------
    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def used_bytes(self) -> int:
        """Bytes of committed object files this store knows of."""
        with self._lock:
            return self._used

    @property
    def object_count(self) -> int:
        """Committed objects this store knows of."""
        with self._lock:
            return len(self._sizes)

    @property
    def reserved_bytes(self) -> int:
        with self._lock:
            return self._reserved

    @property
    def free_bytes(self) -> int:
        with self._lock:
            return max(0, self._capacity - self._used - self._reserved)

    def rescan(self) -> None:
        """Recount the committed objects from the disk (objects other processes wrote)."""
        sizes: dict[str, int] = {}
        for shard in self._objects_dir.iterdir():
            if not shard.is_dir():
                continue
            for entry in os.scandir(shard):
                oid = entry.name.removesuffix(_SUFFIX)
                if entry.name.endswith(_SUFFIX) and entry.is_file():
                    sizes[oid] = entry.stat().st_size
        with self._lock:
            self._sizes = sizes
            self._used = sum(sizes.values())

    def note_external(self, oid: str) -> bool:
        """Account an object another process committed; False if it is not on disk."""
        try:
            size = self.path(oid).stat().st_size
        except FileNotFoundError:
            return False
        with self._lock:
            self._set_size(oid, size)
        return True

    def _set_size(self, oid: str, size: int) -> None:
        """Account ``oid`` at ``size`` bytes (the lock held)."""
        self._used += size - self._sizes.get(oid, 0)
        self._sizes[oid] = size

    def _release(self, writer: ObjectWriter) -> None:
        with self._lock:
            self._reserved -= writer.file_bytes
            self._puts -= 1

    def _reserve(self, oid: str, need: int, size: int) -> None:
        with self._lock:
            used = self._used
            if used + self._reserved + need > self._capacity:
                raise StorageFull(
                    f"object store {self.root}: no room for {oid} ({size} bytes): "
                    f"{used} used + {self._reserved} reserved of capacity {self._capacity}"
                )
            if len(self._sizes) + self._puts >= self.config.objects_max:
                raise LimitExceeded(
                    f"object store {self.root}: objects_max {self.config.objects_max} reached"
                )
            self._reserved += need
            self._puts += 1

    # -- writing ---------------------------------------------------------------------
    def path(self, oid: str) -> Path:
        check_oid(oid)
        return self._objects_dir / oid[:2] / f"{oid}{_SUFFIX}"

    def begin_put(
        self, oid: str, size: int, chunk_bytes: int, crc: int, *, fsync: bool = False
    ) -> ObjectWriter:
        """Reserve room for ``size`` bytes and start a put: ``StorageFull`` if it cannot fit.

        ``fsync``: sync this object on commit even if the store's config does not.
        """
        check_oid(oid)
        if not isinstance(size, int) or size < 0:
            raise ValueError(f"size must be a non-negative int, got {size!r}")
        if not isinstance(chunk_bytes, int) or not 0 < chunk_bytes <= self.config.chunk_bytes_max:
            raise ValueError(f"chunk_bytes must be in 1..{self.config.chunk_bytes_max}")
        if not isinstance(crc, int) or not 0 <= crc <= _CRC_MAX:
            raise ValueError(f"crc must be a 32-bit unsigned int, got {crc!r}")
        if chunk_count(size, chunk_bytes) > self.config.object_chunks_max:
            raise LimitExceeded(
                f"{size} bytes in chunks of {chunk_bytes} exceeds object_chunks_max "
                f"{self.config.object_chunks_max}"
            )
        need = file_bytes(size, chunk_bytes)
        self._reserve(oid, need, size)
        tmp = self._tmp_dir / f"{oid}.{os.getpid()}.{next(self._seq)}.tmp"
        try:
            writer = ObjectWriter(self, oid, size, chunk_bytes, crc=crc, tmp=tmp)
        except BaseException:
            with self._lock:
                self._reserved -= need
                self._puts -= 1
            raise
        writer.fsync = fsync or self.config.fsync
        return writer

    def _install(self, writer: ObjectWriter) -> None:
        """Rename a written temporary into place (called by ``ObjectWriter.commit``)."""
        final = self.path(writer.oid)
        if final.exists() and self._same_object(writer):
            # Idempotent re-put: the stored copy is verified equal; keep it.
            writer.tmp_path.unlink(missing_ok=True)
        else:
            created = not final.parent.is_dir()
            final.parent.mkdir(exist_ok=True)
            os.replace(writer.tmp_path, final)
            if writer.fsync:
                _fsync_dir(final.parent)
                if created:
                    _fsync_dir(self._objects_dir)
        with self._lock:
            self._set_size(writer.oid, writer.file_bytes)

    def _same_object(self, writer: ObjectWriter) -> bool:
        """True if the stored ``writer.oid`` holds the same content; raise if it differs."""
        try:
            with ObjectReader(writer.oid, self.path(writer.oid), self.config) as old:
                same = (old.size, old.crc, old.chunk_bytes) == (
                    writer.size,
                    writer.crc,
                    writer.chunk_bytes,
                )
        except ObjectMissing:
            return False
        except ObjectCorrupt:
            return False  # a damaged copy is replaced by the new, verified one
        if not same:
            raise ObjectConflict(f"object {writer.oid} is already stored with other content")
        return True

    def put_bytes(self, oid: str, data: bytes | bytearray | memoryview, chunk_bytes: int) -> None:
        """Store ``data`` as ``oid`` in one call (computes the crcs itself)."""
        view = memoryview(data).cast("B")
        with self.begin_put(oid, len(view), chunk_bytes, crc32c.crc32c(view)) as w:
            for i in range(w.chunks):
                piece = view[i * chunk_bytes : (i + 1) * chunk_bytes]
                w.write_chunk(i, crc32c.crc32c(piece), piece)
            w.commit()

    def put_file(self, oid: str, path: str | os.PathLike[str], chunk_bytes: int) -> None:
        """Store the file at ``path`` as ``oid``, reading it twice (crc, then copy)."""
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            crc = 0
            while piece := f.read(chunk_bytes):
                crc = crc32c.crc32c(piece, crc)
            f.seek(0)
            with self.begin_put(oid, size, chunk_bytes, crc) as w:
                for i in range(w.chunks):
                    piece = f.read(chunk_bytes)
                    w.write_chunk(i, crc32c.crc32c(piece), piece)
                w.commit()

    # -- reading ---------------------------------------------------------------------
    def has(self, oid: str) -> bool:
        return self.path(oid).is_file()

    def open_object(self, oid: str) -> ObjectReader:
        """Open and verify ``oid``'s header: ``ObjectMissing`` / ``ObjectCorrupt``."""
        reader = ObjectReader(oid, self.path(oid), self.config)
        with self._lock:
            # An object another process committed is accounted once it is seen.
            if oid not in self._sizes:
                self._set_size(oid, reader.file_bytes)
        return reader

    def read_all(self, oid: str) -> bytes:
        """The whole verified content of ``oid`` (for small objects)."""
        with self.open_object(oid) as r:
            return b"".join(r.read_chunk(i)[1] for i in range(r.chunks))

    def scrub(self, oid: str) -> bool:
        """Re-verify every chunk of ``oid``; delete it and return False if it is damaged."""
        try:
            with self.open_object(oid) as r:
                for i in range(r.chunks):
                    r.read_chunk(i)
        except ObjectCorrupt:
            self.delete(oid)
            return False
        return True

    def oids(self) -> Iterator[str]:
        """Object ids on disk (committed by any process), shard by shard."""
        for shard in sorted(self._objects_dir.iterdir()):
            if not shard.is_dir():
                continue
            for entry in os.scandir(shard):
                if entry.name.endswith(_SUFFIX):
                    yield entry.name.removesuffix(_SUFFIX)

    # -- housekeeping ----------------------------------------------------------------
    def delete(self, oid: str) -> None:
        """Remove ``oid`` and free its space; a missing object is fine."""
        self.path(oid).unlink(missing_ok=True)
        with self._lock:
            self._used -= self._sizes.pop(oid, 0)

    def _remove_stale_tmp(self) -> None:
        cutoff = time.time() - self.config.tmp_max_age_s
        for entry in os.scandir(self._tmp_dir):
            try:
                if entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
            except FileNotFoundError:
                continue  # its writer finished or another store cleaned it meanwhile
