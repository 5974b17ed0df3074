"""Job outputs: ``ds.write_text / write_jsonl / write_parquet(url)``, exactly once.

Each result task turns its partition into one file's bytes (``encode_part``).
Where they go depends on the URL:

* ``lep://prefix`` (the cluster's storage): the bytes are the task's *stored
  result*, an object owned by the job. Only the first result of a task is
  committed (the log's first-``TaskFinished``-wins rule); a losing retry or
  speculative copy is an orphan the nodes' sweep deletes. When the job finishes,
  the state machine re-keys every part to ``prefix/part-NNNNN.ext`` (and drops
  what an earlier write left under the prefix) in the same log command as
  ``JobFinished``: a reader sees the whole output or nothing, whatever dies.
* any other fsspec URL (a local path, s3://...): each attempt writes its part
  under ``url/_temporary/<job>/`` with a name of its own; the job's result names
  the winning attempts' files, and committing the job (``commit_parts``, run by
  whoever fetches the result, idempotent, so another process can finish it after
  the driver died) renames them into place and writes ``_SUCCESS`` last: readers
  that wait for ``_SUCCESS`` (as with Hadoop and Spark) see all or nothing.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable
from typing import Any, Literal

import msgspec

OutputFormat = Literal["text", "jsonl", "parquet"]
EXTENSIONS: dict[str, str] = {"text": ".txt", "jsonl": ".jsonl", "parquet": ".parquet"}
LEP = "lep://"
SUCCESS = "_SUCCESS"
TEMPORARY = "_temporary"


class WriteSpec(msgspec.Struct, frozen=True):
    """Where a write job puts its partitions; ``url`` is absolute (or ``lep://``)."""

    url: str
    fmt: OutputFormat


class WrittenPart(msgspec.Struct, frozen=True):
    """A result task's inline result for a non-``lep://`` write: its temporary file."""

    temp: str
    items: int


def normalize_url(url: str) -> str:
    """The output URL as tasks on any node see it; ValueError if unusable."""
    if not isinstance(url, str) or not url.strip():
        raise TypeError(f"an output URL is a non-empty str, got {url!r}")
    url = url.rstrip("/")
    if url.startswith(LEP):
        if not url[len(LEP) :].strip("/"):
            raise ValueError(f"{url!r}: a lep:// output needs a key prefix (lep://out/name)")
        return url
    if "://" not in url:
        return os.path.abspath(url)
    return url


def stored_prefix(url: str) -> str:
    return url[len(LEP) :].strip("/")


def part_name(partition: int, fmt: str) -> str:
    return f"part-{partition:05d}{EXTENSIONS[fmt]}"


def encode_part(items: Iterable[Any], fmt: OutputFormat) -> tuple[bytes, int]:
    """One partition as the bytes of one file, and its item count."""
    if fmt == "parquet":
        return _parquet_bytes(list(items))
    lines: list[str] = []
    for item in items:
        lines.append(json.dumps(item) if fmt == "jsonl" else str(item))
    body = "\n".join(lines) + ("\n" if lines else "")
    return body.encode("utf-8"), len(lines)


def _parquet_bytes(rows: list[Any]) -> tuple[bytes, int]:
    import importlib

    try:
        # By name: pyarrow ships no type hints, and it is optional.
        pa: Any = importlib.import_module("pyarrow")
        pq: Any = importlib.import_module("pyarrow.parquet")
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("write_parquet needs pyarrow: pip install 'lepton-ai[parquet]'") from exc
    if rows and not all(isinstance(r, dict) for r in rows):
        raise TypeError("write_parquet writes dict items (column -> value)")
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue(), len(rows)


def write_temp(spec: WriteSpec, job_id: str, partition: int, tag: str, data: bytes) -> str:
    """Write an attempt's part under ``_temporary`` (a name no other attempt uses)."""
    import fsspec

    temp = f"{spec.url}/{TEMPORARY}/{job_id}/{tag}-{part_name(partition, spec.fmt)}"
    with fsspec.open(temp, "wb", auto_mkdir=True) as f:
        f.write(data)
    return temp


def commit_parts(spec: WriteSpec, temps: list[str]) -> list[str]:
    """Rename each partition's winning temporary file into place, then ``_SUCCESS``.

    Idempotent: a part already renamed (an earlier, interrupted commit) is kept.
    Returns the final URLs in partition order.
    """
    import fsspec

    fs, root = fsspec.core.url_to_fs(spec.url)
    finals: list[str] = []
    for partition, temp in enumerate(temps):
        final = f"{root}/{part_name(partition, spec.fmt)}"
        _, temp_path = fsspec.core.url_to_fs(temp)
        if fs.exists(temp_path):
            if fs.exists(final):
                fs.rm(final)
            fs.mv(temp_path, final)
        elif not fs.exists(final):
            raise FileNotFoundError(f"output part {partition} vanished: neither {temp} nor {final}")
        finals.append(fs.unstrip_protocol(final) if "://" in spec.url else final)
    for stale in fs.ls(root, detail=False):
        # parts of an earlier, larger write to the same place
        name = str(stale).rsplit("/", 1)[-1]
        if name.startswith("part-") and f"{root}/{name}" not in {
            f"{root}/{part_name(p, spec.fmt)}" for p in range(len(temps))
        }:
            fs.rm(stale)
    if fs.exists(f"{root}/{TEMPORARY}"):
        fs.rm(f"{root}/{TEMPORARY}", recursive=True)
    with fs.open(f"{root}/{SUCCESS}", "wb") as f:
        f.write(b"")
    return finals
