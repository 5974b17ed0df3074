"""Where a partition's input comes from, and how an executor reads it.

A source is a small msgspec struct that travels inside the job plan:

* ``RangeSource`` - a sub-range of ``range(...)``: a few integers, whatever its length.
* ``InlineSource`` - pickled items (a list slice or an ndarray chunk) carried in the plan.
  Bounded by ``SourceLimits.inline_bytes_max`` for the whole job, because the plan goes
  through the coordinator's log.
* ``BlobSource`` - the same pickled chunk, stored outside the plan (when the cluster
  offers ``put_blob``, for chunks above ``SourceLimits.inline_chunk_bytes_max``): the
  plan carries only the key, and the executor fetches the bytes itself.
* ``TextSource`` - a byte range of a file (local path or fsspec URL). The executor reads
  the range itself, with Hadoop TextInputFormat's rule: a split owns exactly the lines
  whose first byte lies in ``[start, end)``, so any set of adjacent ranges covering a file
  yields every line exactly once.
* ``ParquetSource`` - whole row groups of one Parquet file (see ``data.parquet``).

``read_source`` is eager: all I/O of a task happens before user code runs, so a
failure while reading is an infrastructure failure, not a user exception.
"""

from __future__ import annotations

import csv
import json
import math
import pickle
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Literal

import msgspec

from lepton_ai.storage.messages import ObjectMeta

if TYPE_CHECKING:
    from concurrent.futures import Future

TextFormat = Literal["text", "jsonl", "csv"]


@dataclass(frozen=True)
class SourceLimits:
    """Bounds on inputs described by the client."""

    # All inline chunks of one job: the plan is one log command, and the log's
    # commands are bounded (consensus batch_bytes_max, 1 MiB); more goes to storage.
    inline_bytes_max: int = 256 * 1024
    inline_chunk_bytes_max: int = 64 * 1024  # bigger chunks go to storage
    stores_pending_max: int = 2  # chunks pickled ahead while earlier ones are stored
    text_split_bytes_default: int = 32 * 1024 * 1024  # when partitions is not given
    text_files_max: int = 100_000
    read_chunk_bytes: int = 1 << 16  # step when extending a split to its last line's end


class RangeSource(msgspec.Struct, frozen=True, tag="range"):
    start: int
    stop: int
    step: int = 1


class InlineSource(msgspec.Struct, frozen=True, tag="inline"):
    """``data`` is a pickle (protocol 5) of a list of items or of an ndarray chunk."""

    data: bytes
    count: int


class BlobSource(msgspec.Struct, frozen=True, tag="blob"):
    """A pickled chunk stored by the cluster under ``key`` (see ``JobRunner.put_blob``);
    ``obj``: the stored object (id, checksum, replicas) when the cluster stores it in
    its storage layer: the node agent brings it to the executor's node."""

    key: str
    size_bytes: int
    count: int
    obj: ObjectMeta | None = None


class TextSource(msgspec.Struct, frozen=True, tag="text"):
    """Lines of ``url`` whose first byte lies in ``[start, end)``.

    A compressed file (``compression``, e.g. ``"gzip"``, inferred from the suffix)
    cannot be split: it is one source covering the whole file.
    """

    url: str
    start: int
    end: int
    fmt: TextFormat = "text"
    csv_header: bool = True
    compression: str | None = None


class ParquetSource(msgspec.Struct, frozen=True, tag="parquet"):
    """Row groups ``row_groups`` of the Parquet file at ``url``, as one dict per row;
    ``columns``: only these (None: all)."""

    url: str
    row_groups: list[int]
    columns: list[str] | None = None


Source = RangeSource | InlineSource | BlobSource | TextSource | ParquetSource
BlobFetcher = Callable[[str], bytes]
# ``put_blob(data)``: the key, the stored object, or a future of either (stored in
# the background while the caller goes on).
BlobStorer = Callable[[bytes], "str | ObjectMeta | Future[str | ObjectMeta] | Future[ObjectMeta]"]


# ---------------------------------------------------------------- client side


def range_sources(r: range, partitions: int) -> list[Source]:
    from lepton_ai.data.partition import split_evenly

    out: list[Source] = []
    for part in split_evenly(r, partitions):
        sub = part if isinstance(part, range) else range(0)
        out.append(RangeSource(sub.start, sub.stop, sub.step))
    return out


