"""Write-ahead log and snapshot files: the replica's durable memory.

A WAL file is a header (magic + a random per-file salt) followed by records::

    u32 length | u32 crc32c(salt, length, payload) | payload

The salt seeds every record's CRC, so bytes that happen to look like a record
(a user value that embeds a forged record, or leftovers of an older file) never
validate: only records written into *this* file do.

Recovery distinguishes two kinds of damage:

* a torn or corrupt **tail** (a crash in the middle of a write: nothing valid
  follows the first bad byte) is truncated away - those records were never
  acknowledged, because acknowledgement waits for the fsync that covers them;
* a corrupt record in the **middle** (valid records follow it) means the disk
  lost data that may have been acknowledged; the replica refuses to start with
  ``WalCorruption`` naming the file and offset rather than silently forgetting
  a promise or an accepted value.

Group commit: ``append`` takes many payloads and issues one ``write`` and one
``fdatasync`` for all of them.

Preallocation (``WalConfig.preallocate_bytes``): the file is extended ahead of the
log with explicitly written (and synced) zero bytes, so a record append overwrites
blocks that already exist inside the file size. Its ``fdatasync`` then has only the
data block and the disk-cache flush to do; an append that grows the file also has to
write the inode (new size) first, one more dependent device round trip on every
promise and acceptance (measured: 3 block requests per fdatasync instead of 2). The
zeros are real writes, not ``fallocate``: an unwritten extent would turn back into a
metadata update on first write. Recovery reads a run of zero bytes after the last
valid record as the end of the log (a record's length field is never zero), and
truncates it away before preallocating afresh.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import crc32c

from lepton_ai.errors import LeptonError

_MAGIC = b"LPWAL\x00\x00\x01"
_SALT_BYTES = 8
_FILE_HEADER_BYTES = len(_MAGIC) + _SALT_BYTES
_RECORD_HEADER = struct.Struct("<II")  # length, crc
_SNAP_MAGIC = b"LPSNAP\x00\x01"
_SNAP_HEADER = struct.Struct("<QQI")  # index, length, crc
_NONZERO_BYTE = re.compile(rb"[^\x00]")
_SNAP_PREFIX = "snapshot-"
_SNAP_SUFFIX = ".snap"


class WalCorruption(LeptonError):
    """A WAL or snapshot file is damaged in a way recovery must not paper over."""

    def __init__(self, path: Path, offset: int, reason: str) -> None:
        super().__init__(
            f"{path}: corrupt data at byte offset {offset} ({reason}); acknowledged data "
            "may be lost, so the replica refuses to start. Restore the file from a backup, "
            "or replace the replica: remove it from the group and add a new one with an "
            "empty data directory (an acceptor that forgot its promises must not rejoin "
            "under its old id)."
        )
        self.path = path
        self.offset = offset
        self.reason = reason


@dataclass(frozen=True)
class WalConfig:
    """Durability knobs. ``fsync=False`` trades crash safety for latency (benchmarks, tests)."""

    fsync: bool = True
    record_bytes_max: int = 64 * 1024 * 1024
    # Zero-filled room kept ahead of the log, grown in steps of this size (0: plain
    # appends). Worth it only when appends are fdatasync'ed; see the module docstring.
    preallocate_bytes: int = 0

    def __post_init__(self) -> None:
        if self.record_bytes_max <= 0:
            raise ValueError(f"record_bytes_max must be positive, got {self.record_bytes_max}")
        if self.preallocate_bytes < 0:
            raise ValueError(f"preallocate_bytes must be >= 0, got {self.preallocate_bytes}")


def _record_crc(salt: bytes, payload: bytes) -> int:
    seed = crc32c.crc32c(salt)
    seed = crc32c.crc32c(struct.pack("<I", len(payload)), value=seed)
    return int(crc32c.crc32c(payload, value=seed))


def fsync_dir(path: Path) -> None:
    """Make a rename or create inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _encode_records(salt: bytes, payloads: Iterable[bytes], bytes_max: int) -> bytes:
    parts: list[bytes] = []
    for payload in payloads:
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise TypeError(f"WAL payload must be bytes, got {type(payload).__name__}")
        data = bytes(payload)
        if not data:
            raise ValueError("WAL payload must not be empty")
        if len(data) > bytes_max:
            raise ValueError(f"WAL record of {len(data)} bytes exceeds {bytes_max}")
        parts.append(_RECORD_HEADER.pack(len(data), _record_crc(salt, data)))
        parts.append(data)
    return b"".join(parts)


