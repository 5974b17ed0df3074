"""The node's object server: puts, gets and deletes of chunked objects on the data port.

``ObjectServer.handle`` serves one request that arrived on a connection and
reads or writes the rest of its conversation (``Chunk`` frames) on that same
connection, so the node can serve object and shuffle messages on one port.

Failure answers (``DataError`` kinds): "missing" and a get's "corrupt" leave
the connection usable (the conversation ended in a defined state); "full",
"busy", "corrupt" during a put, and "invalid" end it: the client is still
streaming chunks the server will not read, so the connection is closed after
a bounded linger that lets the answer reach the client before the close.

Chunk disk I/O runs in a worker thread (``asyncio.to_thread``), in batches of
up to ``io_batch_bytes`` per call. Measured here (1 MiB chunks, page cache):
``write_chunk`` ~430 us (crc32c twice + pwrite), ``read_chunk`` ~140 us, the
hop to a thread ~90 us median. Inline, a write would stall every other
connection of the node for the whole call, and far longer when the kernel
throttles on dirty pages or the disk is slow or cold (ms to tens of ms a
read). A put writes one batch in a thread while it receives the next (at most
two batches of a put in memory); a get reads a batch, then sends it. The
default pool's threads bound the concurrency together with
``puts_inflight_max`` and ``gets_inflight_max``.

Copies: a received chunk's data is decoded as a view into its frame
(``ChunkView``) and written from there; a chunk is sent as its frame head
(``chunk_frame_head``) and the data, two writes, never re-encoded.

Short-circuit (``local_ok`` and ``same_host``, see messages.py): a get answers
with the object file's path; a put hands the client a temporary to write and
checks it on ``PutDone``: magic, sizes, header and table crc and the file's
length, not every data chunk by default (``verify_local_puts``): the client
computed the chunk crcs from the very bytes it wrote, every read verifies
every chunk it returns, and the scrubber re-reads them all. Reading the data
back costs about half again the put (measured, 64 MiB in 1 MiB chunks, page
cache: the client's write plus the check and rename 21 ms, 33 ms verifying
every chunk). With 2+ replicas on one host the client writes each file from
its buffer (in parallel threads): copying the first file with
``copy_file_range`` was no faster (22 ms vs 18 ms per 64 MiB).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec

from lepton_ai.errors import FrameTooLarge, LeptonError, LimitExceeded, ProtocolError, StorageFull
from lepton_ai.storage.messages import (
    CHUNK_BYTES_MAX,
    Chunk,
    ChunkView,
    DataError,
    DataErrorKind,
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
    chunk_frame_head,
    same_host,
)
from lepton_ai.storage.objects import (
    ChunkCorrupt,
    ObjectConflict,
    ObjectCorrupt,
    ObjectMissing,
    ObjectReader,
    ObjectStore,
    ObjectWriter,
)
from lepton_ai.wire import Connection, ConnectionClosed, read_frame

log = logging.getLogger("lepton_ai.storage")
R = TypeVar("R")
OnCorrupt = Callable[[str], None]

_WIRE_DECODER: msgspec.msgpack.Decoder[ObjectWireMessage] = msgspec.msgpack.Decoder(
    ObjectWireMessage
)

_OBJECT_MESSAGES = (
    PutObject,
    Chunk,
    ChunkView,
    PutLocal,
    GetObject,
    ObjectHeader,
    PutDone,
    DeleteObjects,
    DataOk,
    DataError,
)


@dataclass(frozen=True)
class DataServerConfig:
    """Bounds of one node's object server."""

    puts_inflight_max: int = 16
    gets_inflight_max: int = 64
    chunk_bytes_max: int = CHUNK_BYTES_MAX
    # Most oids in one DeleteObjects request.
    delete_oids_max: int = 100_000
    # A put whose client sends nothing for this long is abandoned.
    chunk_timeout_s: float = 30.0
    # A get whose client reads nothing for this long is abandoned.
    send_timeout_s: float = 30.0
    # After refusing a put mid-stream: how long to discard the client's
    # remaining chunks so our answer is not lost to a TCP reset.
    linger_s: float = 2.0
    linger_bytes_max: int = 64 << 20
    # Chunk bytes read or written per hop to a worker thread.
    io_batch_bytes: int = 4 << 20
    # Serve local_ok gets and puts of clients on this host by the file itself.
    short_circuit: bool = True
    # Re-read and check every data chunk of a short-circuit put before installing it.
    verify_local_puts: bool = False
    # A short-circuit put's client gets chunk_timeout_s plus its size at this rate
    # to write the file and send PutDone.
    local_put_bytes_per_s_min: float = 16 << 20


