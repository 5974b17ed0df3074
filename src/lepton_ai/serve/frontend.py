"""The balancer's HTTP/1.1 server: an ``asyncio.Protocol`` over httptools' C parser.

It replaced uvicorn + ASGI in front of ``Balancer.handle``: on a 2-core host the
load generator, the balancer and the replica share the CPU, so the balancer's
CPU per request shows up directly as client latency. Per request this does one
parse (C), one task running ``Balancer.handle`` and one ``transport.write`` of
the whole response (uvicorn wrote head and body separately, two send syscalls,
and built ASGI message dicts and middleware frames on the way).

What it speaks: HTTP/1.1 and 1.0 requests, keep-alive (a 1.0 client that asks
for it is told ``connection: keep-alive``), pipelining (answered in order, at
most ``pipeline_max`` parsed requests waiting per connection before it stops
reading), ``Expect: 100-continue``, Content-Length or chunked request bodies,
HEAD (answered with the replica's Content-Length and no body). No upgrades
(WebSocket) and no TLS: it fronts replicas on loopback.

Bounds, each answered with a JSON ``{"error": ...}`` and a close: request head
``header_bytes_max`` (else 431); body ``body_bytes_max`` (else 413; at once, before
any body byte, when ``Expect: 100-continue`` announces a larger Content-Length);
``connections_max`` open connections (else 503); ``connections_per_client_max`` of
them per client address (else 429: that client is over its share, the server is
not full, and 4xx keeps it out of the server-error rate). Deadlines against slow
clients (slowloris): a head must be complete ``header_timeout_s`` after its first
byte (a connection's first head: after accept), a body within ``body_timeout_s``
plus a second per ``body_rate_min_bytes_s`` bytes received, else 408. A connection
idle between requests is closed after ``keep_alive_s``; a request handed to the
balancer is bounded by the balancer's own ``request_timeout_s``, not by these.
All deadlines are checked by one sweep per server (every second, more often when a
deadline is under two seconds): no timer per request or connection, and per request
only a few attribute writes in the parser callbacks, reusing the clock reading each
read already takes.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol, cast

import httptools

from lepton_ai.serve.balancer import Headers, OnReply, Reply, json_reply
from lepton_ai.serve.config import BalancerConfig
from lepton_ai.wire.http_auth import bearer_ok, http_token
from lepton_ai.wire.tls import TlsConfig, tls_from_env

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
LISTEN_BACKLOG = 2048  # connections the kernel queues before we accept them


class StatusCounter(Protocol):
    def count(self, status: int) -> None: ...


class Dispatcher(Protocol):
    """What the front end needs of what it serves: a ``Balancer`` (one deployment) or a
    node's router over many (``serve/node_balancer.py``)."""

    @property
    def config(self) -> BalancerConfig: ...

    @property
    def metrics(self) -> StatusCounter: ...

    def dispatch(
        self, method: str, target: str, headers: Headers, body: bytes, on_reply: OnReply
    ) -> None: ...


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0: any free port); OSError names both."""
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted sockets only then;
    # without it a small answer can wait for Nagle + delayed ACK (40 ms).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(LISTEN_BACKLOG)
    return sock


@dataclass(frozen=True, slots=True)
class _Request:
    method: str
    target: str
    headers: Headers
    body: bytes
    keep_alive: bool
    # An HTTP/1.0 client asked for keep-alive: only a "connection: keep-alive" in the
    # answer tells it the connection stays open (1.0 closes by default).
    announce_keep_alive: bool
    error: int  # 0, or the status to answer without routing (413)


def _status_line(status: int) -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    return b"HTTP/1.1 %d %s\r\n" % (status, phrase.encode())


_STATUS_LINES = {s.value: _status_line(s.value) for s in http.HTTPStatus}


class FrontEnd:
    """Accepts client connections for one ``Dispatcher``; ``close`` drains and stops."""

    def __init__(
        self,
        balancer: Dispatcher,
        *,
        tls: TlsConfig | bool | None = True,
        token: str | bool | None = True,
    ) -> None:
        """``tls``: HTTPS with these certificates (True: the process's, from
        ``$LEPTON_TLS_DIR``; None: plain HTTP). ``token``: the bearer token every
        request must carry (True: ``$LEPTON_HTTP_TOKEN``; None: none)."""
        self.balancer = balancer
        self.config = balancer.config
        self.tls = tls_from_env() if tls is True else tls or None
        self.token = http_token() if token is True else token or None
        self.connections: set[_Client] = set()
        # Open connections per client address; an address leaves with its last one, so
        # this holds at most connections_max entries.
        self._per_client: dict[str, int] = {}
        self.in_flight = 0  # requests handed to the balancer and not yet answered
        self.closing = False
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._date_second = -1
        self._date_line = b""

    async def start(self, sock: socket.socket) -> None:
        """Serve on an already bound and listening socket."""
        loop = asyncio.get_running_loop()
        tls = self.tls
        self._server = await loop.create_server(
            lambda: _Client(self),
            sock=sock,
            ssl=None if tls is None else tls.http_server,
            ssl_handshake_timeout=None if tls is None else self.config.header_timeout_s,
        )
        self._sweeper = loop.create_task(self._sweep(), name="lepton-frontend-sweep")

    async def close(self, drain_timeout_s: float) -> None:
        """Stop accepting; let requests in flight finish (bounded); close every connection."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        for client in list(self.connections):
            if not client.busy:
                client.close()
        deadline = time.monotonic() + drain_timeout_s
        while self.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for client in list(self.connections):
            client.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper

    def admit(self, client: _Client, peer: object) -> Reply | None:
        """Count a new connection from ``peer`` (its address tuple), or the refusal to send."""
        config = self.config
        retry_after = [(b"retry-after", b"%d" % config.retry_after_s)]
        if len(self.connections) >= config.connections_max:
            return json_reply(503, {"error": "too many connections"}, retry_after)
        # No address (the peer left before accept finished): one shared bucket.
        host = str(peer[0]) if isinstance(peer, tuple) else ""
        count = self._per_client.get(host, 0)
        if count >= config.connections_per_client_max:
            return json_reply(429, {"error": "too many connections from this client"}, retry_after)
        self._per_client[host] = count + 1
        client.host = host
        self.connections.add(client)
        return None

    def release(self, client: _Client) -> None:
        """A connection ``admit`` counted has closed."""
        if client not in self.connections:
            return
        self.connections.discard(client)
        count = self._per_client[client.host] - 1
        if count:
            self._per_client[client.host] = count
        else:
            del self._per_client[client.host]

    def date_line(self) -> bytes:
        """``date: ...`` plus CRLF, formatted once per second (as uvicorn does)."""
        now = time.time()
        second = int(now)
        if second != self._date_second:
            stamp = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now))
            self._date_line = f"date: {stamp}\r\n".encode()
            self._date_second = second
        return self._date_line

    async def _sweep(self) -> None:
        """Enforce the keep-alive, head and body deadlines of every connection.

        One periodic pass instead of a timer per request: a timer armed and
        cancelled per request is measurable CPU at thousands of requests/s. A
        deadline is enforced up to one period late; the period is at most half the
        shortest deadline, so that is at most 50% (and at most a second).
        """
        config = self.config
        shortest_s = min(config.keep_alive_s, config.header_timeout_s, config.body_timeout_s)
        while True:
            await asyncio.sleep(min(1.0, shortest_s / 2))
            now = time.monotonic()
            for client in list(self.connections):
                client.check_deadlines(now)


