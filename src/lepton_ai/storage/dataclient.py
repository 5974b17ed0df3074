"""The async data-plane client: put, get and delete chunked objects on nodes' data ports.

Connections are pooled: at most ``idle_per_address_max`` idle ones per
address are kept for reuse, ``connections_max`` bounds those in use. A put
streams to every target at once (each its own connection) with the chunk
crcs computed once; a get reads from one replica at a time and, when a
replica fails mid-stream (connection lost, ``DataError``, a chunk failing its
crc), goes on from the next needed chunk at the next replica: bytes already
verified are never fetched again, and unverified bytes are never returned.

Only ``ObjectMessage`` types are sent; the node's port also speaks the
shuffle protocol but answers object requests with object messages only, so
the ``ObjectWireMessage`` codec decodes every answer this client waits for
(chunks as ``ChunkView``: the data is a view into the frame, not a copy).

Short-circuit (``DataClientConfig.short_circuit``, on by default): to a node on
this host (``same_host``: the connection's two ends have one IP) a get asks
for the object file's path and reads it itself, verifying the header, the crc
table and every chunk, in one ``pread`` per up to 1 GiB, into the result; a put
gets a temporary from the node, writes the whole object file there
(``write_object_file``: one ``pwritev`` of header and data) and has the node
check and install it. If the file cannot be read (vanished, no permission, a
chunk fails its crc) the get asks the same node again to stream from the
chunk where it stopped (so the node itself finds, deletes and reports a
corrupt replica), then the next source; if it cannot be written the put
streams to that node on a new connection.
"""

from __future__ import annotations

import asyncio
import os
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import msgspec

from lepton_ai.errors import DataLost, LeptonError, ProtocolError, StorageFull
from lepton_ai.node.node_net import node_wire_config, parse_address
from lepton_ai.storage import checksum as crc32c
from lepton_ai.storage.dataserver import write_chunk_frame
from lepton_ai.storage.messages import (
    CHUNK_BYTES_DEFAULT,
    CHUNK_BYTES_MAX,
    ChunkView,
    DataError,
    DataOk,
    DeleteObjects,
    GetObject,
    LocalWritten,
    ObjectHeader,
    ObjectWireMessage,
    PutDone,
    PutLocal,
    PutObject,
    check_oid,
    chunk_count,
    same_host,
)
from lepton_ai.storage.objects import (
    ChunkCorrupt,
    ObjectCorrupt,
    ObjectFileWriter,
    ObjectMissing,
    ObjectReader,
    ObjectStore,
    ObjectStoreConfig,
    write_object_file,
)
from lepton_ai.wire import Codec, Connection, ConnectionClosed, connect
from lepton_ai.wire.tls import TlsConfig, tls_from_env

_CODEC = Codec[ObjectWireMessage](ObjectWireMessage)
# What a failing peer or network can raise; anything else is our own bug.
_NET_ERRORS = (ConnectionClosed, ProtocolError, OSError, TimeoutError)
ChunkSource = Callable[[int], Awaitable[tuple[int, bytes | memoryview]]]
# Writes the whole object file at the path a node gave (run in a thread). OSError:
# the file cannot be written (the put then streams); anything else fails the put.
LocalWrite = Callable[[str], None]
# Limits a short-circuit reader applies to the file's header (the format's own).
_LOCAL_READ = ObjectStoreConfig()
# Most bytes read from a local object file by one pread (Linux reads < 2 GiB at once).
_LOCAL_SPAN_BYTES = 1 << 30
Conn = Connection[ObjectWireMessage]


class _Fallback:
    """A short-circuit put could not write the node's file: stream instead."""


_FALLBACK = _Fallback()


class _Streaming:
    """The node answered a short-circuit put with ``PutLocal("")``: send the chunks."""


_STREAMING = _Streaming()


