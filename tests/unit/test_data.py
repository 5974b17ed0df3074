"""Data layer: stable shuffle hashing, even splits, text byte ranges, file sources."""

from __future__ import annotations

import io
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lepton_ai.data.partition import (
    bucket_of,
    check_partitions,
    split_evenly,
    stable_hash,
)
from lepton_ai.data.sources import (
    RangeSource,
    SourceLimits,
    TextSource,
    decode_lines,
    read_line_range,
    read_source,
    text_sources,
)

KEYS = [
    "",
    "a",
    "hello",
    "ünïcødé",
    b"bytes",
    0,
    1,
    -1,
    2**70,
    3.5,
    None,
    ("a", 1),
    frozenset({1, 2}),
]

_CHILD = f"""
import json, sys
from lepton_ai.data.partition import bucket_of, stable_hash
keys = {KEYS!r}
keys += [f"word{{i}}" for i in range(200)]
print(json.dumps([[stable_hash(k), bucket_of(k, 7)] for k in keys]))
"""


def test_buckets_are_identical_across_processes_with_different_hash_seeds() -> None:
    outs = []
    for seed in ("1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        outs.append(json.loads(proc.stdout))
    assert outs[0] == outs[1]
    here = [[stable_hash(k), bucket_of(k, 7)] for k in [*KEYS, *[f"word{i}" for i in range(200)]]]
    assert here == outs[0]


def test_equal_dict_keys_hash_equal() -> None:
    assert stable_hash(1) == stable_hash(1.0) == stable_hash(True)
    assert stable_hash(0) == stable_hash(False) == stable_hash(0.0)
    assert stable_hash(("a", 1)) == stable_hash(("a", 1.0))
    assert stable_hash(frozenset({1, 2})) == stable_hash(frozenset({2, 1}))
    assert stable_hash("a") != stable_hash(b"a")
    import numpy as np

    assert stable_hash(np.int64(7)) == stable_hash(7) == stable_hash(np.float32(7.0))
    assert stable_hash(np.str_("w")) == stable_hash("w")


def test_buckets_spread_keys() -> None:
    counts = [0] * 8
    for i in range(8000):
        counts[bucket_of(f"w{i}", 8)] += 1
    assert min(counts) > 800
    counts = [0] * 8
    for i in range(8000):
        counts[bucket_of(i, 8)] += 1
    assert min(counts) > 800


@given(st.one_of(st.text(), st.integers(), st.binary(), st.tuples(st.text(), st.integers())))
def test_bucket_in_range_and_deterministic(key: object) -> None:
    for n in (1, 2, 7, 64):
        b = bucket_of(key, n)
        assert 0 <= b < n and b == bucket_of(key, n)


@given(st.lists(st.integers(), max_size=50), st.integers(min_value=1, max_value=12))
def test_split_evenly_preserves_order_and_balances(items: list[int], parts: int) -> None:
    chunks = split_evenly(items, parts)
    assert len(chunks) == parts
    assert [x for c in chunks for x in c] == items
    sizes = [len(c) for c in chunks]
    assert max(sizes) - min(sizes) <= 1


def test_check_partitions_rejects_bad_values() -> None:
    with pytest.raises(ValueError):
        check_partitions(0)
    with pytest.raises(TypeError):
        check_partitions("3")
    with pytest.raises(TypeError):
        check_partitions(True)
    assert check_partitions(3) == 3


_line = st.text(alphabet=st.sampled_from("ab é\r"), max_size=8)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(_line, max_size=12),
    st.booleans(),
    st.lists(st.integers(min_value=0, max_value=200), max_size=6),
)
def test_byte_ranges_cover_every_line_exactly_once(
    lines: list[str], trailing_newline: bool, cuts: list[int]
) -> None:
    text = "\n".join(lines) + ("\n" if trailing_newline and lines else "")
    data = text.encode()
    f = io.BytesIO(data)
    points = sorted({0, len(data), *[c for c in cuts if c <= len(data)]})
    got: list[str] = []
    for start, end in itertools.pairwise(points):
        got.extend(decode_lines(read_line_range(f, start, end, chunk_bytes=3)))
    assert got == decode_lines(data)
    want = []
    for raw in io.BytesIO(data):  # Python's own line iteration is the reference
        line = raw.decode()
        want.append(line[:-2] if line.endswith("\r\n") else line.removesuffix("\n"))
    assert got == want


def test_text_sources_glob_dir_and_missing(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"part{i}.log").write_text("".join(f"line {i} {j}\n" for j in range(500)))
    (tmp_path / "empty.log").write_text("")
    srcs = text_sources(str(tmp_path / "*.log"), 10)
    assert 10 <= len(srcs) <= 13 and all(isinstance(s, TextSource) for s in srcs)
    lines = [line for s in srcs for line in read_source(s)]
    assert sorted(lines) == sorted(f"line {i} {j}" for i in range(3) for j in range(500))
    assert len(text_sources(str(tmp_path), None)) == 3  # a directory: its files
    with pytest.raises(FileNotFoundError):
        text_sources(str(tmp_path / "nope*.txt"), 2)
    with pytest.raises(FileNotFoundError):
        text_sources(str(tmp_path / "missing.txt"), 2)
    only_empty = text_sources(str(tmp_path / "empty.log"), 4)
    assert only_empty == [RangeSource(0, 0, 1)]