class _Client(asyncio.Protocol):
    """One client connection: parse, hand each request to the balancer, answer in order."""

    def __init__(self, front: FrontEnd) -> None:
        self.front = front
        self.config = front.config
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.host = ""  # the client's address, once the front end counted the connection
        self.busy = False  # a request of this connection is being handled
        self._keep = True  # ... and whether the connection stays open after it
        self._announce = False  # ... and whether its answer says "connection: keep-alive"
        self._head = False  # ... and whether it is a HEAD (its answer has no body)
        self.last_active_s = time.monotonic()  # when the last read or answer happened
        # A request is being read: its first byte came (or, for the connection's first
        # request, the connection was accepted) and it is not complete yet. The deadline
        # of its head runs from _read_start_s, that of its body from _body_start_s.
        self._reading = True
        self._read_start_s = self.last_active_s
        self._body_start_s = self.last_active_s
        self._pending: deque[_Request] = deque()
        self._raw_head_bytes = 0  # bytes read while a head is incomplete (parser buffers them)
        self._paused = False
        self._closed = False
        self._reset()

    def _reset(self) -> None:
        self._url: list[bytes] = []
        self._headers: Headers = []
        self._body: list[bytes] = []
        self._head_bytes = 0  # request line and headers of this request, as parsed
        self._body_bytes = 0
        self._in_head = True
        self._error = 0
        self._connection_header = False

    # -- asyncio.Protocol --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's does not subclass asyncio.Transport).
        self.transport = cast(asyncio.Transport, transport)
        refusal = self.front.admit(self, transport.get_extra_info("peername"))
        if refusal is not None:
            self._closed = True
            self.front.balancer.metrics.count(refusal[0])
            self._write_reply(refusal, keep=False)
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        # A request in flight still finishes (its replica's outcome is accounted);
        # only its answer has nowhere to go.
        self._closed = True
        self.front.release(self)
        self._pending.clear()

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        self.last_active_s = time.monotonic()
        if self._in_head:
            self._raw_head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(400, "protocol upgrades are not supported")
            return
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _Refused):
                self._refuse(exc.__context__.status, exc.__context__.message)
            else:
                self._refuse(400, f"malformed request: {exc}")
            return
        # A head still incomplete after this many bytes is refused (httptools buffers it);
        # checked after parsing, since one read may hold a head and a large body.
        if self._in_head and self._raw_head_bytes > self.config.header_bytes_max:
            self._refuse(431, "request head too large")
            return
        if self._pending:
            self._next()

    # -- httptools callbacks -------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._reset()
        # The head deadline runs from this request's first byte (its read's clock
        # reading), or from accept for a connection's first request.
        if not self._reading:
            self._reading = True
            self._read_start_s = self.last_active_s

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        self._headers.append((name.lower(), value))

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self.config.header_bytes_max:
            raise _Refused(431, "request head too large")

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._body_start_s = self.last_active_s
        body_max = self.config.body_bytes_max
        expect = False
        authorization: bytes | None = None
        for name, value in self._headers:
            if name == b"content-length" and value.isdigit() and int(value) > body_max:
                self._error = 413
            elif name == b"expect" and value.lower() == b"100-continue":
                expect = True
            elif name == b"connection":
                self._connection_header = True
            elif name == b"authorization":
                authorization = value
        if not bearer_ok(authorization, self.front.token):
            self._error = 401  # before 413: a stranger learns nothing about the limits
        if not expect:
            return
        if self._error == 401:
            raise _Refused(401, _ERRORS[401])
        if self._error:
            # The client waits for our word before sending the body: refused now, it
            # sends none (the 413 would otherwise wait for a body never coming).
            raise _Refused(413, "request body too large")
        if self.transport is not None:
            self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes <= self.config.body_bytes_max:
            self._body.append(body)
            return
        self._error = self._error or 413  # a 401 stays a 401
        # Swallowing the rest keeps the 413 readable by the client, but only so far.
        if self._body_bytes > 2 * self.config.body_bytes_max:
            raise _Refused(413, "request body too large")

    def on_message_complete(self) -> None:
        url = self._url[0] if len(self._url) == 1 else b"".join(self._url)
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        keep_alive = self.parser.should_keep_alive()
        # An HTTP/1.0 connection is kept only on a Connection header: the version (a
        # string the parser formats per call) is looked at only then.
        announce = (
            keep_alive and self._connection_header and self.parser.get_http_version() == "1.0"
        )
        request = _Request(
            self.parser.get_method().decode("latin-1"),
            url.decode("latin-1"),
            self._headers,
            b"" if self._error else body,
            keep_alive,
            announce,
            self._error,
        )
        self._in_head = True
        self._reading = False
        self._raw_head_bytes = 0
        # Answered once the parser has returned (data_received), never from inside it.
        self._pending.append(request)
        if len(self._pending) > 2 * self.config.pipeline_max:
            # One read held more pipelined requests than reading is paused for.
            raise _Refused(429, "too many pipelined requests")

    # -- answering -------------------------------------------------------------------------
    def _next(self) -> None:
        """Start the oldest waiting request, if none is being handled."""
        while self._pending and not self.busy and not self._closed:
            request = self._pending.popleft()
            if self._paused and self.transport is not None:
                self.transport.resume_reading()
                self._paused = False
            self.busy = True
            self._keep = request.keep_alive and not request.error
            self._announce = request.announce_keep_alive
            self._head = request.method == "HEAD"
            self.front.in_flight += 1
            if request.error:
                self.front.balancer.metrics.count(request.error)
                extra = _WWW_AUTHENTICATE if request.error == 401 else None
                self._on_reply(json_reply(request.error, {"error": _ERRORS[request.error]}, extra))
                continue
            try:
                self.front.balancer.dispatch(
                    request.method,
                    request.target,
                    request.headers,
                    request.body,
                    self._on_reply,
                )
            except Exception as exc:  # noqa: BLE001 - a bug costs one request, not the server
                print(f"lepton serve: balancer error: {exc!r}", file=sys.stderr)
                self._on_reply(json_reply(500, {"error": "balancer error"}))
        full = len(self._pending) >= self.config.pipeline_max
        if full and not self._paused and self.transport is not None:
            self.transport.pause_reading()
            self._paused = True

    def _on_reply(self, reply: Reply) -> None:
        if not self.busy:
            raise AssertionError("a reply for a connection with no request in flight")
        self.busy = False
        self.front.in_flight -= 1
        if self._closed or self.transport is None:
            return
        keep = self._keep and not self.front.closing
        self._write_reply(reply, keep, announce=self._announce, head=self._head)
        if not keep:
            self.close()
            return
        self.last_active_s = time.monotonic()
        if self._pending:
            self._next()

    def _write_reply(
        self, reply: Reply, keep: bool, *, announce: bool = False, head: bool = False
    ) -> None:
        status, headers, body = reply
        line = _STATUS_LINES.get(status) or _status_line(status)
        parts = [line, b"server: lepton\r\n", self.front.date_line()]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        # A replica's answer to HEAD carries its own Content-Length (what a GET would
        # get); any other answer to HEAD (an error of ours) gets its body's, not the body.
        if not (head and any(name == b"content-length" for name, _ in headers)):
            parts.append(b"content-length: %d\r\n" % len(body))
        if not keep:
            parts.append(b"connection: close\r\n")
        elif announce:
            parts.append(b"connection: keep-alive\r\n")
        parts += (b"\r\n", b"" if head else body)
        if self.transport is not None:
            self.transport.write(b"".join(parts))

    def check_deadlines(self, now: float) -> None:
        """Close this connection if it is past a deadline (the front end's sweep calls this).

        A request being handled is the balancer's to bound (``request_timeout_s``);
        the next request, if already arriving, is judged once it is answered.
        """
        if self.busy or self._closed:
            return
        config = self.config
        if not self._reading:
            if now - self.last_active_s > config.keep_alive_s:
                self.close()  # idle between requests: nothing to answer
        elif self._in_head:
            if now - self._read_start_s > config.header_timeout_s:
                self._refuse(408, "request head not received in time")
        else:
            allowed_s = config.body_timeout_s + self._body_bytes / config.body_rate_min_bytes_s
            if now - self._body_start_s > allowed_s:
                self._refuse(408, "request body not received in time")

    def _refuse(self, status: int, message: str) -> None:
        """A request that cannot be parsed or is too large: answer it and close."""
        if not self.busy and not self._closed:
            self._write_reply(json_reply(status, {"error": message}), keep=False)
            self.front.balancer.metrics.count(status)
        self.close()

    def close(self) -> None:
        self._closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self._closed = True
        if self.transport is not None:
            self.transport.abort()


_ERRORS = {401: "a bearer token is required", 413: "request body too large"}
_WWW_AUTHENTICATE = [(b"www-authenticate", b"Bearer")]


class _Refused(Exception):
    """Raised in a parser callback: answer ``status`` and close the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message