def _valid_record_at(buf: bytes, salt: bytes, offset: int, bytes_max: int) -> int | None:
    """Return the end offset of a valid record starting at ``offset``, or None."""
    header_end = offset + _RECORD_HEADER.size
    if header_end > len(buf):
        return None
    length, crc = _RECORD_HEADER.unpack_from(buf, offset)
    if length == 0 or length > bytes_max or header_end + length > len(buf):
        return None
    payload = buf[header_end : header_end + length]
    if _record_crc(salt, payload) != crc:
        return None
    return int(header_end + length)


def scan_records(path: Path, buf: bytes, bytes_max: int) -> tuple[list[bytes], int, str | None]:
    """Parse a whole WAL file image.

    Returns (payloads, end of the last valid record, reason the scan stopped or
    None). Raises ``WalCorruption`` if a bad record has valid records after it.
    """
    if len(buf) < _FILE_HEADER_BYTES:
        # A crash while creating the file: nothing was ever acknowledged from it.
        return [], 0, "file header torn"
    if buf[: len(_MAGIC)] != _MAGIC:
        raise WalCorruption(path, 0, "bad magic: not a lepton WAL file")
    salt = buf[len(_MAGIC) : _FILE_HEADER_BYTES]
    payloads: list[bytes] = []
    offset = _FILE_HEADER_BYTES
    while offset < len(buf):
        end = _valid_record_at(buf, salt, offset, bytes_max)
        if end is None:
            break
        payloads.append(buf[offset + _RECORD_HEADER.size : end])
        offset = end
    if offset == len(buf):
        return payloads, offset, None
    # Past the last record: only zero bytes (preallocated room) is a clean end.
    # A record header starts with a non-zero length, so no record can start at or
    # after the last non-zero byte: the probe below stops there, not at the end of
    # a (possibly megabytes long) preallocated zero tail.
    data_end = len(buf.rstrip(b"\0")) if buf[-1:] == b"\0" else len(buf)
    if data_end <= offset:
        return payloads, offset, None
    # Something is wrong at `offset`. It is a torn tail only if no valid record
    # starts anywhere after it (the salted CRC makes a false match ~2^-32 per byte).
    # A record's little-endian length is non-zero, so a record starting at `probe` has
    # a non-zero byte in probe..probe+3: only those starts are tried (zero runs, e.g.
    # preallocated room around a stray byte, are skipped at C speed).
    next_probe = offset + 1
    for match in _NONZERO_BYTE.finditer(buf, offset + 1, data_end):
        hit = match.start()
        for probe in range(max(next_probe, hit - 3), hit + 1):
            if _valid_record_at(buf, salt, probe, bytes_max) is not None:
                raise WalCorruption(path, offset, f"valid record found later at offset {probe}")
        next_probe = hit + 1
    return payloads, offset, f"torn or corrupt tail at offset {offset}"


