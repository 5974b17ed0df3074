"""The data plane over real loopback sockets: puts, gets with mid-stream failover, refusals."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from helpers import wait_until_async
from lepton_ai.errors import DataLost, StorageFull
from lepton_ai.node.node_net import node_wire_config
from lepton_ai.storage.checksum import crc32c
from lepton_ai.storage.dataclient import (
    DataClient,
    DataClientConfig,
    DataRequestFailed,
    PutFailed,
    TargetFull,
)
from lepton_ai.storage.dataserver import DataServerConfig, ObjectServer, scrub_loop
from lepton_ai.storage.messages import (
    Chunk,
    DataError,
    DataOk,
    DeleteObjects,
    GetObject,
    ObjectHeader,
    ObjectMessage,
    PutDone,
    PutObject,
)
from lepton_ai.storage.objects import ObjectStore, ObjectStoreConfig, file_bytes
from lepton_ai.wire import Codec, Connection, bound_port, connect, generate_token, serve

TOKEN = generate_token()
CODEC = Codec[ObjectMessage](ObjectMessage)
CB = 1024
FAST = ObjectStoreConfig(capacity_bytes=1 << 30, fsync=False)


def oid() -> str:
    return uuid.uuid4().hex


def run(coro: Awaitable[Any], timeout: float = 30.0) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


SendChunk = Callable[[Connection[Any], int, int, bytes], None]
# Given the server's chunk sender, the one a new connection uses instead.
Tamper = Callable[[SendChunk], SendChunk]
# The streaming data plane alone (short-circuit reads and writes of files off).
STREAM = DataClientConfig(short_circuit=False)


@dataclass
class Node:
    store: ObjectStore
    server: ObjectServer
    listener: asyncio.Server
    address: str
    seen: list[object] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    connections: int = 0
    tamper: Tamper | None = None
    hooks: dict[Connection[Any], SendChunk] = field(default_factory=dict)
    open_conns: set[Connection[Any]] = field(default_factory=set)
    handlers: set[asyncio.Future[None]] = field(default_factory=set)

    async def stop(self) -> None:
        """Close the listener and every server-side connection; wait for the handlers."""
        self.listener.close()
        for conn in self.open_conns:
            conn.writer.close()
        if self.handlers:
            await asyncio.wait(self.handlers, timeout=5)


async def start_node(
    root: Path,
    store_config: ObjectStoreConfig = FAST,
    server_config: DataServerConfig | None = None,
) -> Node:
    store = ObjectStore(root, store_config)
    node = Node(store, ObjectServer(store, server_config), None, "")  # type: ignore[arg-type]
    node.server.on_corrupt = node.corrupt.append
    send_chunk = node.server._send_chunk

    def hooked(conn: Connection[Any], index: int, crc: int, data: bytes) -> None:
        node.hooks.get(conn, send_chunk)(conn, index, crc, data)

    node.server._send_chunk = hooked  # type: ignore[method-assign]

    async def handler(conn: Connection[ObjectMessage]) -> None:
        node.connections += 1
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        node.handlers.add(done)
        node.open_conns.add(conn)
        if node.tamper is not None:
            node.hooks[conn] = node.tamper(send_chunk)
        try:
            async for msg in conn:
                node.seen.append(msg)
                if not await node.server.handle(conn, msg):
                    return
        finally:
            node.open_conns.discard(conn)
            done.set_result(None)

    node.listener = await serve(
        "127.0.0.1", 0, token=TOKEN, codec=CODEC, handler=handler, config=node_wire_config()
    )
    node.address = f"127.0.0.1:{bound_port(node.listener)}"
    return node


@asynccontextmanager
async def nodes(tmp_path: Path, n: int, **kwargs: Any) -> AsyncIterator[list[Node]]:
    started = [await start_node(tmp_path / f"node{i}", **kwargs) for i in range(n)]
    try:
        yield started
    finally:
        for node in started:
            await node.stop()


async def raw(node: Node) -> Connection[ObjectMessage]:
    host, port = node.address.rsplit(":", 1)
    return await connect(host, int(port), token=TOKEN, codec=CODEC, config=node_wire_config())


def stop_after_chunks(k: int) -> Tamper:
    """The server's connection is torn down when it tries to send chunk ``k`` of a stream."""

    def tamper(send: SendChunk) -> SendChunk:
        sent = [0]

        def hook(conn: Connection[Any], index: int, crc: int, data: bytes) -> None:
            if sent[0] >= k:
                conn.writer.transport.abort()
                return
            sent[0] += 1
            send(conn, index, crc, data)

        return hook

    return tamper