@dataclass(frozen=True)
class DataClientConfig:
    """Bounds of one data-plane client."""

    # Connections in use at once over all addresses (each put target and each
    # get holds one); further requests wait for a free one.
    connections_max: int = 64
    # Idle connections kept for reuse, per address and in all.
    idle_per_address_max: int = 1
    idle_max: int = 256
    connect_timeout_s: float = 5.0
    # Longest wait for any answer or chunk before the peer counts as failed.
    reply_timeout_s: float = 30.0
    # A node that does not answer a request's first reply within this long (a paused
    # or overloaded node: its kernel still accepts the connection) is passed over
    # for the next copy: a read does not wait out ``reply_timeout_s`` there.
    first_reply_timeout_s: float = 5.0
    chunk_timeout_s: float = 10.0  # between two chunks of a read
    chunk_bytes: int = CHUNK_BYTES_DEFAULT
    # Most oids in one DeleteObjects request (the server's bound is higher).
    delete_batch_max: int = 10_000
    # Ask targets to fsync every put before answering PutDone.
    fsync: bool = False
    # Read and write the object files of nodes on this host directly (see above).
    short_circuit: bool = True
    # Mutual TLS to the nodes' data ports (default: the process's, $LEPTON_TLS_DIR).
    tls: TlsConfig | None = field(default_factory=tls_from_env)


class DataRequestFailed(LeptonError):
    """A node refused or failed a data-plane request.

    ``kind``: a ``DataError`` kind ("missing", "corrupt", "full", "invalid",
    "busy") or "unreachable" (connection failed, timed out, or broke).
    """

    def __init__(self, address: str, kind: str, message: str) -> None:
        super().__init__(f"{address}: {kind}: {message}")
        self.address = address
        self.kind = kind


class TargetFull(DataRequestFailed, StorageFull):
    """A target had no room for a put (``DataError`` kind "full"); nothing stored there."""


class PutFailed(LeptonError):
    """Fewer targets than required stored an object, for reasons other than space."""


def _target_error(address: str, kind: str, message: str) -> DataRequestFailed:
    if kind == "full":
        return TargetFull(address, kind, message)
    return DataRequestFailed(address, kind, message)


class PutResult(NamedTuple):
    """Targets that confirmed a put, and why each other one did not.

    Unpacks as ``ok, errors = await client.put(...)``; a full target's error
    is a ``TargetFull`` (a ``StorageFull``).
    """

    ok: list[str]
    errors: dict[str, DataRequestFailed]

    def require(self, replicas: int) -> None:
        """Raise unless ``replicas`` targets confirmed: ``StorageFull`` if any was full."""
        if len(self.ok) >= replicas:
            return
        detail = "; ".join(str(e) for e in self.errors.values())
        text = f"{len(self.ok)} of {replicas} replicas stored ({detail})"
        if any(isinstance(e, StorageFull) for e in self.errors.values()):
            raise StorageFull(text)
        raise PutFailed(text)


