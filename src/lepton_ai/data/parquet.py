"""Parquet input: split files by row groups on the client, read them in executors.

A row group is the smallest unit a Parquet reader can fetch on its own (each
holds its own column chunks), so partitions are runs of whole row groups of
one file, balanced by row count: the client reads only the files' footers,
and each executor reads just its row groups (through fsspec for URLs).

Items are dicts, one per row (column name -> Python value), like
``read_jsonl``; ``columns`` narrows them. pyarrow is an optional dependency
(``pip install 'lepton-ai[parquet]'``), imported only when Parquet is used.
"""

from __future__ import annotations

import importlib
import math
import posixpath
from typing import Any

from lepton_ai.data.sources import (
    ParquetSource,
    RangeSource,
    Source,
    SourceLimits,
    is_local,
    open_url,
    resolve_files,
)

INSTALL_HINT = "pip install 'lepton-ai[parquet]'"


def _pq() -> Any:
    # By name: pyarrow ships no type hints, and it is optional (mypy need not see it).
    try:
        return importlib.import_module("pyarrow.parquet")
    except ImportError as exc:
        raise ImportError(f"reading Parquet needs pyarrow: {INSTALL_HINT}") from exc


def check_columns(columns: object) -> list[str] | None:
    """``columns`` as a list of names, or None; TypeError for anything else."""
    if columns is None:
        return None
    if isinstance(columns, (str, bytes)) or not isinstance(columns, (list, tuple)):
        raise TypeError(f"columns must be a list of column names, got {type(columns).__name__}")
    if not columns or not all(isinstance(c, str) for c in columns):
        raise TypeError(f"columns must be a non-empty list of str, got {columns!r}")
    return list(columns)


def _data_files(files: list[tuple[str, int]]) -> list[str]:
    # Writers (Spark, Hive, pyarrow.dataset) leave markers like _SUCCESS, _metadata
    # and hidden .crc files next to the data: they are not row data.
    return [p for p, _ in files if not posixpath.basename(p).startswith(("_", "."))]


def _split_row_groups(rows: list[int], target: int) -> list[list[int]]:
    """Runs of consecutive row-group indexes holding about ``target`` rows each."""
    out: list[list[int]] = []
    current: list[int] = []
    count = 0
    for i, n in enumerate(rows):
        current.append(i)
        count += n
        if count >= target:
            out.append(current)
            current, count = [], 0
    if current:
        out.append(current)
    return out


def parquet_sources(
    path: str,
    partitions: int | None,
    columns: object = None,
    limits: SourceLimits | None = None,
) -> list[Source]:
    """Split the Parquet files matched by ``path`` into row-group sources.

    ``partitions`` is a target: the total row count is cut into runs of about
    ``ceil(rows / partitions)`` rows of whole row groups, never crossing a file,
    so there can be fewer partitions (a file has fewer row groups) or a few more
    (one per file boundary). None: about one per 32 MiB of files, as for text
    (``SourceLimits.text_split_bytes_default``). Raises
    FileNotFoundError when nothing matches, ValueError for a file that is not
    Parquet or lacks a requested column.
    """
    limits = limits or SourceLimits()
    if not isinstance(path, str) or not path:
        raise TypeError(f"path must be a non-empty str, got {path!r}")
    cols = check_columns(columns)
    pq = _pq()
    fs, files = resolve_files(path, limits)
    metas: list[tuple[str, list[int]]] = []
    for p in _data_files(files):
        url = p if is_local(fs) else fs.unstrip_protocol(p)
        try:
            with fs.open(p, "rb") as f:
                meta = pq.ParquetFile(f).metadata
        except Exception as exc:  # pyarrow raises ArrowInvalid & co. for a bad footer
            raise ValueError(f"{url}: not a readable Parquet file ({exc})") from exc
        if cols is not None:
            missing = sorted(set(cols) - set(meta.schema.names))
            if missing:
                raise ValueError(f"{url}: no column(s) {', '.join(missing)}")
        metas.append((url, [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]))
    if not metas:
        raise FileNotFoundError(f"no Parquet data file matches {path!r}")
    total = sum(sum(rows) for _, rows in metas)
    if partitions is None:
        size = sum(size for _, size in files)
        partitions = max(1, math.ceil(size / limits.text_split_bytes_default))
    target = max(1, math.ceil(total / partitions))
    out: list[Source] = []
    for url, rows in metas:
        out.extend(ParquetSource(url, run, cols) for run in _split_row_groups(rows, target))
    if not out:  # only empty files: one empty partition keeps the job well formed
        out.append(RangeSource(0, 0, 1))
    return out


def read_parquet_source(source: ParquetSource) -> list[Any]:
    """The rows of the source's row groups, as dicts (runs in the executor)."""
    pq = _pq()
    with open_url(source.url) as f:
        table = pq.ParquetFile(f).read_row_groups(source.row_groups, columns=source.columns)
    rows: list[Any] = table.to_pylist()
    return rows
