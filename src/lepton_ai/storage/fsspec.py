"""``lep://KEY``: the cluster's object store as an fsspec filesystem.

    import fsspec
    with fsspec.open("lep://logs/a.log", "rb") as f: ...
    task.read_text("lep://logs/*.log")                  # executors read their ranges
    pq.read_table("lep://t/x.parquet", filesystem=LeptonFileSystem())

Keys are flat strings; ``/`` acts as a directory separator (like S3): directories
are never stored, ``ls`` and ``glob`` synthesise them from the keys under them.

Which cluster: the ``address``/``token`` storage options (or ``cluster=`` a handle),
else ``$LEPTON_ADDRESS`` (+ ``$LEPTON_TOKEN``), which a worker agent sets for the
executors it starts, else the state file of ``lepton cluster up``. One
``lep.connect`` handle is kept per (address, token) in each process.

The protocol is registered through the ``fsspec.specs`` entry point, and again by
importing this module (``register()``), for an install without entry points.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import io
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec
from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

from lepton_ai.errors import LimitExceeded
from lepton_ai.storage.control import ListObjects, ObjectList
from lepton_ai.storage.messages import ObjectMeta

if TYPE_CHECKING:
    from lepton_ai.node.cluster_handle import Cluster
    from lepton_ai.storage.client import ObjectFile, StorageClient

PROTOCOL = "lep"
ADDRESS_ENV = "LEPTON_ADDRESS"
LIST_PAGE = 1000  # objects per ListObjects request
LIST_ENTRIES_MAX = 1_000_000  # one ls/find; past it LimitExceeded, not unbounded memory
COPY_CHUNK_BYTES = 4 << 20
_KEY_MAX = "\U0010ffff"  # sorts after any character: "sub/" + this skips all of sub/

_handles: dict[tuple[int, str, str], Cluster] = {}
_handles_lock = threading.Lock()


# ---------------------------------------------------------------- which cluster


def resolve_cluster(
    address: str | None = None, token: str | None = None, state_file: str | None = None
) -> tuple[str, str]:
    """(address, token): explicit, else ``$LEPTON_ADDRESS``, else ``lepton cluster up``'s."""
    from lepton_ai.node.cluster_handle import find_cluster

    try:
        return find_cluster(address, token, state_file)
    except ValueError as exc:
        raise ValueError(
            f"lep:// has no cluster (or pass address=/token= options): {exc}"
        ) from None


def cluster_for(address: str, token: str) -> Cluster:
    """This process's handle on the cluster at ``address`` (connected on first use)."""
    # The pid is part of the key: a forked child must not share the parent's sockets.
    key = (os.getpid(), address, token)
    with _handles_lock:
        handle = _handles.get(key)
        if handle is None:
            from lepton_ai.node.cluster_handle import connect

            handle = connect(address, token)
            _handles[key] = handle
        return handle


@atexit.register
def close_handles() -> None:
    """Close this process's cached cluster handles (done at exit; tests call it)."""
    with _handles_lock:
        mine = [k for k in _handles if k[0] == os.getpid()]
        for key in mine:
            with contextlib.suppress(Exception):
                _handles.pop(key).close()


# ---------------------------------------------------------------- listing


def list_page(storage: StorageClient, prefix: str, after: str, limit: int) -> ObjectList:
    """One bounded page of keys under ``prefix`` after ``after``."""
    # StorageClient.list returns every match at once; paging needs the request itself.
    page: ObjectList = storage._control(ListObjects(prefix, after, limit), ObjectList)
    return page


def iter_objects(
    storage: StorageClient, prefix: str = "", *, delimiter: str = "", start_after: str = ""
) -> Iterator[ObjectMeta | str]:
    """Objects under ``prefix`` by key, page by page. With ``delimiter``, a key holding
    it after the prefix is folded into its common prefix (a ``str`` ending in
    ``delimiter``, yielded once) and the keys under it are skipped, not fetched."""
    after = start_after
    common = ""
    while True:
        page = list_page(storage, prefix, after, LIST_PAGE)
        for meta in page.objects:
            if common and meta.key.startswith(common):
                continue
            rest = meta.key[len(prefix) :]
            cut = rest.find(delimiter) if delimiter else -1
            if cut >= 0:
                common = prefix + rest[: cut + len(delimiter)]
                yield common
            else:
                yield meta
        if not page.more or not page.objects:
            return
        last = page.objects[-1].key
        after = common + _KEY_MAX if common and last.startswith(common) else last


