"""``LocalLog``: the single-coordinator ``LogHost`` - an append-only file of commands.

Each record is ``[u32 length][u32 crc32c(payload)][payload]``. On start the
snapshot (if any) is restored and the log replayed into the state machine; a
torn or corrupt tail (a crash in the middle of a write) is cut off, because a
command whose record never became whole was never acknowledged.

Commands are group-committed: ``submit`` queues the record; one flusher task
writes everything queued, fsyncs once (when ``fsync`` is on), then applies the
commands in order and answers each submitter. While an fsync runs in a thread,
new commands queue up for the next batch, so the fsync cost is shared.

When the log passes ``log_bytes_max`` the state is snapshotted (written to a
temporary file, fsynced, renamed) and the log truncated, so disk use is bounded.

The replicated log of a later issue implements the same ``LogHost`` protocol; the
coordinator cannot tell the two apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from lepton_ai.consensus.api import StateMachine
from lepton_ai.errors import LeptonError, Unavailable
from lepton_ai.storage import checksum as crc32c

_REC = struct.Struct("<II")


class LogCorrupt(LeptonError):
    """The snapshot file failed its checksum: the durable state cannot be trusted."""


@dataclass(frozen=True)
class LocalLogConfig:
    fsync: bool = True
    record_bytes_max: int = 64 << 20
    batch_records_max: int = 4096
    pending_records_max: int = 100_000
    log_bytes_max: int = 256 << 20


class LogInUse(LeptonError):
    """Another process already owns this log directory."""


def _lock_dir(directory: Path) -> BinaryIO:
    """Hold an exclusive lock on ``directory`` for as long as the process lives.

    Two coordinators appending to one log would interleave records; the lock
    (released by the kernel when the holder dies, however it dies) forbids it.
    """
    import fcntl

    f = open(directory / "LOCK", "ab")  # noqa: SIM115 - held until close()
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise LogInUse(f"{directory} is in use by another coordinator") from None
    return f


class LocalLog:
    """A ``LogHost`` over one local append-only file; always the leader of itself."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        state_machine: StateMachine,
        config: LocalLogConfig | None = None,
        address: str | None = None,
    ) -> None:
        self.config = config or LocalLogConfig()
        self._dir = Path(directory)
        self._dir.mkdir(parents=True, exist_ok=True)
        self._log_path = self._dir / "commands.log"
        self._snap_path = self._dir / "snapshot.bin"
        self._sm = state_machine
        self._lock = _lock_dir(self._dir)
        self._address = address
        self._pending: list[tuple[bytes, asyncio.Future[bytes]]] = []
        self._wake: asyncio.Event | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False
        self._callbacks: list[Callable[[bool], None]] = []
        self.applied = 0
        self.replayed = self._recover()
        self._file = open(self._log_path, "ab")  # noqa: SIM115 - lives as long as the log
        self._log_bytes = self._file.tell()

    # -- recovery ---------------------------------------------------------------------
    def _recover(self) -> int:
        if self._snap_path.exists():
            raw = self._snap_path.read_bytes()
            if len(raw) < _REC.size:
                raise LogCorrupt(f"{self._snap_path}: truncated snapshot")
            length, crc = _REC.unpack_from(raw)
            body = raw[_REC.size :]
            if length != len(body) or crc32c.crc32c(body) != crc:
                raise LogCorrupt(f"{self._snap_path}: snapshot failed its checksum")
            self._sm.restore(body)
        if not self._log_path.exists():
            return 0
        count = 0
        good = 0
        with open(self._log_path, "rb") as f:
            data = f.read()
        while good + _REC.size <= len(data):
            length, crc = _REC.unpack_from(data, good)
            start = good + _REC.size
            if length > self.config.record_bytes_max or start + length > len(data):
                break
            payload = data[start : start + length]
            if crc32c.crc32c(payload) != crc:
                break
            self._sm.apply(payload)
            count += 1
            good = start + length
        if good != len(data):
            # A torn tail: the write that made it was never acknowledged.
            with open(self._log_path, "r+b") as f:
                f.truncate(good)
        return count

    # -- LogHost ----------------------------------------------------------------------
    async def submit(self, command: bytes) -> bytes:
        if not isinstance(command, bytes):
            raise TypeError(f"command must be bytes, got {type(command).__name__}")
        if len(command) > self.config.record_bytes_max:
            raise ValueError(f"command of {len(command)} bytes exceeds record_bytes_max")
        if self._closed:
            raise Unavailable("the local log is closed")
        if len(self._pending) >= self.config.pending_records_max:
            raise Unavailable("too many commands waiting for the log")
        self._ensure_flusher()
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending.append((command, fut))
        if self._wake is None:
            raise AssertionError("flusher started without its event")
        self._wake.set()
        return await fut

    async def read_barrier(self) -> None:
        # Every submitted command is applied before its submitter resumes, and
        # this replica is the only one: local state is always current.
        return None

    @property
    def is_leader(self) -> bool:
        return not self._closed

    @property
    def leader_address(self) -> str | None:
        return self._address

    def on_leadership(self, callback: Callable[[bool], None]) -> None:
        self._callbacks.append(callback)
        callback(not self._closed)

    # -- the flusher ------------------------------------------------------------------
    def _ensure_flusher(self) -> None:
        if self._flusher is None:
            self._wake = asyncio.Event()
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    async def _flush_loop(self) -> None:
        if self._wake is None:
            raise AssertionError("flusher started without its event")
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch = self._pending[: self.config.batch_records_max]
                del self._pending[: len(batch)]
                await self._commit(batch)

    async def _commit(self, batch: list[tuple[bytes, asyncio.Future[bytes]]]) -> None:
        parts: list[bytes] = []
        for command, _ in batch:
            parts.append(_REC.pack(len(command), crc32c.crc32c(command)))
            parts.append(command)
        try:
            self._file.writelines(parts)
            self._file.flush()
            if self.config.fsync:
                await asyncio.to_thread(os.fsync, self._file.fileno())
        except OSError as exc:
            # The disk refused: nothing in this batch is durable, so nobody may
            # believe it was applied. Stop accepting commands.
            self._closed = True
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(Unavailable(f"log write failed: {exc}"))
            raise
        self._log_bytes += sum(len(p) for p in parts)
        for command, fut in batch:
            try:
                result = self._sm.apply(command)
            except Exception as exc:  # noqa: BLE001 - handed to the submitter
                if not fut.done():
                    fut.set_exception(exc)
                continue
            self.applied += 1
            if not fut.done():
                fut.set_result(result)
        if self._log_bytes > self.config.log_bytes_max:
            await self._compact()

    async def _compact(self) -> None:
        body = self._sm.snapshot()
        tmp = self._snap_path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(_REC.pack(len(body), crc32c.crc32c(body)))
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._snap_path)
        # Only after the snapshot is durable may the commands it covers go.
        self._file.truncate(0)
        self._file.seek(0)
        self._log_bytes = 0

    async def close(self) -> None:
        self._closed = True
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        for _, fut in self._pending:
            if not fut.done():
                fut.set_exception(Unavailable("the local log closed"))
        self._pending.clear()
        self._file.close()
        self._lock.close()
        for cb in self._callbacks:
            cb(False)
