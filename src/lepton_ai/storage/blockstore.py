"""Node-local block store: checksummed shuffle files and opaque blocks on local disk.

A map task writes all of its hash buckets into one *shuffle file* (like Spark's
data + index pair, but in one file): a header with one index entry per bucket
(offset, length, crc32c), a crc32c over the header, then the bucket bytes. A
reducer reads only its bucket and verifies both checksums, so a torn, truncated
or bit-flipped file is reported as ``BlockCorrupt`` and a vanished one as
``BlockMissing``; the scheduler re-runs the map task that produced it.

Files are written to a temporary name and renamed into place, so a reader never
sees a half-written file under the final name. Shuffle data is not fsynced by
default: it is recomputable, and an fsync per map task would cost more than a
re-run after the rare machine crash (``fsync`` turns it on).

The attempt number is part of every name so that a speculative copy of a map
task never overwrites the file another reducer is reading.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from lepton_ai.errors import LeptonError
from lepton_ai.storage import checksum as crc32c

_MAGIC = b"LSHF"
_VERSION = 1
# magic, version, bucket count
_HEAD = struct.Struct("<4sBI")
# offset, length, crc32c of one bucket
_ENTRY = struct.Struct("<QQI")
_CRC = struct.Struct("<I")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


class BlockMissing(LeptonError):
    """A requested block or shuffle file does not exist on this node."""


class BlockCorrupt(LeptonError):
    """A block failed its checksum or is structurally broken."""


@dataclass(frozen=True)
class BlockStoreConfig:
    """Limits of one node's block store."""

    buckets_max: int = 65_536
    block_bytes_max: int = 1 << 31
    fsync: bool = False


@dataclass(frozen=True)
class ShuffleKey:
    """Names one map task attempt's output: (job, stage, map partition, epoch, attempt)."""

    job_id: str
    stage: int
    map_partition: int
    epoch: int
    attempt: int

    def __post_init__(self) -> None:
        _check_name(self.job_id, "job_id")
        for field, value in (
            ("stage", self.stage),
            ("map_partition", self.map_partition),
            ("epoch", self.epoch),
            ("attempt", self.attempt),
        ):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{field} must be a non-negative int, got {value!r}")

    @property
    def stem(self) -> str:
        return f"s{self.stage}-m{self.map_partition}-e{self.epoch}-a{self.attempt}"

    def block(self, bucket: int) -> str:
        """The name of one bucket, as carried in an ``OutputRef.block``."""
        return f"{self.stem}:{bucket}"


_BLOCK_RE = re.compile(r"^s(\d{1,9})-m(\d{1,9})-e(\d{1,18})-a(\d{1,9}):(\d{1,9})$")


def parse_block(job_id: str, block: str) -> tuple[ShuffleKey, int]:
    """Inverse of ``ShuffleKey.block``; ValueError on a name it did not make."""
    m = _BLOCK_RE.match(block) if isinstance(block, str) else None
    if m is None:
        raise ValueError(f"not a shuffle block name: {block!r}")
    stage, part, epoch, attempt, bucket = (int(g) for g in m.groups())
    return ShuffleKey(job_id, stage, part, epoch, attempt), bucket


def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in {".", ".."}:
        raise ValueError(f"{what} must match {_NAME_RE.pattern}, got {name!r}")


def encode_shuffle_file(buckets: Sequence[bytes]) -> list[bytes]:
    """Return the parts of a shuffle file holding ``buckets`` (written in order)."""
    header_len = _HEAD.size + _ENTRY.size * len(buckets) + _CRC.size
    parts = [_HEAD.pack(_MAGIC, _VERSION, len(buckets))]
    offset = header_len
    for data in buckets:
        parts.append(_ENTRY.pack(offset, len(data), crc32c.crc32c(data)))
        offset += len(data)
    header = b"".join(parts)
    return [header, _CRC.pack(crc32c.crc32c(header)), *buckets]