def _file_entry(meta: ObjectMeta) -> dict[str, Any]:
    """What ``info`` says of a file: ``ObjectStat``'s fields, fsspec's names."""
    return {
        "name": meta.key,
        "size": meta.size,
        "type": "file",
        "checksum": f"{meta.crc:08x}",
        "replicas": list(meta.replicas),
        "want": meta.want,
        "created": meta.created_at,
        "oid": meta.oid,
    }


def _dir_entry(name: str) -> dict[str, Any]:
    return {"name": name.rstrip("/"), "size": 0, "type": "directory"}


def _bounded(entries: Iterator[Any], what: str) -> Iterator[Any]:
    for n, entry in enumerate(entries):
        if n >= LIST_ENTRIES_MAX:
            raise LimitExceeded(f"{what}: over LIST_ENTRIES_MAX={LIST_ENTRIES_MAX} entries")
        yield entry


# ---------------------------------------------------------------- the filesystem


class LeptonFileSystem(AbstractFileSystem):  # type: ignore[misc]  # fsspec is untyped
    """``lep://KEY``: objects of a lepton cluster's storage layer."""

    protocol = PROTOCOL
    root_marker = ""

    def __init__(
        self,
        address: str | None = None,
        token: str | None = None,
        *,
        cluster: Cluster | None = None,
        state_file: str | None = None,
        replicas: int | None = None,
        **kwargs: Any,
    ) -> None:
        """``replicas``: copies of each written object (None: the cluster's default)."""
        super().__init__(**kwargs)
        self._address = address
        self._token = token
        self._state_file = state_file
        self._cluster = cluster
        self.replicas = replicas
        self._resolved: tuple[int, str, str] | None = None

    @property
    def cluster(self) -> Cluster:
        if self._cluster is not None:
            return self._cluster
        from lepton_ai.node.cluster_handle import current

        default = None if self._address or self._state_file else current()
        if default is not None:
            return default  # the driver's own cluster (lep.LocalCluster / lep.connect)
        if self._address or os.environ.get(ADDRESS_ENV):
            # Cheap, so looked up on every use: fsspec caches instances, and one made
            # without options must follow $LEPTON_ADDRESS when it changes.
            address, token = resolve_cluster(self._address, self._token)
        else:
            if self._resolved is None or self._resolved[0] != os.getpid():
                # The state file is read once per process, not on every call.
                found = resolve_cluster(None, self._token, self._state_file)
                self._resolved = (os.getpid(), *found)
            _, address, token = self._resolved
        return cluster_for(address, token)

    @property
    def storage(self) -> StorageClient:
        return self.cluster.storage

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        text = str(super()._strip_protocol(path))
        return text.lstrip("/")  # keys never start with "/": lep:///a is lep://a

    # -- metadata --------------------------------------------------------------------
    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        key = self._strip_protocol(path)
        prefix = f"{key}/" if key else ""
        entries = [
            _dir_entry(item) if isinstance(item, str) else _file_entry(item)
            for item in _bounded(iter_objects(self.storage, prefix, delimiter="/"), f"ls {path!r}")
        ]
        if not entries and key:
            entries = [self.info(key)]  # a file lists as itself; FileNotFoundError if none
        return entries if detail else [e["name"] for e in entries]

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        key = self._strip_protocol(path)
        if not key:
            return _dir_entry("")
        try:
            return self._stat(key)
        except FileNotFoundError:
            if list_page(self.storage, f"{key}/", "", 1).objects:
                return _dir_entry(key)
            raise

    def _stat(self, key: str) -> dict[str, Any]:
        try:
            st = self.storage.stat(key)
        except KeyError:
            raise FileNotFoundError(f"{PROTOCOL}://{key}") from None
        entry = dataclasses.asdict(st)
        entry.update(name=entry.pop("key"), created=entry.pop("created_at"), type="file")
        return entry

    def find(
        self,
        path: str,
        maxdepth: int | None = None,
        withdirs: bool = False,
        detail: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Every file under ``path`` from one flat prefix listing (no walk per level)."""
        if maxdepth is not None:
            return super().find(path, maxdepth, withdirs, detail, **kwargs)
        key = self._strip_protocol(path)
        prefix = f"{key}/" if key else ""
        out: dict[str, dict[str, Any]] = {}
        if withdirs and key and self.isdir(key):
            out[key] = _dir_entry(key)
        for meta in _bounded(iter_objects(self.storage, prefix), f"find {path!r}"):
            assert isinstance(meta, ObjectMeta)  # no delimiter: objects only
            out[meta.key] = _file_entry(meta)
            parent = meta.key.rpartition("/")[0]
            while withdirs and len(parent) > len(key) and parent not in out:
                out[parent] = _dir_entry(parent)
                parent = parent.rpartition("/")[0]
        if not out and key:
            with contextlib.suppress(FileNotFoundError):
                out[key] = self._stat(key)
        names = sorted(out)
        return {n: out[n] for n in names} if detail else names

    def created(self, path: str) -> datetime:
        return datetime.fromtimestamp(self.info(path)["created"], tz=UTC)

    def modified(self, path: str) -> datetime:
        return self.created(path)  # objects are immutable: a put replaces the whole object

    def ukey(self, path: str) -> str:
        return str(self.info(path)["oid"])  # a new object id on every put

    # -- data ------------------------------------------------------------------------
    def cat_file(
        self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any
    ) -> bytes:
        key = self._strip_protocol(path)
        try:
            if start is None and end is None:
                return self.storage.get(key)
            obj = self.storage.open(key)
        except KeyError:
            raise FileNotFoundError(f"{PROTOCOL}://{key}") from None
        with obj:
            lo, hi = _clamp(start, end, obj.size)
            return _read_range(obj, lo, hi)

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        key = self._strip_protocol(path)
        replicas = kwargs.get("replicas", self.replicas)
        self.storage.put(key, value, replicas, if_absent=mode == "create")

    def rm_file(self, path: str) -> None:
        key = self._strip_protocol(path)
        try:
            self.storage.delete(key)
        except KeyError:
            raise FileNotFoundError(f"{PROTOCOL}://{key}") from None

    def _rm(self, path: str) -> None:
        self.rm_file(path)

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        paths = self.expand_path(path, recursive=recursive, maxdepth=maxdepth)
        # Directories are synthesised from the keys under them: nothing to delete.
        dirs = {p.rsplit("/", i)[0] for p in paths for i in range(1, p.count("/") + 1)}
        for p in reversed(paths):
            try:
                self.rm_file(p)
            except FileNotFoundError:
                if p in dirs or (recursive and self.isdir(p)):
                    continue
                if self.isdir(p):
                    raise IsADirectoryError(
                        f"{PROTOCOL}://{p}: a directory (recursive=True)"
                    ) from None
                raise

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        pass  # a directory exists while a key is under it

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        pass

    def rmdir(self, path: str) -> None:
        pass

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> None:
        # No server-side copy: stream through this process in bounded chunks.
        with self.open(path1, "rb") as src, self.open(path2, "wb") as dst:
            shutil.copyfileobj(src, dst, COPY_CHUNK_BYTES)

    def _open(
        self,
        path: str,
        mode: str = "rb",
        block_size: int | None = None,
        autocommit: bool = True,
        cache_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> LeptonFile:
        key = self._strip_protocol(path)
        if mode == "rb":
            try:
                obj = self.storage.open(key)
            except KeyError:
                raise FileNotFoundError(f"{PROTOCOL}://{key}") from None
            kwargs["obj"] = obj
        elif mode not in ("wb", "xb"):
            raise NotImplementedError(f"lep:// objects are immutable: mode {mode!r} (rb, wb, xb)")
        else:
            kwargs.setdefault("replicas", self.replicas)
        return LeptonFile(
            self, key, mode, block_size, autocommit, cache_options=cache_options, **kwargs
        )


class LeptonFile(AbstractBufferedFile):  # type: ignore[misc]  # fsspec is untyped
    """Reading: ``_fetch_range`` reads just the chunks it needs from a live replica.
    Writing: buffered to a temporary file, stored by one ``put`` on close (nothing is
    visible before; a ``with`` block left by an exception stores nothing)."""

    def __init__(
        self,
        fs: LeptonFileSystem,
        path: str,
        mode: str,
        block_size: int | None,
        autocommit: bool,
        *,
        obj: ObjectFile | None = None,
        replicas: int | None = None,
        **kwargs: Any,
    ) -> None:
        # Set before the base class runs: its __del__ may look at them.
        self._obj = obj
        self._lock = threading.Lock()
        self._tmp: io.BufferedWriter | None = None
        self._tmp_path = ""
        self._replicas = replicas
        size = obj.size if obj is not None else None
        super().__init__(fs, path, mode, block_size, autocommit, size=size, **kwargs)

    # -- reading ---------------------------------------------------------------------
    def _fetch_range(self, start: int, end: int) -> bytes:
        # pyarrow may read one file from several threads: the cursor is shared.
        with self._lock:
            if self._obj is None:  # closed and read again, or unpickled
                self._obj = self.fs.storage.open(self.path)
            lo, hi = _clamp(start, end, self.size)
            return _read_range(self._obj, lo, hi)

    # -- writing ---------------------------------------------------------------------
    def _initiate_upload(self) -> None:
        fd, self._tmp_path = tempfile.mkstemp(prefix="lep-put-")
        self._tmp = os.fdopen(fd, "wb")

    def _upload_chunk(self, final: bool = False) -> bool:
        assert self._tmp is not None
        self.buffer.seek(0)
        shutil.copyfileobj(self.buffer, self._tmp)
        if final and self.autocommit:
            self.commit()
        return True

    def commit(self) -> None:
        tmp, self._tmp = self._tmp, None
        if tmp is None:
            return
        try:
            tmp.close()
            self.fs.storage.put(
                self.path, Path(self._tmp_path), self._replicas, if_absent=self.mode == "xb"
            )
        finally:
            os.unlink(self._tmp_path)

    def discard(self) -> None:
        tmp, self._tmp = self._tmp, None
        if tmp is not None:
            tmp.close()
            os.unlink(self._tmp_path)

    def close(self) -> None:
        try:
            super().close()
        finally:
            obj, self._obj = self._obj, None
            if obj is not None:
                obj.close()

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None and self.mode != "rb":
            self.discard()  # a half-written object must not become visible
            self.forced = True  # and close() must not flush (and put) the rest
        self.close()


def _clamp(start: int | None, end: int | None, size: int) -> tuple[int, int]:
    """fsspec's range convention (None: the edge; negative: from the end) within size."""
    lo = 0 if start is None else (max(0, size + start) if start < 0 else min(start, size))
    hi = size if end is None else (max(0, size + end) if end < 0 else min(end, size))
    return lo, max(lo, hi)


def _read_range(obj: ObjectFile, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of ``obj``: it returns at most a chunk per read, so loop."""
    out = bytearray(end - start)
    view = memoryview(out)
    obj.seek(start)
    got = 0
    while got < len(out):
        n = obj.readinto(view[got:])
        if not n:
            raise EOFError(f"object ended at {start + got} bytes, {end} expected")
        got += n
    return bytes(out)


def register() -> None:
    """Make ``lep://`` known to fsspec in this process (the entry point does it too)."""
    fsspec.register_implementation(PROTOCOL, LeptonFileSystem, clobber=True)


register()