def test_jsonl_and_csv_records_across_splits(tmp_path: Path) -> None:
    rows = [{"id": i, "name": f"n{i}"} for i in range(300)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = [
        r for s in text_sources(str(tmp_path / "a.jsonl"), 7, fmt="jsonl") for r in read_source(s)
    ]
    assert got == rows
    (tmp_path / "b.csv").write_text("id,name\n" + "".join(f"{i},n{i}\n" for i in range(300)))
    srcs = text_sources(str(tmp_path / "b.csv"), 5, fmt="csv")
    got_csv = [r for s in srcs for r in read_source(s)]
    assert got_csv == [{"id": str(i), "name": f"n{i}"} for i in range(300)]
    raw = text_sources(str(tmp_path / "b.csv"), 3, fmt="csv", csv_header=False)
    assert next(r for s in raw for r in read_source(s)) == ["id", "name"]


def test_fsspec_url_is_read_by_executor(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("a\nb\nc\n")
    srcs = text_sources(f"file://{tmp_path}/x.txt", 2)
    assert [line for s in srcs for line in read_source(s)] == ["a", "b", "c"]


def test_inline_limit_is_enforced() -> None:
    from lepton_ai.data.sources import inline_sources

    with pytest.raises(ValueError, match="inline_bytes_max"):
        inline_sources([list(range(1000))], SourceLimits(inline_bytes_max=100))


def test_compressed_files_are_one_split_each(tmp_path: Path) -> None:
    import gzip

    with gzip.open(tmp_path / "a.log.gz", "wt") as f:
        f.write("".join(f"line {j}\n" for j in range(1000)))
    (tmp_path / "b.log").write_text("".join(f"plain {j}\n" for j in range(1000)))
    srcs = text_sources(str(tmp_path / "*.log*"), 8)
    gz = [s for s in srcs if isinstance(s, TextSource) and s.compression == "gzip"]
    assert len(gz) == 1 and len(srcs) > 2
    lines = [line for s in srcs for line in read_source(s)]
    assert sorted(lines) == sorted(
        [f"line {j}" for j in range(1000)] + [f"plain {j}" for j in range(1000)]
    )


def _write_parquet(path: Path, start: int, rows: int, row_group_size: int) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    ids = list(range(start, start + rows))
    table = pa.table(
        {
            "id": ids,
            "name": [f"n{i}" for i in ids],
            "score": [None if i % 7 == 0 else i / 2 for i in ids],
        }
    )
    pq.write_table(table, path, row_group_size=row_group_size)


def _parquet_dir(tmp_path: Path) -> Path:
    d = tmp_path / "table"
    d.mkdir()
    _write_parquet(d / "a.parquet", 0, 100, 10)  # 10 row groups
    _write_parquet(d / "b.parquet", 100, 35, 20)  # 2 row groups
    (d / "_SUCCESS").write_text("")  # a writer's marker: not data
    return d


def test_parquet_splits_by_row_groups_and_reads_every_row_once(tmp_path: Path) -> None:
    from lepton_ai.data.parquet import parquet_sources
    from lepton_ai.data.sources import ParquetSource

    d = _parquet_dir(tmp_path)
    want = [{"id": i, "name": f"n{i}", "score": None if i % 7 == 0 else i / 2} for i in range(135)]
    for partitions, n_sources in [(4, 4), (None, 2), (1, 2), (50, 12)]:
        srcs = parquet_sources(str(d), partitions)
        assert len(srcs) == n_sources, (partitions, srcs)
        assert all(isinstance(s, ParquetSource) for s in srcs)
        assert [row for s in srcs for row in read_source(s)] == want
    # 135 rows / 4 -> runs of >= 34 rows of whole row groups, never across a file
    groups = [(Path(s.url).name, s.row_groups) for s in parquet_sources(str(d), 4)]  # type: ignore[union-attr]
    assert groups == [
        ("a.parquet", [0, 1, 2, 3]),
        ("a.parquet", [4, 5, 6, 7]),
        ("a.parquet", [8, 9]),
        ("b.parquet", [0, 1]),
    ]
    url_srcs = parquet_sources(f"file://{d}/b.parquet", 2, columns=["name"])
    assert [r for s in url_srcs for r in read_source(s)] == [
        {"name": f"n{i}"} for i in range(100, 135)
    ]


def test_parquet_bad_input_fails_at_the_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lepton_ai.data.parquet import parquet_sources

    d = _parquet_dir(tmp_path)
    with pytest.raises(FileNotFoundError):
        parquet_sources(str(tmp_path / "nope" / "*.parquet"), 2)
    with pytest.raises(FileNotFoundError, match="Parquet"):
        parquet_sources(str(d / "_SUCCESS"), 2)  # only a marker file
    (tmp_path / "fake.parquet").write_text("not parquet at all")
    with pytest.raises(ValueError, match="not a readable Parquet file"):
        parquet_sources(str(tmp_path / "fake.parquet"), 2)
    with pytest.raises(ValueError, match=r"no column.*nope"):
        parquet_sources(str(d), 2, columns=["id", "nope"])
    for bad in ("id", [1], []):
        with pytest.raises(TypeError, match="columns"):
            parquet_sources(str(d), 2, columns=bad)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'lepton-ai\[parquet\]'"):
        parquet_sources(str(d), 2)
