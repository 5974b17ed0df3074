"""The write-ahead log: round trips, group commit, torn tails, mid-file corruption, snapshots."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lepton_ai.consensus.wal import (
    WalConfig,
    WalCorruption,
    WriteAheadLog,
    load_latest_snapshot,
    snapshot_path,
    write_snapshot,
)

HEADER = 16  # magic + salt
REC = 8  # length + crc


def _offsets(payloads: list[bytes]) -> list[int]:
    """Start offset of each record, then the end of the file."""
    out = [HEADER]
    for p in payloads:
        out.append(out[-1] + REC + len(p))
    return out


def test_round_trip_and_reopen_appends(tmp_path: Path) -> None:
    path = tmp_path / "wal.log"
    wal, recovered = WriteAheadLog.open(path)
    assert recovered == []
    wal.append([b"a", b"bb", b"ccc"])
    wal.append([b"dddd"])
    wal.close()
    wal, recovered = WriteAheadLog.open(path)
    assert recovered == [b"a", b"bb", b"ccc", b"dddd"]
    wal.append([b"e"])
    wal.close()
    assert WriteAheadLog.open(path)[1] == [b"a", b"bb", b"ccc", b"dddd", b"e"]


def test_group_commit_is_one_sync_per_append(tmp_path: Path) -> None:
    wal, _ = WriteAheadLog.open(tmp_path / "wal.log", WalConfig(fsync=True))
    wal.append([b"x"] * 500)
    wal.append([b"y"] * 10)
    assert wal.syncs == 2
    assert wal.records_written == 510
    wal.close()
    nosync, _ = WriteAheadLog.open(tmp_path / "other.log", WalConfig(fsync=False))
    nosync.append([b"x"] * 10)
    assert nosync.syncs == 0
    nosync.close()


def test_bad_input_is_rejected_and_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "wal.log"
    wal, _ = WriteAheadLog.open(path, WalConfig(record_bytes_max=100))
    wal.append([b"ok"])
    size = path.stat().st_size
    with pytest.raises(ValueError):
        wal.append([b""])
    with pytest.raises(ValueError):
        wal.append([b"ok", b"x" * 101])
    with pytest.raises(TypeError):
        wal.append(["text"])  # type: ignore[list-item]
    assert path.stat().st_size == size
    wal.close()
    with pytest.raises(ValueError):
        WalConfig(record_bytes_max=0)


def test_torn_tail_is_truncated(tmp_path: Path) -> None:
    path = tmp_path / "wal.log"
    payloads = [b"first", b"second", b"third-record"]
    wal, _ = WriteAheadLog.open(path)
    wal.append(payloads)
    wal.close()
    offs = _offsets(payloads)
    with open(path, "r+b") as f:
        f.truncate(offs[2] + 5)  # cut the third record in half
    wal, recovered = WriteAheadLog.open(path)
    assert recovered == payloads[:2]
    assert path.stat().st_size == offs[2]
    wal.append([b"after"])
    wal.close()
    assert WriteAheadLog.open(path)[1] == [*payloads[:2], b"after"]


def test_corrupt_last_record_is_truncated(tmp_path: Path) -> None:
    path = tmp_path / "wal.log"
    payloads = [b"one", b"two", b"three"]
    wal, _ = WriteAheadLog.open(path)
    wal.append(payloads)
    wal.close()
    offs = _offsets(payloads)
    data = bytearray(path.read_bytes())
    data[offs[2] + REC + 1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert WriteAheadLog.open(path)[1] == payloads[:2]


def test_corrupt_middle_record_refuses_to_start(tmp_path: Path) -> None:
    path = tmp_path / "wal.log"
    payloads = [b"one", b"two", b"three", b"four"]
    wal, _ = WriteAheadLog.open(path)
    wal.append(payloads)
    wal.close()
    offs = _offsets(payloads)
    data = bytearray(path.read_bytes())
    data[offs[1] + REC] ^= 0x01  # flip a bit of record 2's payload
    path.write_bytes(bytes(data))
    before = path.read_bytes()
    with pytest.raises(WalCorruption) as info:
        WriteAheadLog.open(path)
    assert info.value.offset == offs[1]
    assert str(path) in str(info.value)
    assert f"offset {offs[1]}" in str(info.value)
    assert path.read_bytes() == before  # refusing to start must not "repair" anything


def test_forged_record_inside_a_payload_is_not_trusted(tmp_path: Path) -> None:
    """A payload that embeds a well-formed record (with a guessed CRC) cannot fake a valid one."""
    import struct

    import crc32c

    inner = b"forged"
    fake = struct.pack("<II", len(inner), crc32c.crc32c(inner)) + inner
    path = tmp_path / "wal.log"
    wal, _ = WriteAheadLog.open(path)
    wal.append([b"ok", b"x" * 10 + fake + b"y" * 10])
    wal.close()
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 5)  # tear the record that carries the forgery
    assert WriteAheadLog.open(path)[1] == [b"ok"]


def test_rewrite_compacts_atomically(tmp_path: Path) -> None:
    path = tmp_path / "wal.log"
    wal, _ = WriteAheadLog.open(path)
    wal.append([b"r%d" % i for i in range(100)])
    big = path.stat().st_size
    wal.rewrite([b"keep1", b"keep2"])
    wal.append([b"new"])
    wal.close()
    assert path.stat().st_size < big
    assert WriteAheadLog.open(path)[1] == [b"keep1", b"keep2", b"new"]
    assert not path.with_name("wal.log.tmp").exists()


def test_snapshots_atomic_latest_wins_and_corruption_detected(tmp_path: Path) -> None:
    assert load_latest_snapshot(tmp_path) is None
    write_snapshot(tmp_path, 10, b"state-10")
    write_snapshot(tmp_path, 25, b"state-25")
    assert load_latest_snapshot(tmp_path) == (25, b"state-25")
    assert not snapshot_path(tmp_path, 10).exists()  # older ones dropped
    # a leftover temporary file from a crash mid-write is ignored
    (tmp_path / "snapshot-00000000000000000030.snap.tmp").write_bytes(b"partial")
    assert load_latest_snapshot(tmp_path) == (25, b"state-25")
    path = snapshot_path(tmp_path, 25)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WalCorruption):
        load_latest_snapshot(tmp_path)
    with pytest.raises(ValueError):
        write_snapshot(tmp_path, -1, b"")


payload_lists = st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads=payload_lists, cut=st.integers(min_value=0, max_value=10_000))
def test_any_truncation_recovers_a_prefix(payloads: list[bytes], cut: int) -> None:
    """Cutting the file anywhere recovers exactly the records that were fully written."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "wal.log"
        wal, _ = WriteAheadLog.open(path, WalConfig(fsync=False))
        wal.append(payloads)
        wal.close()
        size = path.stat().st_size
        cut = cut % (size + 1)
        os.truncate(path, cut)
        wal, recovered = WriteAheadLog.open(path, WalConfig(fsync=False))
        wal.close()
        complete = sum(1 for end in _offsets(payloads)[1:] if end <= cut)
        assert recovered == payloads[:complete]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads=payload_lists, where=st.integers(min_value=0), bit=st.integers(0, 7))
def test_any_bit_flip_is_detected(payloads: list[bytes], where: int, bit: int) -> None:
    """A flipped bit never yields wrong data: a prefix survives (tail) or start is refused."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "wal.log"
        wal, _ = WriteAheadLog.open(path, WalConfig(fsync=False))
        wal.append(payloads)
        wal.close()
        data = bytearray(path.read_bytes())
        pos = HEADER + where % (len(data) - HEADER)
        data[pos] ^= 1 << bit
        path.write_bytes(bytes(data))
        offs = _offsets(payloads)
        damaged = max(i for i, start in enumerate(offs[:-1]) if start <= pos)
        try:
            wal, recovered = WriteAheadLog.open(path, WalConfig(fsync=False))
        except WalCorruption as exc:
            assert damaged < len(payloads) - 1  # only a mid-file record may refuse
            assert exc.offset == offs[damaged]
            return
        wal.close()
        assert recovered == payloads[:damaged]
        # Opened, so the flip was taken for a torn tail: only the last record may be
        # dropped that way; a damaged record with intact ones after it must refuse.
        assert damaged == len(payloads) - 1, (damaged, len(payloads))