class DataClient:
    """Pooled connections to nodes' data ports; one per concurrent request."""

    def __init__(self, token: str, config: DataClientConfig | None = None) -> None:
        self.config = config or DataClientConfig()
        self._token = token
        self._wire = replace(node_wire_config(self.config.connect_timeout_s), tls=self.config.tls)
        self._idle: OrderedDict[str, list[Conn]] = OrderedDict()
        self._idle_count = 0
        self._slots = asyncio.Semaphore(self.config.connections_max)
        self._closed = False

    # -- connections -----------------------------------------------------------------
    async def _checkout(self, address: str) -> Conn:
        """An idle live connection to ``address``, or a new one (caller holds a slot)."""
        if self._closed:
            raise ConnectionClosed("data client is closed")
        pooled = self._idle.get(address)
        while pooled:
            conn = pooled.pop()
            self._idle_count -= 1
            # A server that went away has left EOF or an error in the reader.
            if not conn.closed and not conn.reader.at_eof() and conn.reader.exception() is None:
                return conn
            conn.writer.close()
        host, port = parse_address(address)
        return await connect(host, port, token=self._token, codec=_CODEC, config=self._wire)

    def _checkin(self, address: str, conn: Conn) -> None:
        """Keep a connection whose conversation ended cleanly, within the idle bounds."""
        pooled = self._idle.setdefault(address, [])
        self._idle.move_to_end(address)
        if self._closed or conn.closed or len(pooled) >= self.config.idle_per_address_max:
            conn.writer.close()
            return
        pooled.append(conn)
        self._idle_count += 1
        while self._idle_count > self.config.idle_max:
            oldest, conns = next(iter(self._idle.items()))
            if not conns:
                del self._idle[oldest]
                continue
            conns.pop(0).writer.close()
            self._idle_count -= 1

    async def _recv(self, conn: Conn, timeout_s: float | None = None) -> ObjectWireMessage:
        limit = self.config.reply_timeout_s if timeout_s is None else timeout_s
        return await asyncio.wait_for(conn.recv(), limit)

    async def close(self) -> None:
        """Close the idle connections; those in use close when their request ends."""
        self._closed = True
        conns = [c for pooled in self._idle.values() for c in pooled]
        self._idle.clear()
        self._idle_count = 0
        for conn in conns:
            await conn.close()

    # -- put -------------------------------------------------------------------------
    async def put(
        self,
        oid: str,
        data: bytes | bytearray | memoryview,
        targets: Sequence[str],
        chunk_bytes: int | None = None,
        *,
        crc: int | None = None,
    ) -> PutResult:
        """Store ``data`` on every target at once; see ``PutResult.require``.

        ``crc``: the crc32c of ``data`` if the caller has it already.
        """
        check_oid(oid)
        cb = self._chunk_bytes(chunk_bytes)
        view = memoryview(data).cast("B")
        crcs = [crc32c.crc32c(view[i : i + cb]) for i in range(0, len(view), cb)]
        whole = crc32c.crc32c(view) if crc is None else crc

        async def chunk(index: int) -> tuple[int, memoryview]:
            return crcs[index], view[index * cb : (index + 1) * cb]

        def local(path: str) -> None:
            write_object_file(path, oid, view, cb, crcs=crcs, crc=whole)

        put = PutObject(oid, len(view), cb, whole, fsync=self.config.fsync)
        return await self._put_all(put, targets, chunk, local)

    async def put_file(
        self,
        oid: str,
        path: str | os.PathLike[str],
        targets: Sequence[str],
        chunk_bytes: int | None = None,
    ) -> PutResult:
        """Stream the file at ``path`` to every target (read once for crcs, then per chunk)."""
        check_oid(oid)
        cb = self._chunk_bytes(chunk_bytes)
        fd = os.open(path, os.O_RDONLY)
        try:
            size, crcs, whole = await asyncio.to_thread(_file_crcs, fd, cb)

            def read(index: int) -> bytes:
                data = os.pread(fd, cb, index * cb)
                if len(data) != min(cb, size - index * cb):
                    raise PutFailed(f"{path} changed during put_file of {oid}")
                return data

            async def chunk(index: int) -> tuple[int, bytes]:
                return crcs[index], await asyncio.to_thread(read, index)

            def local(target: str) -> None:
                writer = ObjectFileWriter(target, oid, size, cb, crc=whole, create=False)
                try:
                    for index, crc in enumerate(crcs):
                        try:
                            writer.write_chunk(index, crc, read(index))
                        except ChunkCorrupt as exc:  # the file changed since its crcs
                            raise PutFailed(f"{path} changed during put_file of {oid}") from exc
                    writer.finish(fsync=False)
                finally:
                    writer.close()

            put = PutObject(oid, size, cb, whole, fsync=self.config.fsync)
            return await self._put_all(put, targets, chunk, local)
        finally:
            os.close(fd)

    async def put_from_store(
        self, store: ObjectStore, oid: str, targets: Sequence[str]
    ) -> PutResult:
        """Copy a local object to ``targets`` (re-replication), verifying every chunk read."""
        reader = await asyncio.to_thread(store.open_object, oid)
        with reader:

            async def chunk(index: int) -> tuple[int, bytes]:
                return await asyncio.to_thread(reader.read_chunk, index)

            def local(path: str) -> None:
                writer = ObjectFileWriter(
                    path,
                    oid,
                    reader.size,
                    reader.chunk_bytes,
                    crc=reader.crc,
                    create=False,
                    verify=False,  # read_chunk verified each chunk
                )
                try:
                    for index in range(reader.chunks):
                        writer.write_chunk(index, *reader.read_chunk(index))
                    writer.finish(fsync=False)
                finally:
                    writer.close()

            put = PutObject(oid, reader.size, reader.chunk_bytes, reader.crc, self.config.fsync)
            return await self._put_all(put, targets, chunk, local)

    def _chunk_bytes(self, chunk_bytes: int | None) -> int:
        cb = self.config.chunk_bytes if chunk_bytes is None else chunk_bytes
        if not 0 < cb <= CHUNK_BYTES_MAX:
            raise ValueError(f"chunk_bytes must be in 1..{CHUNK_BYTES_MAX}, got {cb}")
        return cb

    async def _put_all(
        self,
        put: PutObject,
        targets: Sequence[str],
        chunk: ChunkSource,
        local: LocalWrite | None = None,
    ) -> PutResult:
        unique = list(dict.fromkeys(targets))
        # return_exceptions: a failing chunk source (a corrupt local replica) must
        # not leave the other targets' streams running after we raise.
        outcomes = await asyncio.gather(
            *(self._put_one(a, put, chunk, local) for a in unique), return_exceptions=True
        )
        ok: list[str] = []
        errors: dict[str, DataRequestFailed] = {}
        for address, outcome in zip(unique, outcomes, strict=True):
            if isinstance(outcome, DataRequestFailed):
                errors[address] = outcome
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                ok.append(address)
        return PutResult(ok, errors)

    async def _put_one(
        self, address: str, put: PutObject, chunk: ChunkSource, local: LocalWrite | None
    ) -> DataRequestFailed | None:
        """Put to ``address``; None when it confirmed, else why not."""
        async with self._slots:
            if not self.config.short_circuit:
                local = None
            outcome = await self._put_once(address, put, chunk, local)
            if isinstance(outcome, _Fallback):
                outcome = await self._put_once(address, put, chunk, None)
            assert not isinstance(outcome, _Fallback)
            return outcome

    async def _put_once(
        self, address: str, put: PutObject, chunk: ChunkSource, local: LocalWrite | None
    ) -> DataRequestFailed | _Fallback | None:
        """One put conversation with ``address`` (the caller holds a slot)."""
        try:
            conn = await self._checkout(address)
        except _NET_ERRORS as exc:
            return DataRequestFailed(address, "unreachable", f"cannot connect: {exc!r}")
        clean = False
        reply: asyncio.Future[ObjectWireMessage] | None = None
        try:
            request: PutObject | None = put
            if local is not None and same_host(conn.writer):
                request = None  # sent here: the answer says how the put goes on
                outcome = await self._put_local(address, conn, put, local)
                if not isinstance(outcome, _Streaming):
                    clean = outcome is None
                    return outcome
            # The answer is awaited while sending: a target that refuses the put
            # (full, busy) answers at once, and the stream stops there.
            reply = asyncio.ensure_future(self._recv(conn))
            sent = await self._send_put(conn, request, put, chunk, reply)
            try:
                answer = await reply
            except _NET_ERRORS as exc:
                return DataRequestFailed(address, "unreachable", f"{sent or exc!r}")
            if isinstance(answer, PutDone) and answer.oid == put.oid and sent is None:
                clean = True
                return None
            if isinstance(answer, DataError):
                return _target_error(address, answer.kind, answer.message)
            return DataRequestFailed(address, "unreachable", f"answered {type(answer).__name__}")
        finally:
            if reply is not None:
                reply.cancel()
                if reply.done() and not reply.cancelled():
                    reply.exception()  # retrieved: the failure is already reported
            if clean:
                self._checkin(address, conn)
            else:
                await conn.close()

    async def _put_local(
        self, address: str, conn: Conn, put: PutObject, local: LocalWrite
    ) -> DataRequestFailed | _Fallback | _Streaming | None:
        """A short-circuit put: None when the node installed the file we wrote."""
        try:
            await conn.send(msgspec.structs.replace(put, local_ok=True))
            answer = await self._recv(conn, self.config.first_reply_timeout_s)
        except _NET_ERRORS as exc:
            return DataRequestFailed(address, "unreachable", repr(exc))
        if isinstance(answer, DataError):
            return _target_error(address, answer.kind, answer.message)
        if not isinstance(answer, PutLocal) or answer.oid != put.oid:
            return DataRequestFailed(address, "unreachable", f"answered {type(answer).__name__}")
        if not answer.path:
            return _STREAMING  # the node does not see one host: stream the chunks
        try:
            await asyncio.to_thread(local, answer.path)
        except OSError:
            return _FALLBACK  # the caller closes the connection: the node drops the put
        try:
            await conn.send(LocalWritten(put.oid))
            answer = await self._recv(conn)
        except _NET_ERRORS as exc:
            return DataRequestFailed(address, "unreachable", repr(exc))
        if isinstance(answer, PutDone) and answer.oid == put.oid:
            return None
        if isinstance(answer, DataError):
            return _target_error(address, answer.kind, answer.message)
        return DataRequestFailed(address, "unreachable", f"answered {type(answer).__name__}")

    async def _send_put(
        self,
        conn: Conn,
        request: PutObject | None,
        put: PutObject,
        chunk: ChunkSource,
        reply: asyncio.Future[ObjectWireMessage],
    ) -> str | None:
        """Send the put (``request``, unless already sent) and its chunks until done or
        answered; a send failure as text.

        Errors of the chunk source (a local file or replica) are not the
        target's fault: they propagate and fail the whole put.
        """
        try:
            if request is not None:
                conn.send_nowait(request)
        except _NET_ERRORS as exc:
            return f"send failed: {exc!r}"
        for index in range(chunk_count(put.size, put.chunk_bytes)):
            if reply.done():
                return "answered before the last chunk"
            crc, data = await chunk(index)
            try:
                write_chunk_frame(conn, index, crc, data)
                await asyncio.wait_for(conn.drain(), self.config.reply_timeout_s)
            except _NET_ERRORS as exc:
                return f"send failed: {exc!r}"
        return None

    # -- get -------------------------------------------------------------------------
    async def get(self, oid: str, sources: Sequence[str]) -> bytes:
        """The verified content of ``oid`` from the first source that can serve each chunk."""
        return await self.get_range(oid, sources, 0)

    async def get_range(
        self, oid: str, sources: Sequence[str], first: int, count: int = -1
    ) -> bytes:
        """Verified chunks ``first .. first + count - 1`` (``count`` < 0: to the end), joined.

        Read short-circuit, the result is the bytes one ``pread`` made (a single
        copy); streamed, the chunks are views into their frames, joined once.
        """
        if count == 0:
            return b""
        stream = _FailoverStream(self, oid, sources, first, None if count < 0 else first + count)
        try:
            await stream.open()
            parts = await stream.read_rest()
        finally:
            await stream.close()
        if len(parts) == 1 and isinstance(parts[0], bytes):
            return parts[0]
        return b"".join(parts)

    async def iter_chunks(
        self, oid: str, sources: Sequence[str], first: int = 0, count: int = -1
    ) -> AsyncIterator[bytes]:
        """Verified chunks ``first ..`` (``count`` of them, < 0: to the end) in order,
        failing over between sources."""
        stream = _FailoverStream(self, oid, sources, first, None if count < 0 else first + count)
        try:
            await stream.open()
            while (data := await stream.next_chunk()) is not None:
                yield data if isinstance(data, bytes) else bytes(data)
        finally:
            await stream.close()

    async def fetch_to_store(
        self, oid: str, sources: Sequence[str], store: ObjectStore
    ) -> ObjectHeader:
        """Copy ``oid`` from ``sources`` into the local ``store``, verified; its header."""
        stream = _FailoverStream(self, oid, sources, 0)
        try:
            header = await stream.open()
            with store.begin_put(oid, header.size, header.chunk_bytes, header.crc) as writer:
                while (data := await stream.next_chunk()) is not None:
                    index = stream.next - 1
                    await asyncio.to_thread(writer.write_chunk, index, crc32c.crc32c(data), data)
                await asyncio.to_thread(writer.commit)
        finally:
            await stream.close()
        return header

    # -- delete ----------------------------------------------------------------------
    async def delete(self, oids: Sequence[str], address: str) -> None:
        """Delete ``oids`` on ``address`` (missing ones are fine); ``DataRequestFailed``."""
        for oid in oids:
            check_oid(oid)
        step = self.config.delete_batch_max
        for start in range(0, len(oids), step):
            await self._delete_batch(list(oids[start : start + step]), address)

    async def _delete_batch(self, oids: list[str], address: str) -> None:
        async with self._slots:
            try:
                conn = await self._checkout(address)
            except _NET_ERRORS as exc:
                raise DataRequestFailed(address, "unreachable", repr(exc)) from exc
            clean = False
            try:
                await conn.send(DeleteObjects(oids))
                answer = await self._recv(conn)
                if isinstance(answer, DataError):
                    raise DataRequestFailed(address, answer.kind, answer.message)
                if not isinstance(answer, DataOk):
                    raise DataRequestFailed(address, "unreachable", type(answer).__name__)
                clean = True
            except _NET_ERRORS as exc:
                raise DataRequestFailed(address, "unreachable", repr(exc)) from exc
            finally:
                if clean:
                    self._checkin(address, conn)
                else:
                    await conn.close()


