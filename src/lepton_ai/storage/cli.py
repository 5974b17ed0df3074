"""``lepton storage put|get|ls|stat|rm|fsck``: the object store from the shell.

    lepton storage put models/iris.joblib iris.joblib --replicas 3
    lepton storage get models/iris.joblib - > copy.joblib
    lepton storage ls models/ --json
    lepton storage fsck          # exit 1 if an object is lost

The cluster is found like every other command's (``--address``/``--token``, else
the state file of ``lepton cluster up``); ``--json`` prints machine-readable output;
a failure exits non-zero with one line on stderr (``lepton.cli.main``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from lepton_ai.node.cli import _print, add_connect_args, connect_from_args

COPY_CHUNK_BYTES = 4 << 20


@contextlib.contextmanager
def _storage(args: argparse.Namespace) -> Iterator[Any]:
    """The cluster's ``StorageClient``; a missing key becomes a one-line reason."""
    cluster = connect_from_args(args)
    try:
        yield cluster.storage
    except KeyError as exc:
        # str(KeyError(msg)) is repr(msg), quotes and escapes: print the message itself.
        raise LookupError(str(exc.args[0]) if exc.args else "no such object") from None
    finally:
        cluster.close()


def _stat_dict(st: Any) -> dict[str, Any]:
    out: dict[str, Any] = dataclasses.asdict(st)
    return out


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- commands


def _cmd_put(args: argparse.Namespace) -> int:
    if args.replicas is not None and args.replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {args.replicas}")
    data: Any = sys.stdin.buffer if args.file == "-" else Path(args.file)
    if isinstance(data, Path) and not data.is_file():
        raise FileNotFoundError(f"no such file: {args.file}")
    with _storage(args) as storage:
        st = storage.put(args.key, data, args.replicas, if_absent=args.if_absent)
    _print(
        args,
        _stat_dict(st),
        f"put {st.key}: {st.size} bytes, crc32c {st.checksum}, on {', '.join(st.replicas)}",
    )
    return 0


def _cmd_get(args: argparse.Namespace) -> int:
    to_stdout = args.file == "-"
    if to_stdout and args.json:
        raise ValueError("--json needs FILE: with '-' the object's bytes go to stdout")
    dest = Path(args.file)
    # Into a temporary name first: a failed read must not leave a truncated FILE.
    part = dest.with_name(f".{dest.name}.part-{os.getpid()}")
    with _storage(args) as storage, storage.open(args.key) as src:
        if to_stdout:
            _copy(src, sys.stdout.buffer)
            sys.stdout.buffer.flush()
            return 0
        try:
            with open(part, "wb") as out:
                n = _copy(src, out)
            os.replace(part, dest)
        finally:
            part.unlink(missing_ok=True)
    _print(args, {"key": args.key, "size": n, "file": str(dest)}, f"{args.key} -> {dest} ({n} B)")
    return 0


def _copy(src: IO[bytes], dst: IO[bytes]) -> int:
    n = 0
    while data := src.read(COPY_CHUNK_BYTES):
        dst.write(data)
        n += len(data)
    return n


def _cmd_ls(args: argparse.Namespace) -> int:
    from lepton_ai.storage.fsspec import iter_objects

    if args.limit < 0:
        raise ValueError(f"--limit must be >= 0, got {args.limit}")
    # Printed page by page as they come: memory stays bounded whatever the count.
    out = sys.stdout
    with _storage(args) as storage:
        if args.json:
            out.write("[")
        for n, meta in enumerate(iter_objects(storage, args.prefix)):
            if args.limit and n >= args.limit:
                break
            assert not isinstance(meta, str)  # no delimiter: objects only
            if args.json:
                st = {"key": meta.key, "size": meta.size, "replicas": list(meta.replicas)}
                out.write(("," if n else "") + json.dumps(st | {"want": meta.want}))
            else:
                out.write(f"{meta.size:>12}  {','.join(meta.replicas):<24}  {meta.key}\n")
        if args.json:
            out.write("]\n")
    return 0