def inline_sources(
    chunks: Sequence[Any], limits: SourceLimits, put_blob: BlobStorer | None = None
) -> list[Source]:
    """Pickle each chunk (a list or an ndarray) into the plan, or store it by reference.

    The plan goes through the coordinators' log, whose commands are bounded, so only
    small data travels inline: with ``put_blob`` (a cluster with storage), a chunk
    over ``inline_chunk_bytes_max``, or one that would take the inline total past
    ``inline_bytes_max``, is stored on the nodes and only its reference travels.
    Without ``put_blob``, ``LimitExceeded`` once the inline total passes the bound.
    """
    from lepton_ai.compute import pickling
    from lepton_ai.errors import LimitExceeded

    out: list[Source | tuple[Any, int, int]] = []
    pending: deque[Any] = deque()
    total = 0
    for chunk in chunks:
        try:
            data = pickle.dumps(chunk, protocol=5)
        except (pickle.PicklingError, TypeError, AttributeError):
            # objects of classes defined in __main__, lambdas, and the like
            data = pickling.dumps(chunk)
        big = len(data) > limits.inline_chunk_bytes_max
        if put_blob is not None and (big or total + len(data) > limits.inline_bytes_max):
            ref = put_blob(data)
            out.append((ref, len(data), len(chunk)))  # resolved below
            _wait_for_room(pending, ref, limits.stores_pending_max)
            continue
        total += len(data)
        if total > limits.inline_bytes_max:
            raise LimitExceeded(
                f"parallelize(): data is larger than inline_bytes_max="
                f"{limits.inline_bytes_max} bytes once pickled and this cluster has no "
                "storage; write it to files and use read_text()"
            )
        out.append(InlineSource(data, len(chunk)))
    return [s if not isinstance(s, tuple) else _stored(*s) for s in out]


def _wait_for_room(pending: deque[Any], ref: Any, pending_max: int) -> None:
    """Bound the pickled chunks held while they are stored in the background: at
    most ``pending_max`` unfinished stores (each holds its chunk's bytes)."""
    if hasattr(ref, "result"):
        pending.append(ref)
    while pending and pending[0].done():
        pending.popleft()
    while len(pending) > pending_max:
        pending.popleft().result()


def _stored(ref: Any, size: int, count: int) -> BlobSource:
    from concurrent.futures import Future  # here: executors import this module, not it

    if isinstance(ref, Future):
        ref = ref.result()
    if isinstance(ref, ObjectMeta):
        return BlobSource(ref.key, size, count, ref)
    return BlobSource(str(ref), size, count)


def resolve_files(path: str, limits: SourceLimits) -> tuple[Any, list[tuple[str, int]]]:
    """(filesystem, [(path, size)]) of every file matched by ``path`` (glob or directory)."""
    import fsspec

    fs, fs_path = fsspec.core.url_to_fs(path)
    if any(ch in fs_path for ch in "*?["):
        matched = sorted(fs.glob(fs_path))
    elif fs.exists(fs_path):
        matched = sorted(fs.find(fs_path)) if fs.isdir(fs_path) else [fs_path]
    else:
        matched = []
    files: list[tuple[str, int]] = []
    for p in matched:
        info = fs.info(p)
        if info.get("type") == "directory":
            continue
        if len(files) >= limits.text_files_max:
            raise ValueError(f"{path!r} matches more than {limits.text_files_max} files")
        files.append((p, int(info.get("size") or 0)))
    if not files:
        raise FileNotFoundError(f"no input file matches {path!r}")
    return fs, files


def text_sources(
    path: str,
    partitions: int | None,
    *,
    fmt: TextFormat = "text",
    csv_header: bool = True,
    limits: SourceLimits | None = None,
) -> list[Source]:
    """Split the files matched by ``path`` into byte-range sources.

    ``partitions`` is a target: the total size is cut into splits of
    ``ceil(total / partitions)`` bytes, never crossing a file, so the count can
    exceed ``partitions`` by up to the number of files. Empty files give no split.
    Raises FileNotFoundError when nothing matches.
    """
    limits = limits or SourceLimits()
    if not isinstance(path, str) or not path:
        raise TypeError(f"path must be a non-empty str, got {path!r}")
    fs, files = resolve_files(path, limits)
    total = sum(size for _, size in files)
    if partitions is None:
        partitions = max(1, math.ceil(total / limits.text_split_bytes_default))
    split_bytes = max(1, math.ceil(total / partitions))
    out: list[Source] = []
    from fsspec.utils import infer_compression

    for p, size in files:
        url = p if is_local(fs) else fs.unstrip_protocol(p)
        compression = infer_compression(p)
        if compression is not None:
            if size:
                out.append(TextSource(url, 0, size, fmt, csv_header, compression))
            continue
        for start in range(0, size, split_bytes):
            end = min(size, start + split_bytes)
            out.append(TextSource(url, start, end, fmt, csv_header))
    if not out:  # only empty files: one empty partition keeps the job well formed
        out.append(RangeSource(0, 0, 1))
    return out


