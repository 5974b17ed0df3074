"""A replica's durable state on disk: the WAL plus snapshot files, in one data directory.

``ReplicaStorage.open(dir)`` recovers a ``DurableState`` for the core; ``persist(ready)``
writes a Ready batch's durable part (promised ballot, accepted entries, snapshot,
commit hint) with one fdatasync (group commit), which the driver calls *before*
any of that batch's messages leave.

Layout of ``dir``::

    wal.log                        records: Promised | Accepted entries | Commit hint
    snapshot-<slot>.snap           the newest state-machine snapshot (atomic rename)

When the core hands over a new snapshot, the snapshot file is written first
(tmp + fsync + rename + dir fsync), then the WAL is rewritten atomically with only
what the snapshot does not cover, so a crash between the two steps leaves a WAL
whose extra entries are simply ignored on recovery.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from lepton_ai.consensus.core_types import DurableState, InvariantError, Ready
from lepton_ai.consensus.peer_messages import ZERO_BALLOT, Ballot, Entry, Snapshot
from lepton_ai.consensus.wal import (
    WalConfig,
    WalCorruption,
    WriteAheadLog,
    load_latest_snapshot,
    write_snapshot,
)
from lepton_ai.monitor.metrics import CONSENSUS_BUCKETS_S, Histo

WAL_NAME = "wal.log"
# Zero-filled room the WAL keeps ahead of its end when it fsyncs: an fdatasync then
# needs no inode write (see lepton_ai.consensus.wal). 1 MiB is ~10,000 single-command
# records; growing it costs one zero write + one fdatasync per MiB of log.
WAL_PREALLOCATE_BYTES = 1 << 20


class _Promised(msgspec.Struct, tag="p", array_like=True):
    ballot: Ballot


class _Accepted(msgspec.Struct, tag="a", array_like=True):
    entry: Entry


class _Commit(msgspec.Struct, tag="c", array_like=True):
    commit: int


_Record = _Promised | _Accepted | _Commit
_encoder = msgspec.msgpack.Encoder()
_record_decoder: msgspec.msgpack.Decoder[_Record] = msgspec.msgpack.Decoder(_Record)
_snapshot_decoder: msgspec.msgpack.Decoder[Snapshot] = msgspec.msgpack.Decoder(Snapshot)


@dataclass
class StorageStats:
    syncs: int = 0
    records: int = 0
    snapshots: int = 0
    # The time of each append that synced (for the /metrics fsync histogram).
    sync_seconds: Histo = field(default_factory=lambda: Histo(CONSENSUS_BUCKETS_S))


class ReplicaStorage:
    """Durable state of one replica. Not thread-safe; owned by the replica's driver."""

    def __init__(self, directory: Path, wal: WriteAheadLog, state: DurableState, fsync: bool):
        self.directory = directory
        self._wal = wal
        self._fsync = fsync
        self._promised = state.promised
        self._commit = state.commit
        self._snapshot_slot = state.snapshot.slot if state.snapshot else 0
        # Live entries above the snapshot (last write per slot wins): rewritten into the
        # fresh WAL at each compaction.
        self._entries: dict[int, Entry] = {}
        for entry in state.entries:
            if entry.slot > self._snapshot_slot:
                self._entries[entry.slot] = entry
        self.stats = StorageStats()

    @classmethod
    def open(cls, directory: Path, *, fsync: bool = True) -> tuple[ReplicaStorage, DurableState]:
        """Recover (or create) the data directory. Raises ``WalCorruption`` on real damage."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        snapshot: Snapshot | None = None
        found = load_latest_snapshot(directory)
        if found is not None:
            try:
                snapshot = _snapshot_decoder.decode(found[1])
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise WalCorruption(directory, 0, f"undecodable snapshot: {exc}") from exc
        wal_path = directory / WAL_NAME
        wal_config = WalConfig(fsync=fsync, preallocate_bytes=WAL_PREALLOCATE_BYTES if fsync else 0)
        wal, payloads = WriteAheadLog.open(wal_path, wal_config)
        state = DurableState(snapshot=snapshot)
        for number, payload in enumerate(payloads):
            try:
                record = _record_decoder.decode(payload)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                wal.close()
                # The CRC matched, so these bytes are what we wrote: a format bug, not disk rot.
                raise WalCorruption(wal_path, 0, f"record {number} undecodable: {exc}") from exc
            if isinstance(record, _Promised):
                state.promised = max(state.promised, record.ballot)
            elif isinstance(record, _Accepted):
                state.entries.append(record.entry)
            else:
                state.commit = max(state.commit, record.commit)
        if snapshot is not None:
            state.commit = max(state.commit, snapshot.slot)
        return cls(directory, wal, state, fsync), state

    @property
    def wal_bytes(self) -> int:
        return self._wal.size_bytes

    @property
    def snapshot_slot(self) -> int:
        return self._snapshot_slot

    def persist(self, ready: Ready) -> None:
        """Make ``ready``'s durable part survive a crash; one fdatasync if it must sync."""
        records: list[bytes] = []
        if ready.persist_ballot is not None:
            if ready.persist_ballot < self._promised:
                raise InvariantError(
                    f"promised ballot going backwards: {ready.persist_ballot} < {self._promised}"
                )
            self._promised = ready.persist_ballot
            records.append(_encoder.encode(_Promised(ready.persist_ballot)))
        for entry in ready.persist_entries:
            if entry.slot > self._snapshot_slot:
                self._entries[entry.slot] = entry
            records.append(_encoder.encode(_Accepted(entry)))
        if ready.persist_snapshot is not None:
            if records:
                self._append(records, sync=True)
                records = []
            self._install_snapshot(ready.persist_snapshot)
        if ready.persist_commit is not None and ready.persist_commit > self._commit:
            self._commit = ready.persist_commit
            records.append(_encoder.encode(_Commit(ready.persist_commit)))
        if records:
            self._append(records, sync=ready.must_sync)

    def _append(self, records: list[bytes], *, sync: bool) -> None:
        started = time.perf_counter()
        self._wal.append(records, sync=sync)
        self.stats.records += len(records)
        if sync and self._fsync:
            self.stats.syncs += 1
            self.stats.sync_seconds.observe(time.perf_counter() - started)

    def _install_snapshot(self, snapshot: Snapshot) -> None:
        if snapshot.slot <= self._snapshot_slot:
            return
        write_snapshot(self.directory, snapshot.slot, _encoder.encode(snapshot), fsync=self._fsync)
        self._snapshot_slot = snapshot.slot
        self._entries = {s: e for s, e in self._entries.items() if s > snapshot.slot}
        self._commit = max(self._commit, snapshot.slot)
        self.stats.snapshots += 1
        # Compaction: the fresh WAL holds only what the snapshot does not cover.
        records = []
        if self._promised > ZERO_BALLOT:
            records.append(_encoder.encode(_Promised(self._promised)))
        records.extend(_encoder.encode(_Accepted(e)) for _, e in sorted(self._entries.items()))
        records.append(_encoder.encode(_Commit(self._commit)))
        self._wal.rewrite(records)

    def close(self) -> None:
        self._wal.close()
