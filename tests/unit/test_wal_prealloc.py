"""WAL preallocation: a zero-filled tail is the end of the log, torn or corrupt records
inside it are still detected, and a lost (zeroed) record in the middle still refuses."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lepton_ai.consensus.core_types import Ready
from lepton_ai.consensus.peer_messages import KIND_COMMANDS, Entry, Value
from lepton_ai.consensus.replica_disk import WAL_NAME, WAL_PREALLOCATE_BYTES, ReplicaStorage
from lepton_ai.consensus.wal import WalConfig, WalCorruption, WriteAheadLog

HEADER = 16  # magic + salt
REC = 8  # length + crc
PREALLOC = 4096


def _offsets(payloads: list[bytes]) -> list[int]:
    out = [HEADER]
    for p in payloads:
        out.append(out[-1] + REC + len(p))
    return out


def _config(fsync: bool = False, prealloc: int = PREALLOC) -> WalConfig:
    return WalConfig(fsync=fsync, preallocate_bytes=prealloc)


def test_zero_tail_is_the_end_and_is_cut_on_reopen(tmp_path: Path) -> None:
    path = tmp_path / "wal.log"
    payloads = [b"a", b"bb", b"ccc"]
    wal, _ = WriteAheadLog.open(path, _config())
    wal.append(payloads)
    end = _offsets(payloads)[-1]
    assert wal.size_bytes == end
    assert path.stat().st_size == end + PREALLOC  # room ahead of the log
    assert path.read_bytes()[end:] == bytes(PREALLOC)
    wal.close()
    wal, recovered = WriteAheadLog.open(path, _config())
    assert recovered == payloads
    assert path.stat().st_size == end  # the zero tail is cut, appends preallocate anew
    wal.append([b"dddd"])
    wal.close()
    assert WriteAheadLog.open(path, _config())[1] == [*payloads, b"dddd"]


def test_appends_overwrite_preallocated_room_then_grow(tmp_path: Path) -> None:
    path = tmp_path / "wal.log"
    wal, _ = WriteAheadLog.open(path, _config(fsync=True))
    wal.append([b"x" * 100])
    assert wal.grows == 1
    size = path.stat().st_size
    for _ in range(20):  # 20 * 108 bytes fit in the 4 KiB room: no growth, no size change
        wal.append([b"y" * 100])
    assert wal.grows == 1 and path.stat().st_size == size
    assert wal.syncs == 21  # still one fdatasync per append
    wal.append([b"z" * 5000])  # larger than the room left: grows past it
    assert wal.grows == 2 and path.stat().st_size >= wal.size_bytes + PREALLOC
    wal.close()
    recovered = WriteAheadLog.open(path, _config())[1]
    assert recovered == [b"x" * 100] + [b"y" * 100] * 20 + [b"z" * 5000]


def test_torn_record_inside_the_preallocated_room_is_truncated(tmp_path: Path) -> None:
    path = tmp_path / "wal.log"
    payloads = [b"first", b"second", b"third-record"]
    wal, _ = WriteAheadLog.open(path, _config())
    wal.append(payloads)
    wal.close()
    offs = _offsets(payloads)
    data = bytearray(path.read_bytes())
    data[offs[2] + 7 : offs[3]] = bytes(offs[3] - offs[2] - 7)  # third record half on disk
    path.write_bytes(bytes(data))
    wal, recovered = WriteAheadLog.open(path, _config())
    assert recovered == payloads[:2]
    assert path.stat().st_size == offs[2]
    wal.append([b"after"])
    wal.close()
    assert WriteAheadLog.open(path, _config())[1] == [*payloads[:2], b"after"]


def test_garbage_in_the_zero_tail_is_a_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "wal.log"
    wal, _ = WriteAheadLog.open(path, _config())
    wal.append([b"one", b"two"])
    wal.close()
    data = bytearray(path.read_bytes())
    data[-100] = 0x5A  # a stray byte far into the room: no valid record follows it
    path.write_bytes(bytes(data))
    assert WriteAheadLog.open(path, _config())[1] == [b"one", b"two"]


def test_corrupt_middle_record_still_refuses_with_a_zero_tail(tmp_path: Path) -> None:
    path = tmp_path / "wal.log"
    payloads = [b"one", b"two", b"three", b"four"]
    wal, _ = WriteAheadLog.open(path, _config())
    wal.append(payloads)
    wal.close()
    offs = _offsets(payloads)
    data = bytearray(path.read_bytes())
    data[offs[1] + REC] ^= 0x01
    path.write_bytes(bytes(data))
    before = path.read_bytes()
    with pytest.raises(WalCorruption) as info:
        WriteAheadLog.open(path, _config())
    assert info.value.offset == offs[1]
    assert path.read_bytes() == before


def test_zeroed_middle_record_is_not_mistaken_for_the_end(tmp_path: Path) -> None:
    """A run of zeros with valid records after it is lost data, not the end of the log."""
    path = tmp_path / "wal.log"
    payloads = [b"one", b"two-two", b"three", b"four"]
    wal, _ = WriteAheadLog.open(path, _config())
    wal.append(payloads)
    wal.close()
    offs = _offsets(payloads)
    data = bytearray(path.read_bytes())
    data[offs[1] : offs[2]] = bytes(offs[2] - offs[1])
    path.write_bytes(bytes(data))
    with pytest.raises(WalCorruption) as info:
        WriteAheadLog.open(path, _config())
    assert info.value.offset == offs[1]


def test_a_long_zero_tail_is_scanned_quickly(tmp_path: Path) -> None:
    """Recovery must not probe every byte of megabytes of preallocated zeros."""
    path = tmp_path / "wal.log"
    wal, _ = WriteAheadLog.open(path, _config(prealloc=32 << 20))
    wal.append([b"r%d" % i for i in range(1000)])
    wal.close()
    data = bytearray(path.read_bytes())
    data[-(1 << 20)] = 1  # one stray byte 31 MiB into the room: zeros before it are skipped
    path.write_bytes(bytes(data))
    start = time.monotonic()
    recovered = WriteAheadLog.open(path, _config())[1]
    assert len(recovered) == 1000
    assert time.monotonic() - start < 3.0  # probing 31 MiB byte by byte takes ~10x longer


def test_bad_preallocate_bytes_is_rejected() -> None:
    with pytest.raises(ValueError):
        WalConfig(preallocate_bytes=-1)


def test_storage_preallocates_only_when_it_fsyncs(tmp_path: Path) -> None:
    value = Value(KIND_COMMANDS, (1, 1), (b"cmd",))
    for fsync in (True, False):
        d = tmp_path / str(fsync)
        store, _ = ReplicaStorage.open(d, fsync=fsync)
        store.persist(Ready(persist_entries=[Entry(1, (1, 1), value)]))
        logical = store.wal_bytes
        store.close()
        on_disk = (d / WAL_NAME).stat().st_size
        assert on_disk == (logical + WAL_PREALLOCATE_BYTES if fsync else logical)
        store, state = ReplicaStorage.open(d, fsync=fsync)
        assert [e.slot for e in state.entries] == [1]
        store.close()


# Each payload ends in a non-zero byte: zeroing any part of a record then breaks it.
payload_lists = st.lists(
    st.binary(min_size=0, max_size=40).map(lambda b: b + b"\x01"), min_size=1, max_size=12
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads=payload_lists, cut=st.integers(min_value=0, max_value=10_000))
def test_any_tear_into_the_zero_tail_recovers_a_prefix(payloads: list[bytes], cut: int) -> None:
    """Zeroing everything after any byte (a write that reached the disk only partly)
    recovers exactly the records that were fully written."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "wal.log"
        wal, _ = WriteAheadLog.open(path, _config())
        wal.append(payloads)
        end = wal.size_bytes
        wal.close()
        cut = HEADER + cut % (end - HEADER + 1)
        data = bytearray(path.read_bytes())
        data[cut:] = bytes(len(data) - cut)
        path.write_bytes(bytes(data))
        wal, recovered = WriteAheadLog.open(path, _config())
        wal.close()
        complete = sum(1 for stop in _offsets(payloads)[1:] if stop <= cut)
        assert recovered == payloads[:complete]
        assert os.path.getsize(path) == _offsets(payloads)[complete]