def is_local(fs: Any) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


# ---------------------------------------------------------------- executor side


def read_source(
    source: Source, limits: SourceLimits | None = None, fetch_blob: BlobFetcher | None = None
) -> Iterable[Any]:
    """The items of one partition: a range, a list, an ndarray chunk, or lines/records.

    ``fetch_blob(key) -> bytes`` is required for a ``BlobSource`` (called with the
    stored object's id when it has one).
    """
    if isinstance(source, RangeSource):
        return range(source.start, source.stop, source.step)
    if isinstance(source, InlineSource):
        items: Iterable[Any] = pickle.loads(source.data)
        return items
    if isinstance(source, BlobSource):
        if fetch_blob is None:
            raise ValueError(f"partition stored by reference ({source.key}) and no fetch_blob")
        data = fetch_blob(source.obj.oid if source.obj is not None else source.key)
        if len(data) != source.size_bytes:
            raise ValueError(f"blob {source.key}: {len(data)} bytes, expected {source.size_bytes}")
        blob_items: Iterable[Any] = pickle.loads(data)
        return blob_items
    if isinstance(source, ParquetSource):
        from lepton_ai.data.parquet import read_parquet_source

        return read_parquet_source(source)
    return read_text_source(source, limits or SourceLimits())


def read_text_source(source: TextSource, limits: SourceLimits) -> list[Any]:
    header: list[str] | None = None
    if source.compression is not None:
        import fsspec

        with fsspec.open(source.url, "rb", compression=source.compression) as zf:
            body = zf.read()
        return _parse(source, decode_lines(body), header)
    with open_url(source.url) as f:
        body = read_line_range(f, source.start, source.end, limits.read_chunk_bytes)
        if source.fmt == "csv" and source.csv_header and source.start > 0:
            f.seek(0)
            header = next(csv.reader([f.readline().decode("utf-8").rstrip("\r\n")]), [])
    return _parse(source, decode_lines(body), header)


def _parse(source: TextSource, lines: list[str], header: list[str] | None) -> list[Any]:
    if source.fmt == "text":
        return lines
    if source.fmt == "jsonl":
        return [json.loads(line) for line in lines if line.strip()]
    rows = list(csv.reader(lines))
    if not source.csv_header:
        return rows
    if source.start == 0:
        if not rows:
            return []
        header, rows = rows[0], rows[1:]
    keys = header or []
    return [dict(zip(keys, row, strict=False)) for row in rows]


def open_url(url: str) -> IO[bytes]:
    if "://" not in url:
        return open(url, "rb")
    import fsspec

    f: IO[bytes] = fsspec.open(url, "rb").open()
    return f


def read_line_range(f: IO[bytes], start: int, end: int, chunk_bytes: int = 1 << 16) -> bytes:
    """The bytes of the lines whose first byte lies in ``[start, end)``, newlines included.

    The last owned line may run past ``end``; it is read to its newline or to EOF.
    """
    if start < 0 or end < start:
        raise ValueError(f"bad byte range [{start}, {end})")
    if start == end:
        return b""
    if start > 0:
        # A line starts at p >= start iff byte p-1 is a newline: look from start-1.
        f.seek(start - 1)
        buf = f.read(end - start + 1)
        nl = buf.find(b"\n")
        if nl == -1:
            return b""
        body = buf[nl + 1 :]
    else:
        f.seek(0)
        body = f.read(end)
    if not body or body.endswith(b"\n"):
        return body
    parts = [body]
    while True:
        chunk = f.read(chunk_bytes)
        if not chunk:
            break
        nl = chunk.find(b"\n")
        if nl != -1:
            parts.append(chunk[: nl + 1])
            break
        parts.append(chunk)
    return b"".join(parts)


def decode_lines(body: bytes) -> list[str]:
    """Split UTF-8 ``body`` into lines without their ``\\n`` / ``\\r\\n`` terminators."""
    if not body:
        return []
    text = body.decode("utf-8")
    if "\r" in text:
        text = text.replace("\r\n", "\n")
    if text.endswith("\n"):
        text = text[:-1]
    return text.split("\n")
