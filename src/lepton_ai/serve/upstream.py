"""A small HTTP/1.1 client with keep-alive pooling, for the balancer's hop to a replica.

Written for this hop rather than using httpx for two reasons: the balancer must
know whether *any* response byte arrived before a failure (only then is a retry
on another replica safe to skip), and the per-request cost is a fraction of a
general client's. It speaks to our own replicas on loopback: Content-Length or
chunked bodies, no TLS, no redirects, every size bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass

from lepton_ai.serve.policy import Outcome

_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"host",
        b"expect",  # the balancer already holds the whole body
    }
)


class UpstreamError(Exception):
    """An attempt failed. ``outcome`` says how; ``retryable`` is True when no byte came back."""

    def __init__(self, outcome: Outcome, retryable: bool, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.retryable = retryable


@dataclass(frozen=True)
class UpstreamResponse:
    status: int
    headers: list[tuple[bytes, bytes]]  # end-to-end headers only
    body: bytes


@dataclass(frozen=True)
class PoolLimits:
    idle_max: int = 64
    idle_s: float = 30.0
    header_bytes_max: int = 64 << 10
    body_bytes_max: int = 16 << 20


def end_to_end(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Drop hop-by-hop headers (and the ones the proxy sets itself).

    Names must be lower-case already, as ASGI servers and ``_read_response`` give them.
    """
    return [(k, v) for k, v in headers if k not in _HOP_BY_HOP]


class _Conn:
    __slots__ = ("idle_since", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class UpstreamPool:
    """Keep-alive connections to one replica (``host:port``)."""

    def __init__(self, host: str, port: int, limits: PoolLimits | None = None) -> None:
        self.host = host
        self.port = port
        self.limits = limits or PoolLimits()
        self._idle: deque[_Conn] = deque()
        self._closed = False

    def close(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().close()

    async def _get(self) -> tuple[_Conn, bool]:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if now - conn.idle_since < self.limits.idle_s and not conn.reader.at_eof():
                return conn, True
            conn.close()
        try:
            reader, writer = await asyncio.open_connection(
                self.host, self.port, limit=self.limits.header_bytes_max
            )
        except ConnectionRefusedError as exc:
            raise UpstreamError(Outcome.REFUSED, True, f"connect refused: {exc}") from exc
        except OSError as exc:
            raise UpstreamError(Outcome.RESET, True, f"connect failed: {exc}") from exc
        return _Conn(reader, writer), False

    def _put(self, conn: _Conn) -> None:
        if self._closed or len(self._idle) >= self.limits.idle_max:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    async def request(
        self,
        method: str,
        path: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        *,
        retry_stale: bool = True,
    ) -> UpstreamResponse:
        """One request. The caller bounds it with a timeout; a timeout closes the connection.

        A reused keep-alive connection that the replica had closed fails without a
        response byte; with ``retry_stale`` that is retried once here on a fresh
        connection, since it says nothing about the replica's health.
        """
        conn, reused = await self._get()
        try:
            return await self._exchange(conn, method, path, headers, body)
        except UpstreamError as exc:
            if not (retry_stale and reused and exc.retryable and exc.outcome is Outcome.RESET):
                raise
        conn, _ = await self._get_fresh()
        return await self._exchange(conn, method, path, headers, body)

    async def _get_fresh(self) -> tuple[_Conn, bool]:
        while self._idle:
            self._idle.pop().close()
        return await self._get()

    async def _exchange(
        self,
        conn: _Conn,
        method: str,
        path: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
    ) -> UpstreamResponse:
        head = [f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n".encode()]
        for k, v in end_to_end(headers):
            head.append(k + b": " + v + b"\r\n")
        head.append(b"Content-Length: %d\r\n\r\n" % len(body))
        got_bytes = False
        try:
            conn.writer.write(b"".join(head) + body)
            await conn.writer.drain()
            status_line = await conn.reader.readline()
            if not status_line:
                raise ConnectionResetError("closed before the status line")
            got_bytes = True
            response = await self._read_response(conn.reader, status_line)
        except asyncio.CancelledError:
            conn.close()  # a timeout mid-exchange: the connection's state is unknown
            raise
        except UpstreamError:
            conn.close()
            raise
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            conn.close()
            kind = "after" if got_bytes else "before"
            # The response is buffered whole before the client sees a byte, so a
            # replica that dies mid-response (SIGKILL between uvicorn's head and body
            # writes) can be retried like one that died before answering. A malformed
            # answer (ValueError, LimitOverrunError) is the replica's fault: not retried.
            cut = isinstance(exc, ConnectionError | asyncio.IncompleteReadError)
            raise UpstreamError(
                Outcome.RESET,
                not got_bytes or cut,
                f"{kind} response bytes: {type(exc).__name__}: {exc}",
            ) from exc
        keep, resp = response
        if keep:
            self._put(conn)
        else:
            conn.close()
        return resp

    async def _read_response(
        self, reader: asyncio.StreamReader, status_line: bytes
    ) -> tuple[bool, UpstreamResponse]:
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise ValueError(f"bad status line {status_line[:80]!r}")
        status = int(parts[1])
        raw = await reader.readuntil(b"\r\n\r\n")
        headers: list[tuple[bytes, bytes]] = []
        length: int | None = None
        chunked = False
        keep = parts[0] == b"HTTP/1.1"
        for line in raw.split(b"\r\n"):
            if not line:
                continue
            name, sep, value = line.partition(b":")
            if not sep:
                raise ValueError(f"bad header line {line[:80]!r}")
            name, value = name.strip().lower(), value.strip()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                keep = keep and value.lower() != b"close"
            headers.append((name, value))
        if chunked:
            body = await self._read_chunked(reader)
        elif length is not None:
            if length > self.limits.body_bytes_max:
                raise ValueError(f"response body of {length} bytes exceeds the bound")
            body = await reader.readexactly(length)
        else:
            body = await reader.read(self.limits.body_bytes_max)  # until close
            keep = False
        # The balancer's own server adds Date and Server; the replica's would be duplicates.
        kept = [(k, v) for k, v in end_to_end(headers) if k not in (b"date", b"server")]
        return keep, UpstreamResponse(status, kept, body)

    async def _read_chunked(self, reader: asyncio.StreamReader) -> bytes:
        chunks: list[bytes] = []
        size_total = 0
        while True:
            line = await reader.readline()
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # no trailers from our replicas
                return b"".join(chunks)
            size_total += size
            if size_total > self.limits.body_bytes_max:
                raise ValueError("chunked response body exceeds the bound")
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