def flip_in_transit(index: int) -> Tamper:
    """Chunk ``index`` leaves the server with a flipped byte (its crc unchanged)."""

    def tamper(send: SendChunk) -> SendChunk:
        def hook(conn: Connection[Any], i: int, crc: int, data: bytes) -> None:
            if i == index:
                damaged = bytearray(data)
                damaged[0] ^= 0xFF
                data = bytes(damaged)
            send(conn, i, crc, data)

        return hook

    return tamper


def flip_on_disk(store: ObjectStore, o: str, chunk: int, chunk_bytes: int = CB) -> None:
    path = store.path(o)
    raw_bytes = bytearray(path.read_bytes())
    with store.open_object(o) as r:
        data_start = len(raw_bytes) - r.size
    raw_bytes[data_start + chunk * chunk_bytes + 3] ^= 0x40
    path.write_bytes(bytes(raw_bytes))


# -- round trips -----------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, CB, 37 * CB + 5])
def test_put_to_two_and_get_back(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    o = oid()

    async def go() -> None:
        async with nodes(tmp_path, 2) as (a, b):
            client = DataClient(TOKEN)
            ok, errors = await client.put(o, data, [a.address, b.address], CB)
            assert ok == [a.address, b.address] and errors == {}
            for node in (a, b):
                assert node.store.read_all(o) == data
                assert await client.get(o, [node.address]) == data
            if size > CB:
                assert await client.get_range(o, [a.address], 1, 2) == data[CB : 3 * CB]
                chunks = [c async for c in client.iter_chunks(o, [b.address], 1)]
                assert b"".join(chunks) == data[CB:]
            await client.close()

    run(go())


def test_64_mib_round_trip(tmp_path: Path) -> None:
    data = os.urandom(64 << 20)
    o = oid()

    async def go() -> None:
        async with nodes(tmp_path, 2) as (a, b):
            client = DataClient(TOKEN)
            result = await client.put(o, data, [a.address, b.address], 1 << 20)
            result.require(2)
            assert await client.get(o, [b.address, a.address]) == data
            await client.close()

    run(go(), 60)


def test_connections_are_reused(tmp_path: Path) -> None:
    o = oid()

    async def go() -> None:
        async with nodes(tmp_path, 1) as (a,):
            client = DataClient(TOKEN)
            await client.put(o, b"x" * 5000, [a.address], CB)
            for _ in range(5):
                assert await client.get(o, [a.address]) == b"x" * 5000
            await client.delete([o], a.address)
            assert a.connections == 1
            await client.close()

    run(go())


# -- failover and loss -----------------------------------------------------------------


def test_get_fails_over_mid_stream_when_a_server_dies(tmp_path: Path) -> None:
    data = os.urandom(20 * CB + 11)
    o = oid()

    async def go() -> None:
        async with nodes(tmp_path, 2) as (a, b):
            client = DataClient(TOKEN)
            (await client.put(o, data, [a.address, b.address], CB)).require(2)
            a.tamper = stop_after_chunks(3)  # new connections only: a fresh client
            client = DataClient(TOKEN, STREAM)
            assert await client.get(o, [a.address, b.address]) == data
            gets = [m for m in b.seen if isinstance(m, GetObject)]
            assert gets == [GetObject(o, 3)]  # went on from chunk 3, not from 0
            await client.close()

    run(go())


def test_get_fails_over_on_a_chunk_corrupt_on_disk(tmp_path: Path) -> None:
    data = os.urandom(10 * CB)
    o = oid()

    async def go() -> None:
        async with nodes(tmp_path, 2) as (a, b):
            client = DataClient(TOKEN, STREAM)
            (await client.put(o, data, [a.address, b.address], CB)).require(2)
            flip_on_disk(a.store, o, 4)
            assert await client.get(o, [a.address, b.address]) == data
            assert [m for m in b.seen if isinstance(m, GetObject)] == [GetObject(o, 4)]
            assert a.corrupt == [o]  # reported, and the bad replica deleted
            assert not a.store.has(o)
            # The connection to A ended cleanly ("corrupt" is an answer): A still serves.
            assert await client.get(o, [a.address, b.address]) == data
            await client.close()

    run(go())


def test_get_fails_over_on_a_chunk_damaged_in_transit(tmp_path: Path) -> None:
    data = os.urandom(10 * CB)
    o = oid()

    async def go() -> None:
        async with nodes(tmp_path, 2) as (a, b):
            client = DataClient(TOKEN)
            (await client.put(o, data, [a.address, b.address], CB)).require(2)
            a.tamper = flip_in_transit(2)
            client = DataClient(TOKEN, STREAM)
            got = b"".join([c async for c in client.iter_chunks(o, [a.address, b.address])])
            assert got == data
            assert [m for m in b.seen if isinstance(m, GetObject)] == [GetObject(o, 2)]
            assert a.store.has(o)  # the disk copy is fine
            await client.close()

    run(go())


def test_data_lost_names_every_source(tmp_path: Path) -> None:
    data = os.urandom(6 * CB)
    o = oid()

    async def go() -> None:
        async with nodes(tmp_path, 3) as (a, b, c):
            client = DataClient(TOKEN)
            (await client.put(o, data, [b.address, c.address], CB)).require(2)
            flip_on_disk(b.store, o, 0)
            await c.stop()
            dead = c.address
            with pytest.raises(DataLost) as info:
                await client.get(o, [a.address, b.address, dead])
            text = str(info.value)
            assert o in text
            assert f"{a.address}: missing" in text
            assert f"{b.address}: " in text and "corrupt" in text
            assert dead in text
            with pytest.raises(DataLost, match="no sources"):
                await client.get(o, [])
            await client.close()

    run(go())


# -- refusals --------------------------------------------------------------------------


def test_put_to_a_full_target_stores_elsewhere_and_keeps_state(tmp_path: Path) -> None:
    data = os.urandom(64 * CB)
    old, new = oid(), oid()

    async def go() -> None:
        small = ObjectStoreConfig(capacity_bytes=file_bytes(len(data), CB) + 100, fsync=False)
        full = await start_node(tmp_path / "full", store_config=small)
        async with nodes(tmp_path, 1) as (roomy,):
            client = DataClient(TOKEN)
            (await client.put(old, data, [full.address], CB)).require(1)
            used = full.store.used_bytes
            result = await client.put(new, data, [full.address, roomy.address], CB)
            assert result.ok == [roomy.address]
            err = result.errors[full.address]
            assert isinstance(err, TargetFull) and isinstance(err, StorageFull)
            assert str(small.capacity_bytes) in str(err)
            with pytest.raises(StorageFull):
                result.require(2)
            assert full.store.used_bytes == used and full.store.reserved_bytes == 0
            assert not full.store.has(new)
            assert list(full.store.oids()) == [old]
            assert await client.get(old, [full.address]) == data
            await client.close()
        await full.stop()

    run(go())


def test_busy_when_puts_inflight_max_reached(tmp_path: Path) -> None:
    o = oid()

    async def go() -> None:
        async with nodes(tmp_path, 1, server_config=DataServerConfig(puts_inflight_max=1)) as (a,):
            hold = await raw(a)
            await hold.send(PutObject(oid(), 3 * CB, CB, 0))
            await hold.send(Chunk(0, crc32c(bytes(CB)), bytes(CB)))
            client = DataClient(TOKEN)
            result = await client.put(o, b"z" * 100, [a.address], CB)
            assert result.ok == [] and result.errors[a.address].kind == "busy"
            with pytest.raises(PutFailed):
                result.require(1)
            await hold.close()
            await wait_until_async(
                lambda: a.store.reserved_bytes == 0, 5.0, "the server noticed the dropped put"
            )
            (await client.put(o, b"z" * 100, [a.address], CB)).require(1)
            await client.close()

    run(go())


BIG = bytes((16 << 20) + 1)


@pytest.mark.parametrize(
    "conversation",
    [
        [PutObject("not-an-oid", 10, CB, 0)],
        [PutObject("ab" * 16, 10, 0, 0)],
        [PutObject("ab" * 16, 10, (16 << 20) + 1, 0)],
        [PutObject("ab" * 16, 3 * CB, CB, 0), Chunk(1, 0, bytes(CB))],
        [PutObject("ab" * 16, 3 * CB, CB, 0), Chunk(0, crc32c(BIG), BIG)],
        [PutObject("ab" * 16, 3 * CB, CB, 0), GetObject("ab" * 16)],
        [GetObject("../../etc/passwd")],
        [DeleteObjects(["x"])],
        [Chunk(0, 0, b"stray")],
        [PutDone("ab" * 16)],
    ],
)
def test_malformed_requests_are_invalid_and_change_nothing(
    tmp_path: Path, conversation: list[Any]
) -> None:
    data = os.urandom(5 * CB)
    o = oid()

    async def go() -> None:
        async with nodes(tmp_path, 1) as (a,):
            client = DataClient(TOKEN)
            (await client.put(o, data, [a.address], CB)).require(1)
            before = (sorted(a.store.oids()), a.store.used_bytes)
            conn = await raw(a)
            for msg in conversation:
                conn.send_nowait(msg)
            answer = await asyncio.wait_for(conn.recv(), 5)
            assert isinstance(answer, DataError) and answer.kind == "invalid"
            with pytest.raises(Exception, match="closed"):  # and the connection is closed
                await asyncio.wait_for(conn.recv(), 5)
            assert (sorted(a.store.oids()), a.store.used_bytes) == before
            assert a.store.reserved_bytes == 0
            assert not list((a.store.root / "tmp").iterdir())
            assert await client.get(o, [a.address]) == data  # the server still serves
            await client.close()

    run(go())


def test_get_missing_is_an_answer_and_keeps_the_connection(tmp_path: Path) -> None:
    async def go() -> None:
        async with nodes(tmp_path, 1) as (a,):
            conn = await raw(a)
            await conn.send(GetObject(oid()))
            answer = await conn.recv()
            assert isinstance(answer, DataError) and answer.kind == "missing"
            await conn.send(DeleteObjects([oid()]))
            assert await conn.recv() == DataOk()
            await conn.close()

    run(go())


def test_get_range_and_header(tmp_path: Path) -> None:
    data = os.urandom(8 * CB)
    o = oid()

    async def go() -> None:
        async with nodes(tmp_path, 1) as (a,):
            client = DataClient(TOKEN)
            await client.put(o, data, [a.address], CB)
            conn = await raw(a)
            await conn.send(GetObject(o, 6, 5))
            assert await conn.recv() == ObjectHeader(o, len(data), CB, crc32c(data))
            got = [await conn.recv() for _ in range(2)]
            assert [c.index for c in got if isinstance(c, Chunk)] == [6, 7]
            await conn.close()
            assert await client.get_range(o, [a.address], 8) == b""
            await client.close()

    run(go())


def test_delete(tmp_path: Path) -> None:
    oids = [oid() for _ in range(3)]

    async def go() -> None:
        async with nodes(tmp_path, 1) as (a,):
            client = DataClient(TOKEN, DataClientConfig(delete_batch_max=2))
            for o in oids:
                await client.put(o, b"abc", [a.address], CB)
            await client.delete([*oids, oid()], a.address)
            assert list(a.store.oids()) == [] and a.store.used_bytes == 0
            with pytest.raises(ValueError):
                await client.delete(["nope"], a.address)
            await client.close()
            dead = DataClient(TOKEN)
            with pytest.raises(DataRequestFailed, match="unreachable"):
                await dead.delete(oids, "127.0.0.1:1")

    run(go())


# -- replication helpers and scrubbing --------------------------------------------------


def test_fetch_to_store_and_put_from_store(tmp_path: Path) -> None:
    data = os.urandom(9 * CB + 1)
    o = oid()

    async def go() -> None:
        async with nodes(tmp_path, 2) as (a, b):
            client = DataClient(TOKEN)
            (await client.put(o, data, [a.address], CB)).require(1)
            local = ObjectStore(tmp_path / "local", FAST)
            header = await client.fetch_to_store(o, [b.address, a.address], local)
            assert header.size == len(data) and local.read_all(o) == data
            (await client.put_from_store(local, o, [b.address])).require(1)
            assert b.store.read_all(o) == data
            src = tmp_path / "file.bin"
            src.write_bytes(data)
            o2 = oid()
            (await client.put_file(o2, src, [a.address, b.address], CB)).require(2)
            assert await client.get(o2, [b.address]) == data
            await client.close()

    run(go())


def test_scrub_loop_deletes_and_reports_corrupt_replicas(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path, FAST)
    good, bad = oid(), oid()
    store.put_bytes(good, os.urandom(4 * CB), CB)
    store.put_bytes(bad, os.urandom(4 * CB), CB)
    flip_on_disk(store, bad, 2)
    reported: list[str] = []

    async def go() -> None:
        task = asyncio.create_task(scrub_loop(store, 100e6, 0.01, reported.append))
        await wait_until_async(lambda: reported, 10.0, "the scrubber reported the bad copy")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(go(), 10)
    assert reported == [bad]
    assert store.has(good) and not store.has(bad)


def test_a_big_put_refused_at_once_gets_its_answer_quickly(tmp_path: Path) -> None:
    """The client stops streaming at the early answer; the linger keeps it from a reset."""
    data = bytes(32 << 20)
    o = oid()

    async def go() -> float:
        tiny = ObjectStoreConfig(capacity_bytes=1 << 20, fsync=False)
        async with nodes(tmp_path, 1, store_config=tiny) as (a,):
            client = DataClient(TOKEN)
            started = asyncio.get_running_loop().time()
            result = await client.put(o, data, [a.address], 1 << 20)
            took = asyncio.get_running_loop().time() - started
            assert result.ok == [] and isinstance(result.errors[a.address], TargetFull)
            assert sum(1 for m in a.seen if isinstance(m, Chunk)) == 0
            (await client.put(o, b"small", [a.address], 1 << 20)).require(1)
            await client.close()
            return took

    assert run(go()) < 1.0


# -- short-circuit: a client on the node's host reads and writes the object files ------


def count_chunks_sent(counter: list[int]) -> Tamper:
    def tamper(send: SendChunk) -> SendChunk:
        def hook(conn: Connection[Any], index: int, crc: int, data: bytes) -> None:
            counter[0] += 1
            send(conn, index, crc, data)

        return hook

    return tamper


def no_temporaries(node: Node) -> bool:
    return not list((node.store.root / "tmp").iterdir()) and node.store.reserved_bytes == 0


async def settled(node: Node) -> bool:
    """The server dropped every put in progress (it notices a closed connection soon)."""
    return await wait_until_async(
        lambda: no_temporaries(node), 5.0, "no temporaries and nothing reserved"
    )


def test_chunk_frame_head_is_msgspecs_encoding() -> None:
    from lepton_ai.storage.messages import chunk_frame_head
    from lepton_ai.wire import encode, encode_frame

    for n in (0, 1, 255, 256, 65535, 65536, 1 << 20):
        data = os.urandom(n)
        assert chunk_frame_head(9, 123456789, n) + data == encode_frame(
            encode(Chunk(9, 123456789, data))
        )


@pytest.mark.parametrize("size", [0, 1, CB, 37 * CB + 5])
def test_short_circuit_put_and_get(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    o = oid()
    sent = [0]

    async def go() -> None:
        async with nodes(tmp_path, 2) as (a, b):
            a.tamper = b.tamper = count_chunks_sent(sent)
            client = DataClient(TOKEN)
            (await client.put(o, data, [a.address, b.address], CB)).require(2)
            for node in (a, b):
                assert [m for m in node.seen if isinstance(m, PutObject)] == [
                    PutObject(o, size, CB, crc32c(data), local_ok=True)
                ]
                assert node.store.read_all(o) == data
                assert no_temporaries(node)
                assert await client.get(o, [node.address]) == data
            if size > CB:
                assert await client.get_range(o, [a.address], 1, 2) == data[CB : 3 * CB]
                chunks = [c async for c in client.iter_chunks(o, [b.address], 1)]
                assert b"".join(chunks) == data[CB:]
            gets = [m for m in a.seen if isinstance(m, GetObject)]
            assert gets and all(m.local_ok for m in gets)
            assert sent == [0]  # no chunk went over a socket
            assert a.connections == 1  # the short-circuit conversations keep the connection
            await client.close()

    run(go())


def test_short_circuit_get_of_a_corrupt_file_streams_from_that_node(tmp_path: Path) -> None:
    """The local read stops at the bad chunk; the same node is asked to stream from it,
    finds the damage itself (deleted, reported), and the next replica serves the rest."""
    data = os.urandom(10 * CB)
    o = oid()

    async def go() -> None:
        async with nodes(tmp_path, 2) as (a, b):
            client = DataClient(TOKEN)
            (await client.put(o, data, [a.address, b.address], CB)).require(2)
            flip_on_disk(a.store, o, 4)
            assert await client.get(o, [a.address, b.address]) == data
            assert [m for m in a.seen if isinstance(m, GetObject)] == [
                GetObject(o, 0, local_ok=True),
                GetObject(o, 4, local_ok=False),
            ]
            assert [m for m in b.seen if isinstance(m, GetObject)] == [
                GetObject(o, 4, local_ok=True)
            ]
            assert a.corrupt == [o] and not a.store.has(o)
            # Chunks read one by one (iter_chunks, fetch_to_store) take the same path.
            flip_on_disk(b.store, o, 7)
            local = ObjectStore(tmp_path / "local", FAST)
            with pytest.raises(DataLost, match="corrupt"):
                await client.fetch_to_store(o, [b.address], local)
            assert b.corrupt == [o] and not local.has(o) and local.reserved_bytes == 0
            await client.close()

    run(go())


def test_short_circuit_get_of_a_vanished_file_falls_back(tmp_path: Path) -> None:
    data = os.urandom(6 * CB + 3)
    o = oid()

    async def go() -> None:
        async with nodes(tmp_path, 2) as (a, b):
            client = DataClient(TOKEN)
            (await client.put(o, data, [a.address, b.address], CB)).require(2)
            opened = a.server._open

            async def vanish(oid_: str) -> Any:
                reader = await opened(oid_)
                os.unlink(reader.path)  # gone once the server has answered with its path
                return reader

            a.server._open = vanish  # type: ignore[method-assign]
            assert await client.get(o, [a.address, b.address]) == data
            assert [m.local_ok for m in a.seen if isinstance(m, GetObject)] == [True, False]
            assert [m.local_ok for m in b.seen if isinstance(m, GetObject)] == [True]
            with pytest.raises(DataLost) as info:
                await client.get(o, [a.address])
            assert "missing" in str(info.value)
            await client.close()

    run(go())


def test_short_circuit_put_refused_when_full(tmp_path: Path) -> None:
    data = os.urandom(64 * CB)
    o = oid()

    async def go() -> None:
        small = ObjectStoreConfig(capacity_bytes=file_bytes(len(data), CB) - 1, fsync=False)
        full = await start_node(tmp_path / "full", store_config=small)
        async with nodes(tmp_path, 1) as (roomy,):
            client = DataClient(TOKEN)
            result = await client.put(o, data, [full.address, roomy.address], CB)
            assert result.ok == [roomy.address]
            assert isinstance(result.errors[full.address], TargetFull)
            assert await settled(full) and not full.store.has(o) and full.store.used_bytes == 0
            assert roomy.store.read_all(o) == data
            await client.close()
        await full.stop()

    run(go())


def test_short_circuit_put_streams_when_the_file_cannot_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lepton_ai.storage import dataclient

    data = os.urandom(5 * CB + 1)
    o = oid()

    def refuse(path: str, *args: Any, **kwargs: Any) -> None:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(dataclient, "write_object_file", refuse)

    async def go() -> None:
        async with nodes(tmp_path, 1) as (a,):
            client = DataClient(TOKEN)
            (await client.put(o, data, [a.address], CB)).require(1)
            puts = [m for m in a.seen if isinstance(m, PutObject)]
            assert [p.local_ok for p in puts] == [True, False]  # then streamed, anew
            assert a.store.read_all(o) == data and await settled(a)
            await client.close()

    run(go())


def test_short_circuit_put_of_a_bad_file_is_refused_and_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lepton_ai.storage import dataclient

    data = os.urandom(3 * CB)
    o = oid()

    def garbage(path: str, *args: Any, **kwargs: Any) -> None:
        with open(path, "r+b") as f:
            f.write(b"LOBJ but not an object")

    monkeypatch.setattr(dataclient, "write_object_file", garbage)

    async def go() -> None:
        async with nodes(tmp_path, 1) as (a,):
            client = DataClient(TOKEN)
            result = await client.put(o, data, [a.address], CB)
            assert result.ok == [] and result.errors[a.address].kind == "corrupt"
            assert not a.store.has(o) and await settled(a)
            await client.close()

    run(go())


def test_short_circuit_off_at_the_server_streams(tmp_path: Path) -> None:
    """A node that does not serve short-circuit (or sees another host) answers
    ``PutLocal("")`` and a header without a path: the chunks are streamed."""
    data = os.urandom(4 * CB + 7)
    o = oid()
    sent = [0]

    async def go() -> None:
        config = DataServerConfig(short_circuit=False)
        async with nodes(tmp_path, 1, server_config=config) as (a,):
            a.tamper = count_chunks_sent(sent)
            client = DataClient(TOKEN)
            (await client.put(o, data, [a.address], CB)).require(1)
            assert a.store.read_all(o) == data
            assert await client.get(o, [a.address]) == data
            assert sent == [5]
            await client.close()

    run(go())
