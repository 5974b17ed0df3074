"""The node-local block store: round trips, and every kind of damage is reported, never returned."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lepton_ai.storage.blockstore import (
    BlockCorrupt,
    BlockMissing,
    BlockStore,
    ShuffleKey,
    parse_block,
)

KEY = ShuffleKey("job1", 0, 3, 1, 7)


def test_round_trip_and_block_names(tmp_path: Path) -> None:
    store = BlockStore(tmp_path)
    buckets = [b"alpha", b"", b"x" * 10_000]
    assert store.write_shuffle(KEY, buckets) == [5, 0, 10_000]
    for i, data in enumerate(buckets):
        assert store.read_bucket(KEY, i) == data
        assert store.read_block("job1", KEY.block(i)) == data
        assert parse_block("job1", KEY.block(i)) == (KEY, i)
    assert store.job_ids() == ["job1"]
    store.delete_job("job1")
    with pytest.raises(BlockMissing):
        store.read_bucket(KEY, 0)


def test_attempts_do_not_overwrite_each_other(tmp_path: Path) -> None:
    store = BlockStore(tmp_path)
    other = ShuffleKey("job1", 0, 3, 1, 8)
    store.write_shuffle(KEY, [b"first"])
    store.write_shuffle(other, [b"second"])
    assert store.read_bucket(KEY, 0) == b"first"
    assert store.read_bucket(other, 0) == b"second"


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_any_flipped_byte_is_detected(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    store = BlockStore(tmp_path_factory.mktemp("bs"))
    buckets = [b"hello world", b"second bucket", b"z" * 50]
    store.write_shuffle(KEY, buckets)
    path = store.shuffle_path(KEY)
    raw = bytearray(path.read_bytes())
    pos = data.draw(st.integers(0, len(raw) - 1))
    raw[pos] ^= data.draw(st.integers(1, 255))
    path.write_bytes(bytes(raw))
    results = []
    for i in range(len(buckets)):
        try:
            results.append(store.read_bucket(KEY, i))
        except (BlockCorrupt, ValueError):
            results.append(None)
    # A flip can spoil one bucket or the header, but never yields wrong bytes.
    assert None in results
    assert all(r is None or r == b for r, b in zip(results, buckets, strict=True))


def test_truncation_and_garbage(tmp_path: Path) -> None:
    store = BlockStore(tmp_path)
    store.write_shuffle(KEY, [b"abc", b"defgh"])
    path = store.shuffle_path(KEY)
    full = path.read_bytes()
    for cut in (0, 3, 10, len(full) - 1):
        path.write_bytes(full[:cut])
        with pytest.raises(BlockCorrupt):
            store.read_bucket(KEY, 1)
    path.write_bytes(b"NOPE" + full[4:])
    with pytest.raises(BlockCorrupt):
        store.read_bucket(KEY, 0)


def test_opaque_blocks(tmp_path: Path) -> None:
    store = BlockStore(tmp_path)
    store.put_block("job2", "result", b"payload")
    assert store.get_block("job2", "result") == b"payload"
    p = store.block_path("job2", "result")
    p.write_bytes(p.read_bytes()[:-1] + b"X")
    with pytest.raises(BlockCorrupt):
        store.get_block("job2", "result")
    with pytest.raises(BlockMissing):
        store.get_block("job2", "other")


def test_bad_input_is_rejected(tmp_path: Path) -> None:
    store = BlockStore(tmp_path)
    with pytest.raises(ValueError):
        ShuffleKey("../etc", 0, 0, 0, 0)
    with pytest.raises(ValueError):
        ShuffleKey("job", -1, 0, 0, 0)
    with pytest.raises(ValueError):
        store.write_shuffle(KEY, [])
    with pytest.raises(TypeError):
        store.write_shuffle(KEY, ["text"])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        parse_block("job", "../../x:1")
    store.write_shuffle(KEY, [b"a"])
    with pytest.raises(ValueError):
        store.read_bucket(KEY, 5)
    assert not list(tmp_path.glob("**/*.tmp"))
