"""The KV client's connections to the replicas: ``ReplicaConnections``.

At most one connection per replica, made on first use (concurrent callers wait for
the one being made), a reader task per connection that hands each reply to the
request waiting for its ``rid``, and one exchange: send a request, await its reply.
Which replica to ask, and when to retry, is ``client.KvClient``'s business.
"""

from __future__ import annotations

import asyncio
import contextlib

from lepton_ai.consensus.client_messages import ClientMessage, ReplyMessage
from lepton_ai.errors import ProtocolError
from lepton_ai.wire import Codec, Connection, ConnectionClosed, WireConfig, connect

_REPLY_CODEC = Codec[ReplyMessage](ReplyMessage)


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


class ReplicaLink:
    """One connection to one replica and the task reading its replies."""

    def __init__(self, address: str, conn: Connection[ReplyMessage]) -> None:
        self.address = address
        self.conn = conn
        self.rids: set[int] = set()
        self.reader: asyncio.Task[None] | None = None


class ReplicaConnections:
    """One ``ReplicaLink`` per replica address, and the requests awaiting replies."""

    def __init__(self, *, token: str, wire: WireConfig) -> None:
        self._token = token
        self._wire = wire
        self.links: dict[str, ReplicaLink] = {}
        # One connect per address at a time: callers that find no link while one is
        # being made wait for it (two links would leak the loser's reader task).
        self._connecting: dict[str, asyncio.Future[None]] = {}
        self._pending: dict[int, asyncio.Future[ReplyMessage]] = {}
        self.closed = False

    async def close(self) -> None:
        self.closed = True
        for link in list(self.links.values()):
            await self.drop(link)

    async def exchange(
        self, link: ReplicaLink, msg: ClientMessage, rid: int, timeout: float
    ) -> ReplyMessage:
        fut: asyncio.Future[ReplyMessage] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        link.rids.add(rid)
        try:
            link.conn.send_nowait(msg)
            if link.conn.writer.transport.get_write_buffer_size():
                await link.conn.drain()  # only when the socket pushes back
            return await asyncio.wait_for(fut, timeout)
        except (ConnectionClosed, OSError):
            await self.drop(link)
            raise
        finally:
            self._pending.pop(rid, None)
            link.rids.discard(rid)

    async def link(self, address: str) -> ReplicaLink:
        while True:
            link = self.links.get(address)
            if link is not None and not link.conn.closed:
                return link
            pending = self._connecting.get(address)
            if pending is None:
                break
            # Another caller is connecting: wait for it (not for its errors: if it
            # failed, this caller tries for itself).
            await asyncio.wait({pending})
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._connecting[address] = done
        try:
            return await self._connect(address)
        finally:
            del self._connecting[address]
            done.set_result(None)

    async def _connect(self, address: str) -> ReplicaLink:
        host, port = _split(address)
        conn = await connect(host, port, token=self._token, codec=_REPLY_CODEC, config=self._wire)
        link = ReplicaLink(address, conn)
        if self.closed:  # closed while it connected: nobody would close this link
            await conn.close()
            raise ConnectionClosed(f"{address}: client closed")
        self.links[address] = link
        link.reader = asyncio.get_running_loop().create_task(self._read_replies(link))
        return link

    async def _read_replies(self, link: ReplicaLink) -> None:
        try:
            while True:
                msg = await link.conn.recv()
                fut = self._pending.get(msg.rid)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
        except (ConnectionClosed, ProtocolError, OSError) as exc:
            for rid in list(link.rids):
                fut = self._pending.get(rid)
                if fut is not None and not fut.done():
                    fut.set_exception(ConnectionClosed(f"{link.address}: {exc}"))
            if self.links.get(link.address) is link:
                del self.links[link.address]
            await link.conn.close()

    async def drop(self, link: ReplicaLink) -> None:
        if self.links.get(link.address) is link:
            del self.links[link.address]
        await link.conn.close()
        if link.reader is not None and link.reader is not asyncio.current_task():
            link.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await link.reader
