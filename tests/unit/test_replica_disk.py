"""ReplicaStorage: a Ready batch's durable part survives reopening; snapshots compact the WAL."""

from __future__ import annotations

from pathlib import Path

import pytest

from lepton_ai.consensus.core_types import InvariantError, Ready
from lepton_ai.consensus.peer_messages import KIND_COMMANDS, Entry, Snapshot, Value
from lepton_ai.consensus.replica_disk import WAL_NAME, ReplicaStorage
from lepton_ai.consensus.wal import WalCorruption


def _entry(slot: int, ballot: tuple[int, int] = (1, 1), cmd: bytes = b"c") -> Entry:
    return Entry(slot, ballot, Value(KIND_COMMANDS, ballot, (cmd + bytes([slot % 256]),)))


def test_persist_and_recover(tmp_path: Path) -> None:
    store, state = ReplicaStorage.open(tmp_path)
    assert state.promised == (0, 0) and state.entries == [] and state.snapshot is None
    store.persist(Ready(persist_ballot=(3, 2)))
    store.persist(Ready(persist_entries=[_entry(1), _entry(2)], persist_commit=1))
    store.persist(Ready(persist_entries=[_entry(2, (4, 1), b"x")], persist_commit=2))
    assert store.stats.syncs == 3
    store.close()
    store, state = ReplicaStorage.open(tmp_path)
    assert state.promised == (3, 2)
    assert state.commit == 2
    # every persisted entry in write order; the core lets the last one per slot win
    assert [e.slot for e in state.entries] == [1, 2, 2]
    assert state.entries[-1] == _entry(2, (4, 1), b"x")
    store.close()


def test_commit_only_ready_does_not_sync(tmp_path: Path) -> None:
    store, _ = ReplicaStorage.open(tmp_path)
    store.persist(Ready(persist_entries=[_entry(1)]))
    store.persist(Ready(persist_commit=1))
    assert store.stats.syncs == 1
    store.close()


def test_promised_ballot_never_goes_backwards(tmp_path: Path) -> None:
    store, _ = ReplicaStorage.open(tmp_path)
    store.persist(Ready(persist_ballot=(5, 1)))
    with pytest.raises(InvariantError):
        store.persist(Ready(persist_ballot=(4, 9)))
    store.close()


def test_snapshot_compacts_wal_and_recovers(tmp_path: Path) -> None:
    store, _ = ReplicaStorage.open(tmp_path, fsync=False)
    store.persist(Ready(persist_ballot=(2, 1)))
    store.persist(Ready(persist_entries=[_entry(s) for s in range(1, 201)], persist_commit=200))
    big = store.wal_bytes
    snap = Snapshot(150, (1, 2, 3), b"state@150")
    store.persist(Ready(persist_snapshot=snap, persist_commit=200))
    assert store.wal_bytes < big
    store.persist(Ready(persist_entries=[_entry(201)]))
    store.close()
    store, state = ReplicaStorage.open(tmp_path, fsync=False)
    assert state.snapshot == snap
    assert state.promised == (2, 1)
    assert [e.slot for e in state.entries] == list(range(151, 202))
    assert state.commit == 200
    assert store.snapshot_slot == 150
    store.close()


def test_mid_file_corruption_refuses_to_open(tmp_path: Path) -> None:
    store, _ = ReplicaStorage.open(tmp_path)
    for s in range(1, 6):
        store.persist(Ready(persist_entries=[_entry(s)]))
    store.close()
    wal = tmp_path / WAL_NAME
    data = bytearray(wal.read_bytes())
    data[40] ^= 0x55  # inside the first or second record
    wal.write_bytes(bytes(data))
    with pytest.raises(WalCorruption) as info:
        ReplicaStorage.open(tmp_path)
    assert str(wal) in str(info.value)