class WriteAheadLog:
    """An append-only file of checksummed records with group commit.

    Use ``WriteAheadLog.open`` to recover an existing file (or create a new
    one); it returns the log positioned after the last valid record together
    with every payload recovered.
    """

    def __init__(self, path: Path, fd: int, salt: bytes, size: int, config: WalConfig) -> None:
        self._path = path
        self._fd: int | None = fd
        self._salt = salt
        self._size = size  # end of the last record: where the next append goes
        self._allocated = size  # file size: _size plus preallocated zero bytes
        self._config = config
        self.records_written = 0
        self.syncs = 0
        self.grows = 0

    @classmethod
    def open(cls, path: Path, config: WalConfig | None = None) -> tuple[WriteAheadLog, list[bytes]]:
        config = config or WalConfig()
        path = Path(path)
        if not path.exists() or path.stat().st_size == 0:
            return cls._create(path, config), []
        buf = path.read_bytes()
        payloads, end, _reason = scan_records(path, buf, config.record_bytes_max)
        if end < _FILE_HEADER_BYTES:
            return cls._create(path, config), []
        fd = os.open(path, os.O_RDWR)
        if end < len(buf):
            # A torn tail, or a preallocated zero tail: cut it; appends preallocate anew.
            os.ftruncate(fd, end)
            os.fsync(fd)
        salt = buf[len(_MAGIC) : _FILE_HEADER_BYTES]
        return cls(path, fd, salt, end, config), payloads

    @classmethod
    def _create(cls, path: Path, config: WalConfig) -> WriteAheadLog:
        salt = os.urandom(_SALT_BYTES)
        _write_file_atomically(path, _MAGIC + salt, fsync=config.fsync)
        fd = os.open(path, os.O_RDWR)
        return cls(path, fd, salt, _FILE_HEADER_BYTES, config)

    @property
    def path(self) -> Path:
        return self._path

    @property
    def size_bytes(self) -> int:
        return self._size

    def append(self, payloads: Sequence[bytes], *, sync: bool = True) -> None:
        """Append ``payloads`` with one write and (if configured) one fdatasync.

        When this returns, the records survive a crash (with ``fsync=True``).
        ``sync=False`` skips the fdatasync for records that are only hints (a later
        synced append covers them).
        """
        if not payloads:
            return
        fd = self._require_open()
        data = _encode_records(self._salt, payloads, self._config.record_bytes_max)
        if self._size + len(data) > self._allocated and self._config.preallocate_bytes:
            self._grow(fd, self._size + len(data) + self._config.preallocate_bytes)
        _pwrite_all(fd, data, self._size)
        self._size += len(data)
        self._allocated = max(self._allocated, self._size)
        self.records_written += len(payloads)
        if sync and self._config.fsync:
            os.fdatasync(fd)
            self.syncs += 1

    def rewrite(self, payloads: Sequence[bytes]) -> None:
        """Atomically replace the whole log with ``payloads`` (compaction).

        Written to a temporary file, synced, renamed over the log and the
        directory synced: a crash leaves either the old or the new log intact.
        """
        self._require_open()
        salt = os.urandom(_SALT_BYTES)
        data = _MAGIC + salt + _encode_records(salt, payloads, self._config.record_bytes_max)
        _write_file_atomically(self._path, data, fsync=self._config.fsync)
        self.close()
        self._fd = os.open(self._path, os.O_RDWR)
        self._salt = salt
        self._size = len(data)
        self._allocated = len(data)

    def _grow(self, fd: int, target: int) -> None:
        """Extend the file to ``target`` bytes with written zeros, synced once here so the
        appends that follow find the file size (inode) already durable."""
        zeros = bytes(min(target - self._allocated, 1 << 20))
        offset = self._allocated
        while offset < target:
            _pwrite_all(fd, memoryview(zeros)[: target - offset], offset)
            offset += min(len(zeros), target - offset)
        if self._config.fsync:
            os.fdatasync(fd)
        self._allocated = target
        self.grows += 1

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _require_open(self) -> int:
        if self._fd is None:
            raise ValueError(f"WAL {self._path} is closed")
        return self._fd


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _write_file_atomically(path: Path, data: bytes, *, fsync: bool) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if fsync:
        fsync_dir(path.parent)


def snapshot_path(directory: Path, index: int) -> Path:
    return Path(directory) / f"{_SNAP_PREFIX}{index:020d}{_SNAP_SUFFIX}"


def write_snapshot(directory: Path, index: int, data: bytes, *, fsync: bool = True) -> Path:
    """Write a snapshot covering log entries up to ``index`` atomically, drop older ones."""
    if index < 0:
        raise ValueError(f"snapshot index must be >= 0, got {index}")
    directory = Path(directory)
    body = _SNAP_MAGIC + _SNAP_HEADER.pack(index, len(data), int(crc32c.crc32c(data))) + data
    path = snapshot_path(directory, index)
    _write_file_atomically(path, body, fsync=fsync)
    for older in _snapshot_files(directory):
        if older != path and _snapshot_index(older) < index:
            older.unlink(missing_ok=True)
    if fsync:
        fsync_dir(directory)
    return path


def _snapshot_index(path: Path) -> int:
    return int(path.name[len(_SNAP_PREFIX) : -len(_SNAP_SUFFIX)])


def _snapshot_files(directory: Path) -> list[Path]:
    files = []
    for path in Path(directory).glob(f"{_SNAP_PREFIX}*{_SNAP_SUFFIX}"):
        stem = path.name[len(_SNAP_PREFIX) : -len(_SNAP_SUFFIX)]
        if stem.isdigit():
            files.append(path)
    return sorted(files, key=_snapshot_index)


def load_latest_snapshot(directory: Path) -> tuple[int, bytes] | None:
    """Return (index, data) of the newest snapshot, or None if there is none.

    Snapshots are renamed into place only once complete, so a damaged one is
    real corruption and raises ``WalCorruption``.
    """
    files = _snapshot_files(directory)
    if not files:
        return None
    path = files[-1]
    buf = path.read_bytes()
    head = len(_SNAP_MAGIC) + _SNAP_HEADER.size
    if len(buf) < head or buf[: len(_SNAP_MAGIC)] != _SNAP_MAGIC:
        raise WalCorruption(path, 0, "bad snapshot header")
    index, length, crc = _SNAP_HEADER.unpack_from(buf, len(_SNAP_MAGIC))
    data = buf[head : head + length]
    if len(data) != length or int(crc32c.crc32c(data)) != crc:
        raise WalCorruption(path, head, "snapshot checksum mismatch")
    if index != _snapshot_index(path):
        raise WalCorruption(path, len(_SNAP_MAGIC), "snapshot index does not match its name")
    return index, data