def _cmd_stat(args: argparse.Namespace) -> int:
    with _storage(args) as storage:
        st = storage.stat(args.key)
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st.created_at))
    text = "\n".join(
        [
            f"key       {st.key}",
            f"size      {st.size} ({_size(st.size)})",
            f"checksum  crc32c {st.checksum}",
            f"replicas  {', '.join(st.replicas) or '(none)'} (want {st.want})",
            f"created   {created}",
            f"oid       {st.oid}",
        ]
    )
    _print(args, _stat_dict(st), text)
    return 0


def _cmd_rm(args: argparse.Namespace) -> int:
    deleted: list[str] = []
    with _storage(args) as storage:
        for key in args.keys:
            storage.delete(key)
            deleted.append(key)
    _print(args, {"deleted": deleted}, "\n".join(f"deleted {k}" for k in deleted))
    return 0


def _cmd_fsck(args: argparse.Namespace) -> int:
    import msgspec

    if args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    with _storage(args) as storage:
        report = storage.fsck(args.limit)
    lines = [
        f"{report.objects} objects, {_size(report.bytes)}; "
        f"under-replicated {len(report.under_replicated)}, lost {len(report.lost)}, "
        f"copies in flight {report.copies_inflight}",
        f"  {'node':<24} {'used':>12} {'capacity':>12} {'objects':>8}",
    ]
    for node, u in sorted(report.nodes.items()):
        lines.append(
            f"  {node:<24} {_size(u.used_bytes):>12} {_size(u.capacity_bytes):>12} {u.objects:>8}"
        )
    for m in report.under_replicated:
        lines.append(f"under-replicated {m.key} ({len(m.replicas)}/{m.want} copies)")
    for m in report.lost:
        lines.append(f"LOST {m.key} ({m.size} B)")
    obj: dict[str, Any] = msgspec.to_builtins(report)
    obj["ok"] = not report.lost
    _print(args, obj, "\n".join(lines))
    return 1 if report.lost else 0


# ---------------------------------------------------------------- registration


def _common(p: argparse.ArgumentParser) -> None:
    add_connect_args(p)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def register(subparsers: Any) -> None:
    storage = subparsers.add_parser(
        "storage", help="put, get, list, stat, remove and check the cluster's stored objects"
    )
    sub = storage.add_subparsers(dest="storage_command", metavar="SUBCOMMAND", required=True)

    p = sub.add_parser("put", help="store FILE (- for stdin) under KEY, replacing it")
    p.add_argument("key")
    p.add_argument("file", metavar="FILE", help="a file, or - to read stdin")
    p.add_argument("--replicas", type=int, default=None, help="copies (default: the cluster's)")
    p.add_argument("--if-absent", action="store_true", help="fail if KEY exists")
    _common(p)
    p.set_defaults(func=_cmd_put)

    p = sub.add_parser("get", help="write KEY's bytes to FILE (default -: stdout)")
    p.add_argument("key")
    p.add_argument("file", metavar="FILE", nargs="?", default="-")
    _common(p)
    p.set_defaults(func=_cmd_get)

    p = sub.add_parser("ls", help="objects whose key starts with PREFIX: size, replicas, key")
    p.add_argument("prefix", metavar="PREFIX", nargs="?", default="")
    p.add_argument("--limit", type=int, default=0, help="at most N objects (0: all)")
    _common(p)
    p.set_defaults(func=_cmd_ls)

    p = sub.add_parser("stat", help="KEY's size, checksum, replicas, creation time")
    p.add_argument("key")
    _common(p)
    p.set_defaults(func=_cmd_stat)

    p = sub.add_parser("rm", help="delete KEY (its bytes leave every node)")
    p.add_argument("keys", metavar="KEY", nargs="+")
    _common(p)
    p.set_defaults(func=_cmd_rm)

    p = sub.add_parser(
        "fsck", help="under-replicated and lost objects, node usage (exit 1 if any is lost)"
    )
    p.add_argument("--limit", type=int, default=1000, help="objects listed per category")
    _common(p)
    p.set_defaults(func=_cmd_fsck)