class _Refused(LeptonError):
    """Ends a conversation with a ``DataError`` answer (internal)."""

    def __init__(self, kind: DataErrorKind, message: str, *, close: bool) -> None:
        super().__init__(message)
        self.kind: DataErrorKind = kind
        self.close = close


def _ignore_corrupt(oid: str) -> None:
    """Default ``on_corrupt``: the store already deleted the damaged replica."""


class ObjectServer:
    """Serves one ``ObjectStore`` on connections the node accepts."""

    def __init__(
        self,
        store: ObjectStore,
        config: DataServerConfig | None = None,
        on_corrupt: OnCorrupt = _ignore_corrupt,
    ) -> None:
        self.store = store
        self.config = config or DataServerConfig()
        self.on_corrupt = on_corrupt
        self._puts = 0
        self._gets = 0

    async def handle(self, conn: Connection[Any], msg: object) -> bool:
        """Serve ``msg`` if it is an object request; False if it is not ours."""
        if not isinstance(msg, _OBJECT_MESSAGES):
            return False
        try:
            try:
                await self._dispatch(conn, msg)
            except _Refused as exc:
                await self._answer_error(conn, exc)
        except TimeoutError as exc:
            # A client that stopped sending or reading holds a file and a slot.
            await conn.close()
            raise ConnectionClosed(f"{conn.peer}: {type(msg).__name__} timed out") from exc
        return True

    async def _dispatch(self, conn: Connection[Any], msg: object) -> None:
        if isinstance(msg, PutObject):
            await self._put(conn, msg)
        elif isinstance(msg, GetObject):
            await self._get(conn, msg)
        elif isinstance(msg, DeleteObjects):
            await self._delete(conn, msg)
        else:
            raise _Refused("invalid", f"{type(msg).__name__} is not a request", close=True)

    async def _answer_error(self, conn: Connection[Any], exc: _Refused) -> None:
        conn.send_nowait(DataError(exc.kind, str(exc)))
        if not exc.close:
            await self._drain(conn)
            return
        # Best effort: the connection is closed below whatever happens; the
        # linger only gives the answer its chance to arrive before a reset.
        with contextlib.suppress(ConnectionError, OSError, LeptonError, TimeoutError):
            await self._drain(conn)
            conn.writer.write_eof()
            await asyncio.wait_for(self._discard(conn), self.config.linger_s)
        await conn.close()

    async def _discard(self, conn: Connection[Any]) -> None:
        """Read and drop what the client still sends, up to ``linger_bytes_max``, until EOF."""
        left = self.config.linger_bytes_max
        while left > 0 and (data := await conn.reader.read(min(left, 1 << 20))):
            left -= len(data)

    async def _drain(self, conn: Connection[Any]) -> None:
        await asyncio.wait_for(conn.drain(), self.config.send_timeout_s)

    # -- put -------------------------------------------------------------------------
    async def _put(self, conn: Connection[Any], msg: PutObject) -> None:
        if self._puts >= self.config.puts_inflight_max:
            raise _Refused("busy", f"puts_inflight_max {self.config.puts_inflight_max}", close=True)
        if not 0 < msg.chunk_bytes <= self.config.chunk_bytes_max:
            raise _Refused(
                "invalid", f"chunk_bytes must be in 1..{self.config.chunk_bytes_max}", close=True
            )
        self._puts += 1
        try:
            writer = self._begin(msg)
            with writer:
                local = msg.local_ok and self.config.short_circuit and same_host(conn.writer)
                if msg.local_ok:
                    path = os.path.abspath(writer.tmp_path) if local else ""
                    conn.send_nowait(PutLocal(msg.oid, path))
                    await self._drain(conn)
                if local:
                    await self._await_local_write(conn, writer)
                    verify = self.config.verify_local_puts
                    await asyncio.to_thread(writer.commit_local, verify)
                else:
                    await self._receive_chunks(conn, writer)
                    await asyncio.to_thread(writer.commit)
        except ObjectCorrupt as exc:  # a short-circuit put's file failed its checks
            raise _Refused("corrupt", str(exc), close=True) from exc
        except (ChunkCorrupt, ObjectConflict) as exc:
            kind: DataErrorKind = "corrupt" if isinstance(exc, ChunkCorrupt) else "invalid"
            raise _Refused(kind, str(exc), close=True) from exc
        except StorageFull as exc:  # the disk filled up under a reservation
            raise _Refused("full", str(exc), close=True) from exc
        except ValueError as exc:
            raise _Refused("invalid", str(exc), close=True) from exc
        finally:
            self._puts -= 1
        conn.send_nowait(PutDone(msg.oid))
        await self._drain(conn)

    def _begin(self, msg: PutObject) -> ObjectWriter:
        try:
            return self.store.begin_put(
                msg.oid, msg.size, msg.chunk_bytes, msg.crc, fsync=msg.fsync
            )
        except (StorageFull, LimitExceeded) as exc:
            raise _Refused("full", str(exc), close=True) from exc

    async def _await_local_write(self, conn: Connection[Any], writer: ObjectWriter) -> None:
        """Wait for the client's ``LocalWritten``: it wrote the file (it closes the
        connection instead if it could not: the put is then dropped)."""
        timeout = self.config.chunk_timeout_s + writer.size / self.config.local_put_bytes_per_s_min
        msg = await asyncio.wait_for(self._recv_wire(conn), timeout)
        if not isinstance(msg, LocalWritten) or msg.oid != writer.oid:
            raise ValueError(f"expected LocalWritten of {writer.oid}, got {type(msg).__name__}")

    async def _recv_wire(self, conn: Connection[Any]) -> ObjectWireMessage:
        """The next message of an object conversation, a chunk's data as a view into its
        frame (the connection's own codec would copy it). Same frame bound."""
        frame = await read_frame(conn.reader, conn.config.frame_bytes_max)
        try:
            return _WIRE_DECODER.decode(frame)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ProtocolError(f"undecodable message: {exc}") from exc

    async def _receive_chunks(self, conn: Connection[Any], writer: ObjectWriter) -> None:
        """Receive the chunks, writing one batch in a thread while the next arrives."""
        writing: asyncio.Future[None] | None = None
        batch: list[ChunkView] = []
        batched = 0
        try:
            for index in range(writer.chunks):
                msg = await asyncio.wait_for(self._recv_wire(conn), self.config.chunk_timeout_s)
                if not isinstance(msg, ChunkView):
                    raise ValueError(f"expected a Chunk of {writer.oid}, got {type(msg).__name__}")
                expect = min(writer.chunk_bytes, writer.size - index * writer.chunk_bytes)
                if msg.index != index or len(msg.data) != expect:  # refused now, not a batch later
                    raise ValueError(
                        f"chunk {msg.index} of {writer.oid} ({len(msg.data)} bytes): "
                        f"expected chunk {index} of {expect} bytes"
                    )
                batch.append(msg)
                batched += len(msg.data)
                if batched >= self.config.io_batch_bytes or index == writer.chunks - 1:
                    if writing is not None:
                        await writing
                    writing = asyncio.ensure_future(asyncio.to_thread(_write_batch, writer, batch))
                    batch, batched = [], 0
            if writing is not None:
                await writing
        finally:
            # Never leave a thread writing to a file the caller is about to abort.
            if writing is not None and not writing.done():
                await asyncio.wait([writing])
            if writing is not None and writing.done() and not writing.cancelled():
                writing.exception()  # retrieved: the caller reports its own error

    # -- get -------------------------------------------------------------------------
    async def _get(self, conn: Connection[Any], msg: GetObject) -> None:
        if self._gets >= self.config.gets_inflight_max:
            raise _Refused(
                "busy", f"gets_inflight_max {self.config.gets_inflight_max}", close=False
            )
        try:
            check_oid(msg.oid)
        except ValueError as exc:
            raise _Refused("invalid", str(exc), close=True) from exc
        self._gets += 1
        try:
            reader = await self._open(msg.oid)
            with reader:
                first, end = self._span(reader, msg)
                local = msg.local_ok and self.config.short_circuit and same_host(conn.writer)
                path = os.path.abspath(reader.path) if local else ""
                header = ObjectHeader(msg.oid, reader.size, reader.chunk_bytes, reader.crc, path)
                conn.send_nowait(header)
                per = max(1, self.config.io_batch_bytes // reader.chunk_bytes)
                for start in range(first, first if local else end, per):
                    await self._send_chunks(conn, reader, start, min(end, start + per))
                await self._drain(conn)
        finally:
            self._gets -= 1

    def _span(self, reader: ObjectReader, msg: GetObject) -> tuple[int, int]:
        if not 0 <= msg.first <= reader.chunks:
            raise _Refused(
                "invalid", f"first chunk {msg.first} outside 0..{reader.chunks}", close=True
            )
        end = reader.chunks if msg.count < 0 else min(reader.chunks, msg.first + msg.count)
        return msg.first, end

    async def _open(self, oid: str) -> ObjectReader:
        try:
            return await asyncio.to_thread(self.store.open_object, oid)
        except ObjectMissing as exc:
            raise _Refused("missing", str(exc), close=False) from exc
        except ObjectCorrupt as exc:
            self._corrupt(oid, exc)
            raise _Refused("corrupt", str(exc), close=False) from exc

    async def _send_chunks(
        self, conn: Connection[Any], reader: ObjectReader, start: int, stop: int
    ) -> None:
        """Read chunks ``start .. stop - 1`` in a thread and send them; a corrupt one is
        reported and ends the get after the good ones before it were sent."""
        chunks, error = await asyncio.to_thread(_read_batch, reader, start, stop)
        for index, (crc, data) in enumerate(chunks, start):
            self._send_chunk(conn, index, crc, data)
            await self._drain(conn)
        if error is not None:
            self._corrupt(reader.oid, error)
            raise _Refused("corrupt", str(error), close=False) from error

    def _send_chunk(self, conn: Connection[Any], index: int, crc: int, data: bytes) -> None:
        write_chunk_frame(conn, index, crc, data)

    def _corrupt(self, oid: str, exc: ObjectCorrupt) -> None:
        log.warning("deleting corrupt replica: %s", exc)
        self.store.delete(oid)
        self.on_corrupt(oid)

    # -- delete ----------------------------------------------------------------------
    async def _delete(self, conn: Connection[Any], msg: DeleteObjects) -> None:
        if len(msg.oids) > self.config.delete_oids_max:
            raise _Refused(
                "invalid", f"over delete_oids_max {self.config.delete_oids_max}", close=True
            )
        try:
            for oid in msg.oids:
                check_oid(oid)
        except ValueError as exc:
            raise _Refused("invalid", str(exc), close=True) from exc
        for oid in msg.oids:
            self.store.delete(oid)
        conn.send_nowait(DataOk())
        await self._drain(conn)


def write_chunk_frame(
    conn: Connection[Any], index: int, crc: int, data: bytes | bytearray | memoryview
) -> None:
    """Queue ``Chunk(index, crc, data)`` as ``conn.send_nowait`` would, without encoding
    the data into a message and a frame: its frame head, then the data itself."""
    head = chunk_frame_head(index, crc, len(data))
    if len(head) - 4 + len(data) > conn.config.frame_bytes_max:
        raise FrameTooLarge(f"chunk frame over the bound {conn.config.frame_bytes_max}")
    if not conn.writer.is_closing():  # else dropped, as Connection.send_nowait does
        conn.writer.write(head)
        conn.writer.write(data)


def _write_batch(writer: ObjectWriter, chunks: list[ChunkView]) -> None:
    for chunk in chunks:
        writer.write_chunk(chunk.index, chunk.crc, chunk.data)


def _read_batch(
    reader: ObjectReader, start: int, stop: int
) -> tuple[list[tuple[int, bytes]], ObjectCorrupt | None]:
    out: list[tuple[int, bytes]] = []
    for index in range(start, stop):
        try:
            out.append(reader.read_chunk(index))
        except ObjectCorrupt as exc:
            return out, exc
    return out, None


async def scrub_loop(
    store: ObjectStore,
    bytes_per_s: float,
    interval_s: float,
    on_corrupt: OnCorrupt = _ignore_corrupt,
) -> None:
    """Re-verify every object forever at about ``bytes_per_s``; delete and report damage.

    Runs until cancelled; one pass over the store, then ``interval_s`` of rest.
    Each chunk is read in a worker thread, so a pass never blocks the loop.
    """
    if bytes_per_s <= 0 or interval_s < 0:
        raise ValueError("bytes_per_s must be > 0 and interval_s >= 0")
    while True:
        for oid in list(store.oids()):
            if not await _scrub_one(store, oid, bytes_per_s):
                log.warning("scrub: deleted corrupt replica of %s", oid)
                on_corrupt(oid)
        await asyncio.sleep(interval_s)


async def _scrub_one(store: ObjectStore, oid: str, bytes_per_s: float) -> bool:
    """Verify ``oid`` chunk by chunk, sleeping to keep the rate; False if it was corrupt."""
    try:
        reader = await asyncio.to_thread(store.open_object, oid)
    except ObjectMissing:
        return True  # deleted since the listing: nothing to check
    except ObjectCorrupt:
        store.delete(oid)
        return False
    with reader:
        for index in range(reader.chunks):
            started = time.monotonic()
            try:
                await asyncio.to_thread(reader.read_chunk, index)
            except ObjectCorrupt:
                store.delete(oid)
                return False
            budget = reader.chunk_length(index) / bytes_per_s
            await asyncio.sleep(max(0.0, budget - (time.monotonic() - started)))
    return True
