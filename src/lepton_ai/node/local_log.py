"""``LocalLog``: the single-coordinator ``LogHost`` - the replicated log's write-ahead
log and snapshot files (``consensus/wal.py``), with one writer and no peers.

Each command is one WAL record (salted crc32c per record: see ``consensus/wal.py``).
On start the newest snapshot (if any) is restored and the WAL replayed into the
state machine; a torn tail (a crash in the middle of a write) is cut off, because
a command whose record never became whole was never acknowledged, and a corrupt
record in the middle stops the start (``WalCorruption``), as for a replica.

Commands are group-committed: ``submit`` queues the record; one flusher task
appends everything queued with one write and one fdatasync, in a thread (the
event loop keeps serving meanwhile, and new commands queue for the next batch, so
the fsync is shared), then applies the commands in order and answers each
submitter. A command whose apply raises stops the log for good, and the
coordinator with it (``run`` raises), as an apply error stops a replica: the
command is in the log, so the state that follows it can no longer be trusted.

When the WAL passes ``log_bytes_max`` the state is snapshotted (written to a
temporary file, fsynced, renamed, in a thread) and the WAL rewritten empty, so
disk use is bounded. A directory written by an earlier version (``commands.log``
and ``snapshot.bin``) is read once and carried over into these files.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from lepton_ai.consensus.log_host import StateMachine
from lepton_ai.consensus.wal import (
    WalConfig,
    WalCorruption,
    WriteAheadLog,
    load_latest_snapshot,
    write_snapshot,
)
from lepton_ai.errors import LeptonError, Unavailable
from lepton_ai.storage import checksum as crc32c

log = logging.getLogger("lepton_ai.local_log")

_LEGACY_REC = struct.Struct("<II")  # the earlier format: length, crc32c(payload)
WAL_NAME = "commands.wal"


class LogCorrupt(LeptonError):
    """The durable state failed its checksums: it cannot be trusted."""


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
        self._sm = state_machine
        self._lock = _lock_dir(self._dir)
        self._address = address
        self._pending: list[tuple[bytes, asyncio.Future[bytes]]] = []
        self._wake: asyncio.Event | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False
        self._callbacks: list[Callable[[bool], None]] = []
        self.applied = 0  # commands applied since the last snapshot (its index)
        wal_config = WalConfig(
            fsync=self.config.fsync, record_bytes_max=self.config.record_bytes_max
        )
        try:
            self.replayed = self._recover(wal_config)
        except WalCorruption as exc:
            self._lock.close()
            raise LogCorrupt(str(exc)) from exc

    # -- recovery ---------------------------------------------------------------------
    def _recover(self, wal_config: WalConfig) -> int:
        snapshot = load_latest_snapshot(self._dir)
        if snapshot is not None:
            self.applied, body = snapshot
            self._sm.restore(body)
        self._wal, payloads = WriteAheadLog.open(self._dir / WAL_NAME, wal_config)
        for payload in payloads:
            self._sm.apply(payload)
        self.applied += len(payloads)
        legacy = self._carry_over_legacy()
        return len(payloads) + legacy

    def _carry_over_legacy(self) -> int:
        """Replay an earlier version's ``snapshot.bin`` + ``commands.log`` (when this
        directory has nothing newer), snapshot the result in the current format, and
        only then remove the old files."""
        old_log, old_snap = self._dir / "commands.log", self._dir / "snapshot.bin"
        if not (old_log.exists() or old_snap.exists()):
            return 0
        if self.applied or self._wal.size_bytes > len(b"LPWAL\x00\x00\x01") + 8:
            raise LogCorrupt(f"{self._dir} holds logs of two formats; move one away")
        if old_snap.exists():
            self._sm.restore(_legacy_snapshot(old_snap))
        payloads = _legacy_records(old_log) if old_log.exists() else []
        for payload in payloads:
            self._sm.apply(payload)
        self.applied = len(payloads) + 1  # a snapshot index past every legacy command
        write_snapshot(self._dir, self.applied, self._sm.snapshot(), fsync=self.config.fsync)
        old_log.unlink(missing_ok=True)
        old_snap.unlink(missing_ok=True)
        log.warning(
            "%s: carried %d commands over from the earlier log format", self._dir, len(payloads)
        )
        return len(payloads)

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
    async def run(self) -> None:
        """Wait on the flusher until cancelled (which stops it). It raises when a write
        or an apply failed, so the task that runs this (the coordinator's task group)
        ends with the error. The flusher itself starts with the first submit."""
        flusher = self._ensure_flusher()
        await flusher

    def _ensure_flusher(self) -> asyncio.Task[None]:
        if self._flusher is None:
            self._wake = asyncio.Event()
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())
        return self._flusher

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
        commands = [command for command, _ in batch]
        try:
            # One write and one fdatasync for the batch, off the event loop.
            await asyncio.to_thread(self._wal.append, commands, sync=True)
        except OSError as exc:
            # The disk refused: nothing in this batch is durable, so nobody may
            # believe it was applied. Stop accepting commands.
            self._fail(batch, Unavailable(f"log write failed: {exc}"))
            raise
        for command, fut in batch:
            try:
                result = self._sm.apply(command)
            except Exception as exc:
                # The command is in the log: replaying it would raise again, and the
                # state after it cannot be trusted. Stop, as a replica stops.
                log.critical("applying a logged command failed: %r; stopping", exc)
                self._fail(batch, Unavailable(f"the log stopped: applying a command failed: {exc}"))
                raise
            self.applied += 1
            if not fut.done():
                fut.set_result(result)
        if self._wal.size_bytes > self.config.log_bytes_max:
            await self._compact()

    def _fail(self, batch: list[tuple[bytes, asyncio.Future[bytes]]], exc: Exception) -> None:
        self._closed = True
        for _, fut in [*batch, *self._pending]:
            if not fut.done():
                fut.set_exception(exc)
        self._pending.clear()
        for cb in self._callbacks:
            cb(False)

    async def _compact(self) -> None:
        body = self._sm.snapshot()
        index = self.applied
        # Only after the snapshot is durable may the commands it covers go.
        await asyncio.to_thread(write_snapshot, self._dir, index, body, fsync=self.config.fsync)
        await asyncio.to_thread(self._wal.rewrite, [])

    async def close(self) -> None:
        self._closed = True
        flusher, self._flusher = self._flusher, None
        if flusher is not None and not flusher.done():
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
        # A flusher that failed raised to its runner (``run``) already.
        for _, fut in self._pending:
            if not fut.done():
                fut.set_exception(Unavailable("the local log closed"))
        self._pending.clear()
        self._wal.close()
        self._lock.close()
        for cb in self._callbacks:
            cb(False)


def _legacy_snapshot(path: Path) -> bytes:
    raw = path.read_bytes()
    if len(raw) < _LEGACY_REC.size:
        raise LogCorrupt(f"{path}: truncated snapshot")
    length, crc = _LEGACY_REC.unpack_from(raw)
    body = raw[_LEGACY_REC.size :]
    if length != len(body) or crc32c.crc32c(body) != crc:
        raise LogCorrupt(f"{path}: snapshot failed its checksum")
    return body


def _legacy_records(path: Path) -> list[bytes]:
    """The earlier ``[u32 length][u32 crc32c][payload]`` records, up to a torn tail."""
    data = path.read_bytes()
    out: list[bytes] = []
    good = 0
    while good + _LEGACY_REC.size <= len(data):
        length, crc = _LEGACY_REC.unpack_from(data, good)
        start = good + _LEGACY_REC.size
        payload = data[start : start + length]
        if len(payload) != length or crc32c.crc32c(payload) != crc:
            break
        out.append(payload)
        good = start + length
    return out