def _file_crcs(fd: int, chunk_bytes: int) -> tuple[int, list[int], int]:
    """(size, chunk crcs, whole crc) of an open file, read once."""
    size = os.fstat(fd).st_size
    crcs: list[int] = []
    whole = 0
    for offset in range(0, size, chunk_bytes):
        data = os.pread(fd, chunk_bytes, offset)
        crcs.append(crc32c.crc32c(data))
        whole = crc32c.crc32c(data, whole)
    return size, crcs, whole


class _FailoverStream:
    """One object's verified chunks in order, from ``sources`` tried in turn.

    Each source is tried once; when one fails, the next is asked for the
    chunks from the first one not yet verified. A source on this host may
    hand over its file (short-circuit): read here until done or a failure,
    then the same source is asked once more to stream from where the read
    stopped. Holds one connection slot from ``open`` to ``close``.
    """

    def __init__(
        self,
        client: DataClient,
        oid: str,
        sources: Sequence[str],
        first: int,
        end: int | None = None,
    ) -> None:
        check_oid(oid)
        if first < 0:
            raise ValueError(f"first chunk must be >= 0, got {first}")
        self.client = client
        self.oid = oid
        self.next = first
        self._end = end
        self.header: ObjectHeader | None = None
        self.errors: dict[str, str] = {}
        self._pending = list(dict.fromkeys(sources))
        self._conn: Conn | None = None
        self._address = ""
        self._slot = False
        self._local: ObjectReader | None = None  # a short-circuit source's open file
        self._no_local: set[str] = set()  # sources whose file failed: stream from them
        # Whole-object crc of the chunks so far: checked after the last one when
        # reading from chunk 0, so replicas that disagree cannot pass unnoticed.
        self._running: int | None = 0 if first == 0 and end is None else None

    async def open(self) -> ObjectHeader:
        await self.client._slots.acquire()
        self._slot = True
        while self.header is None:
            await self._next_source()
        return self.header

    @property
    def chunks(self) -> int:
        """Chunks of the object (known once a header arrived)."""
        assert self.header is not None
        return chunk_count(self.header.size, self.header.chunk_bytes)

    @property
    def stop(self) -> int:
        """One past the last chunk this stream delivers."""
        return self.chunks if self._end is None else min(self._end, self.chunks)

    def _request(self, conn: Conn) -> GetObject:
        local_ok = (
            self.client.config.short_circuit
            and self._address not in self._no_local
            and same_host(conn.writer)
        )
        count = -1 if self._end is None else max(0, self._end - self.next)
        return GetObject(self.oid, self.next, count, local_ok)

    async def _next_source(self) -> None:
        """Connect to the next source and read its header (sets ``self._conn``, or
        ``self._local`` when the source hands over its file)."""
        if not self._pending:
            said = "; ".join(f"{a}: {why}" for a, why in self.errors.items()) or "no sources"
            raise DataLost(f"object {self.oid}: every source failed ({said})")
        self._address = address = self._pending.pop(0)
        try:
            conn = await self.client._checkout(address)
        except _NET_ERRORS as exc:
            self.errors[address] = f"cannot connect: {exc!r}"
            return
        self._conn = conn
        try:
            await conn.send(self._request(conn))
            answer = await self.client._recv(conn, self.client.config.first_reply_timeout_s)
        except _NET_ERRORS as exc:
            await self._fail(repr(exc), reusable=False)
            return
        if isinstance(answer, DataError):
            # After "invalid" the server closes the connection; other kinds end cleanly.
            await self._fail(f"{answer.kind}: {answer.message}", reusable=answer.kind != "invalid")
            return
        if not isinstance(answer, ObjectHeader) or answer.oid != self.oid:
            await self._fail(f"unexpected answer {type(answer).__name__}", reusable=False)
            return
        path = answer.path
        header = msgspec.structs.replace(answer, path="") if path else answer
        if self.header is not None and header != self.header:
            await self._fail(f"holds a different object: {header}", reusable=False)
            return
        self.header = header
        if path or self.next >= self.stop:  # nothing to stream: the conversation is over
            self._conn = None
            self.client._checkin(address, conn)
        if path and self.next < self.stop:
            await self._open_local(path)

    async def _open_local(self, path: str) -> None:
        assert self.header is not None
        try:
            reader = await asyncio.to_thread(ObjectReader, self.oid, Path(path), _LOCAL_READ)
        except (ObjectMissing, ObjectCorrupt, OSError) as exc:
            self._local_failed(f"cannot open {path}: {exc}")
            return
        if (reader.size, reader.chunk_bytes, reader.crc) != (
            self.header.size,
            self.header.chunk_bytes,
            self.header.crc,
        ):
            reader.close()
            self._local_failed(f"{path} holds a different object")
            return
        self._local = reader

    def _local_failed(self, why: str) -> None:
        """The source's file could not be read: ask that source to stream it, next."""
        self.errors[self._address] = f"local read: {why}"
        self._close_local()
        self._no_local.add(self._address)
        self._pending.insert(0, self._address)

    def _close_local(self) -> None:
        reader, self._local = self._local, None
        if reader is not None:
            reader.close()

    async def _read_local(self, stop: int) -> bytes | memoryview | None:
        """Verified chunks ``self.next .. stop - 1`` from the local file (all read in one
        ``pread``), or those before the first that failed (None if none)."""
        reader = self._local
        assert reader is not None
        first = self.next
        try:
            data, good, running = await asyncio.to_thread(
                _read_span, reader, first, stop, self._running
            )
        except OSError as exc:
            self._local_failed(f"at chunk {first}: {exc!r}")
            return None
        self.next += good
        self._running = running
        if self.next == self.stop:
            self._close_local()
            self._check_whole()
        if good == stop - first:
            return data
        self._local_failed(f"chunk {first + good} failed its crc32c or is truncated")
        assert self.header is not None
        return memoryview(data)[: good * self.header.chunk_bytes] if good else None

    async def read_rest(self) -> list[bytes | memoryview]:
        """Every chunk still to come, as few buffers as the sources allow."""
        parts: list[bytes | memoryview] = []
        while self.header is None or self.next < self.stop:
            if self._local is not None:
                assert self.header is not None
                per = max(1, _LOCAL_SPAN_BYTES // self.header.chunk_bytes)
                data = await self._read_local(min(self.stop, self.next + per))
                if data is not None:
                    parts.append(data)
                continue
            chunk = await self.next_chunk()
            if chunk is None:
                break
            parts.append(chunk)
        return parts

    async def next_chunk(self) -> bytes | memoryview | None:
        """The next verified chunk, or None after the last; ``DataLost`` if no source can."""
        while self.header is None or self.next < self.stop:
            if self._local is not None:
                data = await self._read_local(self.next + 1)
                if data is not None:
                    return data
                continue
            if self._conn is None:
                await self._next_source()
                continue
            try:
                msg = await self.client._recv(self._conn, self.client.config.chunk_timeout_s)
            except _NET_ERRORS as exc:
                await self._fail(f"at chunk {self.next}: {exc!r}", reusable=False)
                continue
            if isinstance(msg, DataError):
                why = f"at chunk {self.next}: {msg.kind}: {msg.message}"
                await self._fail(why, reusable=msg.kind != "invalid")
                continue
            why = self._check(msg)
            if why:
                await self._fail(f"at chunk {self.next}: {why}", reusable=False)
                continue
            assert isinstance(msg, ChunkView)
            self.next += 1
            if self._running is not None:
                self._running = crc32c.crc32c(msg.data, self._running)
            if self.next == self.stop:
                self.client._checkin(self._address, self._conn)
                self._conn = None
                self._check_whole()
            return msg.data
        return None

    def _check_whole(self) -> None:
        assert self.header is not None
        if self._running is not None and self._running != self.header.crc:
            raise DataLost(f"object {self.oid}: chunks verified but the whole-object crc differs")

    def _check(self, msg: ObjectWireMessage) -> str:
        """Why ``msg`` is not the next chunk, verified; "" if it is."""
        assert self.header is not None
        if not isinstance(msg, ChunkView) or msg.index != self.next:
            return f"unexpected {type(msg).__name__}"
        expect = min(
            self.header.chunk_bytes, self.header.size - self.next * self.header.chunk_bytes
        )
        if len(msg.data) != expect:
            return f"chunk of {len(msg.data)} bytes, expected {expect}"
        if crc32c.crc32c(msg.data) != msg.crc:
            return "chunk failed its crc32c"
        return ""

    async def _fail(self, why: str, *, reusable: bool) -> None:
        """Record why the current source failed and drop its connection."""
        self.errors[self._address] = why
        conn, self._conn = self._conn, None
        if conn is not None:
            if reusable:
                self.client._checkin(self._address, conn)
            else:
                await conn.close()

    async def close(self) -> None:
        """Release the slot; a connection still mid-stream cannot be reused."""
        self._close_local()
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()
        if self._slot:
            self._slot = False
            self.client._slots.release()


def _read_span(
    reader: ObjectReader, first: int, stop: int, running: int | None
) -> tuple[bytes, int, int | None]:
    """``ObjectReader.read_span`` and the whole-object crc carried over its good chunks."""
    data, good = reader.read_span(first, stop)
    if running is not None and good:
        end = min(good * reader.chunk_bytes, len(data))
        running = crc32c.crc32c(memoryview(data)[:end], running)
    return data, good, running
