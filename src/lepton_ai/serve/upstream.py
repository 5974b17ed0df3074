"""A small HTTP/1.1 client with keep-alive pooling, for the balancer's hop to a replica.

Written for this hop rather than using httpx for two reasons: the balancer must
know whether *any* response byte arrived before a failure (only then is a retry
on another replica safe to skip), and the per-request cost is a fraction of a
general client's. Each connection is an ``asyncio.Protocol`` fed to httptools'
C parser (no StreamReader: its readline/readuntil/readexactly each cost a
future and a wake-up); a request is one ``transport.write``, and the answer
goes to a callback (``Sink``): the balancer's forwarding needs no task.
It speaks to our own replicas on loopback: Content-Length, chunked or
until-close bodies, no TLS, no redirects, every size bounded.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from ssl import SSLContext
from typing import Protocol, cast

import httptools

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
# The balancer adds its own Date and Server; the replica's would be duplicates.
_NOT_FORWARDED_BACK = _HOP_BY_HOP | {b"date", b"server"}

Headers = list[tuple[bytes, bytes]]


class UpstreamError(Exception):
    """An attempt failed. ``outcome`` says how; ``retryable`` is True when the client
    cannot have seen anything of it (no byte came back, or the answer was cut short)."""

    def __init__(self, outcome: Outcome, retryable: bool, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.retryable = retryable


@dataclass(frozen=True)
class UpstreamResponse:
    status: int
    headers: Headers  # end-to-end headers only (plus Content-Length for HEAD), lower-case
    body: bytes


@dataclass(frozen=True)
class PoolLimits:
    idle_max: int = 64
    idle_s: float = 30.0
    header_bytes_max: int = 64 << 10
    body_bytes_max: int = 16 << 20


def end_to_end(headers: Headers) -> Headers:
    """Drop hop-by-hop headers (and the ones the proxy sets itself).

    Names must be lower-case already, as the front end and ``Conn`` give them.
    """
    return [(k, v) for k, v in headers if k not in _HOP_BY_HOP]


class Sink(Protocol):
    """Receives the outcome of one exchange on a ``Conn`` (exactly one call)."""

    def response(self, conn: Conn, keep: bool, response: UpstreamResponse) -> None: ...

    def failure(self, conn: Conn, error: UpstreamError) -> None: ...


class Conn(asyncio.Protocol):
    """One keep-alive connection to a replica; at most one request in flight.

    ``send`` writes a whole request and later calls the sink once, from the event
    loop (after the parser returned, never from inside it): no task, no future.
    """

    def __init__(self, limits: PoolLimits) -> None:
        self.limits = limits
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._sink: Sink | None = None
        self._done: tuple[bool, UpstreamResponse] | None = None
        self._reset_message()

    def _reset_message(self) -> None:
        self._got_bytes = False
        self._head_bytes = 0
        self._headers_done = False
        self._headers: Headers = []
        self._body: list[bytes] = []
        self._body_bytes = 0
        self._until_close = False
        self._head_request = False
        self._done = None

    # -- asyncio.Protocol ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's does not subclass asyncio.Transport).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._sink is None:
            self.abort()  # an answer nobody asked for (or one a timeout gave up on)
            return
        self._got_bytes = True
        if not self._headers_done:
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(Outcome.RESET, False, f"malformed response: {exc}")
            return
        # Checked after parsing: one read may hold the head and a large body.
        if not self._headers_done and self._head_bytes > self.limits.header_bytes_max:
            self._fail(Outcome.RESET, False, "response head exceeds the bound")
        elif self._body_bytes > self.limits.body_bytes_max:
            self._fail(Outcome.RESET, False, "response body exceeds the bound")
        elif self._done is not None:
            self._deliver(*self._done)

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost settles any waiter

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._sink is None:
            return
        if self._until_close and self._headers_done and exc is None:
            self._finish_message(keep=False)  # a body delimited by the end of the connection
            if self._done is not None:
                self._deliver(*self._done)
            return
        reason = "ConnectionResetError" if exc is None else f"{type(exc).__name__}: {exc}"
        # Cut before or during the answer: the response is buffered whole before the
        # client sees a byte, so either way a retry elsewhere is invisible to the client.
        self._fail(Outcome.RESET, True, f"closed, connection lost: {reason}")

    # -- httptools callbacks -----------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self._headers_done = True
        status = self._parser.get_status_code()
        if self._head_request:
            self._finish_message(keep=False)  # a HEAD answer has no body, whatever it says
            return
        delimited = any(k in (b"content-length", b"transfer-encoding") for k, _ in self._headers)
        self._until_close = not delimited and status >= 200 and status not in (204, 304)

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes <= self.limits.body_bytes_max:
            self._body.append(body)

    def on_message_complete(self) -> None:
        if self._body_bytes <= self.limits.body_bytes_max and self._done is None:
            self._finish_message(keep=self._parser.should_keep_alive())

    # -- the exchange ------------------------------------------------------------------
    def send(self, data: bytes, sink: Sink, *, head: bool = False) -> None:
        """Write one request; ``sink`` hears how it ended. Raises if the conn is closed."""
        if self.transport is None or self.closed or self.transport.is_closing():
            raise UpstreamError(Outcome.RESET, True, "before response bytes: connection closed")
        if self._sink is not None:
            raise AssertionError("a second request on a busy upstream connection")
        self._reset_message()
        self._head_request = head
        self._sink = sink
        self.transport.write(data)

    def _finish_message(self, *, keep: bool) -> None:
        kept = [(k, v) for k, v in self._headers if k not in _NOT_FORWARDED_BACK]
        if self._head_request:
            # A HEAD answer's Content-Length is the size a GET would have (RFC 9110
            # 9.3.2), not this (empty) body's: the front end passes it on as is.
            kept += [(k, v) for k, v in self._headers if k == b"content-length"]
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        self._done = (keep, UpstreamResponse(self._parser.get_status_code(), kept, body))

    def _deliver(self, keep: bool, response: UpstreamResponse) -> None:
        sink, self._sink, self._done = self._sink, None, None
        if sink is not None:
            sink.response(self, keep, response)

    def _fail(self, outcome: Outcome, retryable: bool, message: str) -> None:
        kind = "after" if self._got_bytes else "before"
        sink, self._sink = self._sink, None
        self.abort()
        if sink is not None:
            sink.failure(
                self, UpstreamError(outcome, retryable, f"{kind} response bytes: {message}")
            )

    def abort(self) -> None:
        """Drop the connection at once; a pending sink is not told (its owner gave up)."""
        self.closed = True
        self._sink = None
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class _FutureSink:
    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[tuple[bool, UpstreamResponse]]) -> None:
        self.future = future

    def response(self, conn: Conn, keep: bool, response: UpstreamResponse) -> None:
        if not self.future.done():
            self.future.set_result((keep, response))

    def failure(self, conn: Conn, error: UpstreamError) -> None:
        if not self.future.done():
            self.future.set_exception(error)


class UpstreamPool:
    """Keep-alive connections to one replica (``host:port``)."""

    def __init__(
        self,
        host: str,
        port: int,
        limits: PoolLimits | None = None,
        ssl: SSLContext | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.ssl = ssl  # HTTPS to the replica (mutual: it wants our certificate)
        self.limits = limits or PoolLimits()
        self._host_line = f"\r\nhost: {host}:{port}\r\n".encode()
        self._idle: deque[Conn] = deque()
        self._closed = False

    def close(self) -> None:
        self._closed = True
        self.drop_idle()

    def drop_idle(self) -> None:
        while self._idle:
            self._idle.pop().close()

    def take_idle(self) -> Conn | None:
        """A pooled keep-alive connection, or None (then ``connect``)."""
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and now - conn.idle_since < self.limits.idle_s:
                return conn
            conn.close()
        return None

    async def connect(self) -> Conn:
        loop = asyncio.get_running_loop()
        limits = self.limits
        try:
            _, conn = await loop.create_connection(
                lambda: Conn(limits), self.host, self.port, ssl=self.ssl
            )
        except ConnectionRefusedError as exc:
            raise UpstreamError(Outcome.REFUSED, True, f"connect refused: {exc}") from exc
        except OSError as exc:
            raise UpstreamError(Outcome.RESET, True, f"connect failed: {exc}") from exc
        return conn

    def put(self, conn: Conn) -> None:
        """Give back a connection whose exchange finished with keep-alive."""
        if self._closed or conn.closed or len(self._idle) >= self.limits.idle_max:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    def build_request(self, method: str, path: str, headers: Headers, body: bytes) -> bytes:
        """The request's bytes for this replica: end-to-end headers, our Host and length."""
        parts = [method.encode(), b" ", path.encode("latin-1"), b" HTTP/1.1", self._host_line]
        for k, v in headers:
            if k not in _HOP_BY_HOP:
                parts += (k, b": ", v, b"\r\n")
        parts.append(b"content-length: %d\r\n\r\n" % len(body))
        parts.append(body)
        return b"".join(parts)

    async def request(
        self,
        method: str,
        path: str,
        headers: Headers,
        body: bytes,
        *,
        retry_stale: bool = True,
    ) -> UpstreamResponse:
        """One request. The caller bounds it with a timeout; a timeout closes the connection.

        A reused keep-alive connection that the replica had closed fails without a
        response byte; with ``retry_stale`` that is retried once here on a fresh
        connection, since it says nothing about the replica's health.
        """
        data = self.build_request(method, path, headers, body)
        head = method == "HEAD"
        conn = self.take_idle()
        if conn is not None:
            try:
                return await self._exchange(conn, data, head)
            except UpstreamError as exc:
                if not (retry_stale and exc.retryable and exc.outcome is Outcome.RESET):
                    raise
            self.drop_idle()  # its siblings are likely stale too
        return await self._exchange(await self.connect(), data, head)

    async def _exchange(self, conn: Conn, data: bytes, head: bool) -> UpstreamResponse:
        future: asyncio.Future[tuple[bool, UpstreamResponse]]
        future = asyncio.get_running_loop().create_future()
        conn.send(data, _FutureSink(future), head=head)
        try:
            keep, response = await future
        except asyncio.CancelledError:
            conn.abort()  # a timeout mid-exchange: the connection's state is unknown
            raise
        if keep:
            self.put(conn)
        else:
            conn.close()
        return response