class BlockStore:
    """Shuffle files and small opaque blocks under one directory of a node."""

    def __init__(self, root: str | os.PathLike[str], config: BlockStoreConfig | None = None):
        self.root = Path(root)
        self.config = config or BlockStoreConfig()
        self.root.mkdir(parents=True, exist_ok=True)
        self._tmp_seq = 0

    # -- shuffle files ---------------------------------------------------------------
    def shuffle_path(self, key: ShuffleKey) -> Path:
        return self.root / key.job_id / f"{key.stem}.shf"

    def write_shuffle(self, key: ShuffleKey, buckets: Sequence[bytes]) -> list[int]:
        """Write one map attempt's buckets; return each bucket's size in bytes."""
        if not 0 < len(buckets) <= self.config.buckets_max:
            raise ValueError(
                f"bucket count must be in 1..{self.config.buckets_max}, got {len(buckets)}"
            )
        for data in buckets:
            if not isinstance(data, bytes | bytearray | memoryview):
                raise TypeError(f"buckets must be bytes, got {type(data).__name__}")
        total = sum(len(b) for b in buckets)
        if total > self.config.block_bytes_max:
            raise ValueError(f"shuffle output of {total} bytes exceeds block_bytes_max")
        self._write_atomic(self.shuffle_path(key), encode_shuffle_file(buckets))
        return [len(b) for b in buckets]

    def read_bucket(self, key: ShuffleKey, bucket: int) -> bytes:
        """Read and verify one bucket; raise ``BlockMissing`` or ``BlockCorrupt``."""
        path = self.shuffle_path(key)
        try:
            with open(path, "rb") as f:
                return _read_bucket_from(f, bucket, path)
        except FileNotFoundError:
            raise BlockMissing(f"no shuffle file {key}") from None

    def read_block(self, job_id: str, block: str) -> bytes:
        """Read one bucket by its ``OutputRef.block`` name."""
        key, bucket = parse_block(job_id, block)
        return self.read_bucket(key, bucket)

    def has_shuffle(self, key: ShuffleKey) -> bool:
        return self.shuffle_path(key).exists()

    # -- opaque blocks (job results, broadcast data) ---------------------------------
    def block_path(self, job_id: str, name: str) -> Path:
        _check_name(job_id, "job_id")
        _check_name(name, "block name")
        return self.root / job_id / f"{name}.blk"

    def put_block(self, job_id: str, name: str, data: bytes) -> None:
        if len(data) > self.config.block_bytes_max:
            raise ValueError(f"block of {len(data)} bytes exceeds block_bytes_max")
        self._write_atomic(self.block_path(job_id, name), [_CRC.pack(crc32c.crc32c(data)), data])

    def get_block(self, job_id: str, name: str) -> bytes:
        path = self.block_path(job_id, name)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise BlockMissing(f"no block {job_id}/{name}") from None
        if len(raw) < _CRC.size:
            raise BlockCorrupt(f"block {job_id}/{name} is truncated")
        (crc,) = _CRC.unpack_from(raw)
        data = raw[_CRC.size :]
        if crc32c.crc32c(data) != crc:
            raise BlockCorrupt(f"block {job_id}/{name} failed its checksum")
        return data

    # -- housekeeping ----------------------------------------------------------------
    def delete_job(self, job_id: str) -> None:
        _check_name(job_id, "job_id")
        shutil.rmtree(self.root / job_id, ignore_errors=True)

    def job_ids(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

    def _write_atomic(self, path: Path, parts: Sequence[bytes]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp_seq += 1
        # pid in the temporary name: executors of one node write into the same store.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{self._tmp_seq}.tmp")
        with open(tmp, "wb") as f:
            f.writelines(parts)
            if self.config.fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)


def _read_bucket_from(f: BinaryIO, bucket: int, path: Path) -> bytes:
    head = f.read(_HEAD.size)
    if len(head) != _HEAD.size:
        raise BlockCorrupt(f"{path.name}: truncated header")
    magic, version, count = _HEAD.unpack(head)
    if magic != _MAGIC or version != _VERSION:
        raise BlockCorrupt(f"{path.name}: bad magic or version")
    if count > BlockStoreConfig.buckets_max:
        raise BlockCorrupt(f"{path.name}: implausible bucket count {count}")
    index = f.read(_ENTRY.size * count + _CRC.size)
    if len(index) != _ENTRY.size * count + _CRC.size:
        raise BlockCorrupt(f"{path.name}: truncated index")
    (header_crc,) = _CRC.unpack_from(index, _ENTRY.size * count)
    if crc32c.crc32c(head + index[: _ENTRY.size * count]) != header_crc:
        raise BlockCorrupt(f"{path.name}: header failed its checksum")
    if not 0 <= bucket < count:
        raise ValueError(f"bucket {bucket} out of range 0..{count - 1}")
    offset, length, crc = _ENTRY.unpack_from(index, _ENTRY.size * bucket)
    f.seek(offset)
    data = f.read(length)
    if len(data) != length:
        raise BlockCorrupt(f"{path.name}: bucket {bucket} truncated")
    if crc32c.crc32c(data) != crc:
        raise BlockCorrupt(f"{path.name}: bucket {bucket} failed its checksum")
    return data
