"""The node's object store: round trips, damage is reported (never returned), space is bounded."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from lepton_ai.errors import LimitExceeded, StorageFull
from lepton_ai.storage.blockstore import BlockCorrupt, BlockMissing
from lepton_ai.storage.checksum import crc32c
from lepton_ai.storage.objects import (
    ChunkCorrupt,
    ObjectConflict,
    ObjectCorrupt,
    ObjectMissing,
    ObjectStore,
    ObjectStoreConfig,
    file_bytes,
)

CB = 4096
FAST = ObjectStoreConfig(capacity_bytes=1 << 30, fsync=False)


def oid() -> str:
    return uuid.uuid4().hex


def payload(n: int, seed: int = 0) -> bytes:
    return bytes((i * 31 + seed) & 0xFF for i in range(n)) if n < 1 << 16 else os.urandom(n)


@pytest.mark.parametrize("size", [0, 1, CB - 1, CB, CB + 1, 10 * CB, 10 * CB + 7])
def test_round_trip_sizes(tmp_path: Path, size: int) -> None:
    store = ObjectStore(tmp_path, FAST)
    o, data = oid(), payload(size)
    store.put_bytes(o, data, CB)
    assert store.has(o)
    assert store.read_all(o) == data
    with store.open_object(o) as r:
        assert (r.size, r.chunk_bytes, r.crc, r.chunks) == (size, CB, crc32c(data), -(-size // CB))
        for i in range(r.chunks):
            crc, chunk = r.read_chunk(i)
            assert chunk == data[i * CB : (i + 1) * CB]
            assert crc == crc32c(chunk)
    assert store.path(o).stat().st_size == file_bytes(size, CB)
    assert store.used_bytes == file_bytes(size, CB)
    assert list(store.oids()) == [o]
    assert store.scrub(o)


def test_64_mib_round_trip_in_1_mib_chunks(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path, FAST)
    o, data = oid(), os.urandom(64 << 20)
    store.put_bytes(o, data, 1 << 20)
    assert store.read_all(o) == data


def test_survives_restart_and_counts_existing_files(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path, FAST)
    oids = [oid() for _ in range(5)]
    for i, o in enumerate(oids):
        store.put_bytes(o, payload(1000 * i, i), CB)
    again = ObjectStore(tmp_path, FAST)
    assert sorted(again.oids()) == sorted(oids)
    assert again.used_bytes == store.used_bytes
    assert again.object_count == 5
    writer_only = ObjectStore(tmp_path, ObjectStoreConfig(fsync=False, scan_at_start=False))
    assert writer_only.used_bytes == 0 and writer_only.has(oids[1])
    assert again.read_all(oids[3]) == payload(3000, 3)


def _stored(tmp_path: Path, size: int = 5 * CB + 100) -> tuple[ObjectStore, str, bytes]:
    store = ObjectStore(tmp_path, FAST)
    o, data = oid(), payload(size)
    store.put_bytes(o, data, CB)
    return store, o, data


@pytest.mark.parametrize("where", ["magic", "size", "table", "header_crc", "data0", "data_last"])
def test_flipped_bit_is_detected_and_scrub_deletes(tmp_path: Path, where: str) -> None:
    store, o, _ = _stored(tmp_path)
    path = store.path(o)
    raw = bytearray(path.read_bytes())
    header = 32 + 4 * 6 + 4
    pos = {
        "magic": 0,
        "size": 9,
        "table": 32 + 4 * 2,
        "header_crc": header - 1,
        "data0": header + 5,
        "data_last": len(raw) - 1,
    }[where]
    raw[pos] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(ObjectCorrupt):
        store.read_all(o)
    assert isinstance(ObjectCorrupt("x"), BlockCorrupt)
    assert not store.scrub(o)
    assert not store.has(o)
    assert store.used_bytes == 0
    with pytest.raises(ObjectMissing):
        store.open_object(o)


def test_flipped_data_fails_only_its_chunk(tmp_path: Path) -> None:
    store, o, data = _stored(tmp_path)
    path = store.path(o)
    raw = bytearray(path.read_bytes())
    raw[len(raw) - len(data) + 2 * CB + 17] ^= 1
    path.write_bytes(bytes(raw))
    with store.open_object(o) as r:
        assert r.read_chunk(1)[1] == data[CB : 2 * CB]
        with pytest.raises(ObjectCorrupt, match="chunk 2"):
            r.read_chunk(2)


def test_truncated_or_extended_file_is_corrupt(tmp_path: Path) -> None:
    store, o, _ = _stored(tmp_path)
    path = store.path(o)
    full = path.read_bytes()
    for variant in (full[:0], full[:20], full[:60], full[:-1], full + b"x"):
        path.write_bytes(variant)
        with pytest.raises(ObjectCorrupt):
            store.open_object(o)


def test_missing_object(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path, FAST)
    o = oid()
    with pytest.raises(ObjectMissing):
        store.open_object(o)
    assert isinstance(ObjectMissing("x"), BlockMissing)
    assert not store.has(o)
    store.delete(o)  # missing is fine


@pytest.mark.parametrize("bad", ["", "ABCDEF" * 6, "0" * 31, "../" + "0" * 29, "g" * 32, 5])
def test_bad_oid_is_value_error(tmp_path: Path, bad: object) -> None:
    store = ObjectStore(tmp_path, FAST)
    with pytest.raises(ValueError, match="object id"):
        store.put_bytes(bad, b"x", CB)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="object id"):
        store.has(bad)  # type: ignore[arg-type]


def test_over_capacity_is_storage_full_and_keeps_what_is_stored(tmp_path: Path) -> None:
    cap = 3 * file_bytes(10 * CB, CB)
    store = ObjectStore(tmp_path, ObjectStoreConfig(capacity_bytes=cap, fsync=False))
    kept = {oid(): payload(10 * CB, i) for i in range(3)}
    for o, data in kept.items():
        store.put_bytes(o, data, CB)
    assert store.free_bytes == 0
    o = oid()
    with pytest.raises(StorageFull) as info:
        store.put_bytes(o, b"y", CB)
    text = str(info.value)
    assert str(tmp_path) in text and "1 bytes" in text and str(cap) in text
    assert not store.has(o)
    assert not list((tmp_path / "tmp").iterdir())
    assert store.reserved_bytes == 0
    for k, data in kept.items():
        assert store.read_all(k) == data
    # Deleting frees the space for the next put.
    store.delete(next(iter(kept)))
    store.put_bytes(o, payload(10 * CB), CB)
    assert store.free_bytes == 0


def test_reservation_counts_and_abort_releases(tmp_path: Path) -> None:
    cap = file_bytes(100, CB) + file_bytes(50, CB)
    store = ObjectStore(tmp_path, ObjectStoreConfig(capacity_bytes=cap, fsync=False))
    w = store.begin_put(oid(), 100, CB, crc32c(b"a" * 100))
    assert store.reserved_bytes == file_bytes(100, CB)
    with pytest.raises(StorageFull):
        store.begin_put(oid(), 51, CB, 0)
    w.write_chunk(0, crc32c(b"a" * 100), b"a" * 100)
    w.abort()
    w.abort()  # idempotent
    assert store.reserved_bytes == 0
    assert store.free_bytes == cap
    assert not list((tmp_path / "tmp").iterdir())
    # An exception inside the writer's block aborts it too.
    with pytest.raises(RuntimeError), store.begin_put(oid(), 150, CB, 0):
        raise RuntimeError("boom")
    assert store.reserved_bytes == 0


def test_put_misuse_is_refused_and_stores_nothing(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path, FAST)
    data = payload(3 * CB)
    chunks = [data[i * CB : (i + 1) * CB] for i in range(3)]
    cases = [
        ([(1, chunks[1])], ValueError, "out of order"),
        ([(0, chunks[0][:-1])], ValueError, "bytes, not"),
        ([(0, chunks[0] + b"x")], ValueError, "bytes, not"),
        ([(0, chunks[0]), (1, chunks[1])], ValueError, "after 2/3"),
    ]
    for sends, exc, match in cases:
        o = oid()
        with pytest.raises(exc, match=match), store.begin_put(o, len(data), CB, crc32c(data)) as w:
            for i, c in sends:
                w.write_chunk(i, crc32c(c), c)
            w.commit()
        assert not store.has(o)
    o = oid()
    with pytest.raises(ChunkCorrupt), store.begin_put(o, len(data), CB, crc32c(data)) as w:
        w.write_chunk(0, crc32c(chunks[0]) ^ 1, chunks[0])
    with (
        pytest.raises(ChunkCorrupt, match="whole-object"),
        store.begin_put(o, len(data), CB, 7) as w,
    ):
        for i, c in enumerate(chunks):
            w.write_chunk(i, crc32c(c), c)
        w.commit()
    assert not store.has(o)
    assert store.reserved_bytes == 0 and store.used_bytes == 0
    assert not list((tmp_path / "tmp").iterdir())
    for size, cb in ((-1, CB), (10, 0), (10, (16 << 20) + 1)):
        with pytest.raises(ValueError):
            store.begin_put(oid(), size, cb, 0)


def test_same_content_again_is_idempotent_other_content_conflicts(tmp_path: Path) -> None:
    store, o, data = _stored(tmp_path)
    used = store.used_bytes
    store.put_bytes(o, data, CB)
    assert store.used_bytes == used
    assert store.read_all(o) == data
    with pytest.raises(ObjectConflict):
        store.put_bytes(o, data + b"!", CB)
    assert store.read_all(o) == data
    # A damaged stored copy is replaced by a verified new one.
    path = store.path(o)
    path.write_bytes(b"garbage")
    store.put_bytes(o, data, CB)
    assert store.read_all(o) == data


def test_objects_max(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path, ObjectStoreConfig(capacity_bytes=1 << 20, objects_max=2))
    store.put_bytes(oid(), b"1", CB)
    w = store.begin_put(oid(), 1, CB, crc32c(b"2"))
    with pytest.raises(LimitExceeded, match="objects_max"):
        store.put_bytes(oid(), b"3", CB)
    w.abort()
    store.put_bytes(oid(), b"3", CB)


def test_stale_temporaries_are_removed_at_start(tmp_path: Path) -> None:
    ObjectStore(tmp_path, FAST)
    old = tmp_path / "tmp" / f"{oid()}.999999.0.tmp"
    new = tmp_path / "tmp" / f"{oid()}.999999.1.tmp"
    old.write_bytes(b"x")
    new.write_bytes(b"y")
    past = time.time() - 7200
    os.utime(old, (past, past))
    ObjectStore(tmp_path, FAST)
    assert not old.exists()
    assert new.exists()


def test_capacity_from_free_disk_space(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path, ObjectStoreConfig(reserve_bytes=1 << 20))
    st = os.statvfs(tmp_path)
    free = st.f_bavail * st.f_frsize
    assert abs(store.capacity_bytes - (free - (1 << 20))) < 64 << 20


def test_put_file(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "s", FAST)
    src = tmp_path / "input.bin"
    data = payload(7 * CB + 3)
    src.write_bytes(data)
    o = oid()
    store.put_file(o, src, CB)
    assert store.read_all(o) == data


_WRITER = textwrap.dedent(
    """
    import sys, uuid
    from lepton_ai.storage.objects import ObjectStore, ObjectStoreConfig
    store = ObjectStore(sys.argv[1], ObjectStoreConfig(capacity_bytes=1 << 30, fsync=False))
    seed = int(sys.argv[2])
    for i in range(20):
        oid = f"{seed:02x}{i:02x}" + uuid.uuid4().hex[4:]
        store.put_bytes(oid, bytes([seed, i]) * (3000 + i), 1024)
        print(oid)
    """
)


def test_two_processes_put_into_one_store(tmp_path: Path) -> None:
    agent = ObjectStore(tmp_path, FAST)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(tmp_path), str(seed)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2)
    ]
    written: dict[str, bytes] = {}
    for seed, proc in zip((1, 2), procs, strict=True):
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        for i, o in enumerate(out.split()):
            written[o] = bytes([seed, i]) * (3000 + i)
    assert len(written) == 40
    assert agent.used_bytes == 0  # not yet seen by this process
    first = next(iter(written))
    assert agent.note_external(first)
    assert agent.used_bytes == file_bytes(len(written[first]), 1024)
    agent.rescan()
    assert agent.used_bytes == sum(file_bytes(len(d), 1024) for d in written.values())
    for o, data in written.items():
        assert agent.has(o)
        assert agent.read_all(o) == data
    assert sorted(agent.oids()) == sorted(written)
    assert not list((tmp_path / "tmp").iterdir())
