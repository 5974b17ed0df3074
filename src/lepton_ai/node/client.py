"""A blocking client for the coordinator, for user code and the CLI.

User code is synchronous (``job.result()``), so the client runs its own event
loop in a daemon thread and hands requests to it. Connections are pooled: a
long-poll (``WaitJob``) on one does not block a ``status()`` on another.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from dataclasses import dataclass, field

from lepton_ai.errors import LeptonError, Unavailable
from lepton_ai.node.messages import ClientReply, CoordinatorMessage, ErrorReply
from lepton_ai.node.netutil import node_wire_config, parse_address
from lepton_ai.wire import Codec, Connection, ConnectionClosed, WireConfig, connect

_CODEC = Codec[ClientReply](ClientReply)


@dataclass(frozen=True)
class ClientConfig:
    request_timeout_s: float = 30.0
    idle_connections_max: int = 8
    retries_max: int = 3
    retry_backoff_s: float = 0.1
    wire: WireConfig = field(default_factory=lambda: node_wire_config(connect_timeout_s=2.0))


class CoordinatorClient:
    def __init__(self, addresses: str, token: str, config: ClientConfig | None = None) -> None:
        self.addresses = [parse_address(a.strip()) for a in addresses.split(",") if a.strip()]
        if not self.addresses:
            raise ValueError("no coordinator address given")
        if not token:
            raise ValueError("a cluster token is required")
        self.token = token
        self.config = config or ClientConfig()
        self._idle: list[Connection[ClientReply]] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, daemon=True, name="lepton-client"
        )
        self._thread.start()
        self._closed = False

    def request(self, msg: CoordinatorMessage, timeout_s: float | None = None) -> ClientReply:
        """Send one request and wait for its reply; ``Unavailable`` if nobody answers."""
        if self._closed:
            raise Unavailable("client is closed")
        limit = timeout_s if timeout_s is not None else self.config.request_timeout_s
        fut = asyncio.run_coroutine_threadsafe(self._request(msg, limit), self._loop)
        try:
            return fut.result(limit + 5.0)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise Unavailable(f"no answer from the coordinator within {limit:.1f} s") from None

    async def _request(self, msg: CoordinatorMessage, timeout_s: float) -> ClientReply:
        last: Exception | None = None
        for attempt in range(self.config.retries_max):
            try:
                conn = await self._take()
            except (OSError, TimeoutError, LeptonError) as exc:
                last = exc
                await asyncio.sleep(self.config.retry_backoff_s * (attempt + 1))
                continue
            try:
                await conn.send(msg)
                reply = await asyncio.wait_for(conn.recv(), timeout_s)
            except (ConnectionClosed, ConnectionError, OSError) as exc:
                await conn.close()
                last = exc
                continue
            except BaseException:
                await conn.close()
                raise
            self._give_back(conn)
            return reply
        host, port = self.addresses[0]
        raise Unavailable(f"coordinator {host}:{port} unreachable: {last}")

    async def _take(self) -> Connection[ClientReply]:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
        error: Exception | None = None
        for host, port in self.addresses:
            try:
                return await connect(
                    host, port, token=self.token, codec=_CODEC, config=self.config.wire
                )
            except (OSError, TimeoutError, LeptonError) as exc:
                error = exc
        raise error if error is not None else Unavailable("no address")

    def _give_back(self, conn: Connection[ClientReply]) -> None:
        if len(self._idle) < self.config.idle_connections_max:
            self._idle.append(conn)
        else:
            conn.writer.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        async def shutdown() -> None:
            for conn in self._idle:
                await conn.close()
            self._idle.clear()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(2.0)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(2.0)
        if not self._thread.is_alive():
            self._loop.close()


def check_reply(reply: ClientReply) -> ClientReply:
    """Turn an ``ErrorReply`` into the matching exception."""
    if isinstance(reply, ErrorReply):
        if reply.kind == "invalid":
            raise ValueError(reply.message)
        if reply.kind == "not_found":
            raise KeyError(reply.message)
        raise Unavailable(reply.message)
    return reply
