"""Authenticated connections carrying msgspec messages in bounded frames.

``serve`` accepts connections, runs the handshake under a timeout and hands each
authenticated ``Connection`` to the service's handler. A peer that fails the
handshake, or sends a malformed, oversized or unknown frame, is disconnected
with a logged reason; the process and its state are untouched.

With ``WireConfig.tls`` (by default from ``$LEPTON_TLS_DIR``, see ``wire.tls``)
both ends first run a mutual TLS handshake, then the token handshake inside it.
The server's TLS handshake is the event loop's (``start_server(ssl=...)``): a
peer it refuses never reaches ``on_connect`` and is not logged here (asyncio and
uvloop log it only in debug mode); the client side gets the reason. Upgrading
inside ``on_connect`` (``StreamWriter.start_tls``) would let us log it, but under
uvloop the client's hello is already in the stream buffer by then and the
handshake stalls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from lepton_ai.errors import LeptonError, ProtocolError, TlsError
from lepton_ai.wire.codec import Codec
from lepton_ai.wire.frames import ConnectionClosed, encode_frame, read_frame
from lepton_ai.wire.handshake import client_handshake, server_handshake
from lepton_ai.wire.tls import TlsConfig, describe_ssl_error, tls_from_env

T = TypeVar("T")
log = logging.getLogger("lepton_ai.wire")


@dataclass(frozen=True)
class WireConfig:
    """Bounds of one connection."""

    frame_bytes_max: int = 64 * 1024 * 1024
    handshake_bytes_max: int = 1024
    handshake_timeout_s: float = 5.0
    connect_timeout_s: float = 5.0
    # StreamReader buffer: above this the transport stops reading from the socket.
    read_buffer_bytes_max: int = 4 * 1024 * 1024
    # Mutual TLS, or None for plain TCP. The process's setting unless given: the
    # programs and their clients build their configs in many places, and TLS must
    # hold for all of them or it holds for none.
    tls: TlsConfig | None = field(default_factory=tls_from_env)


class Connection(Generic[T]):
    """One authenticated, framed, typed connection. Not safe for concurrent ``recv``."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        codec: Codec[T],
        config: WireConfig,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.codec = codec
        self.config = config
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)

    async def recv(self) -> T:
        """The next message; ``ConnectionClosed`` at EOF, ``ProtocolError`` on a bad frame."""
        return self.codec.decode(await read_frame(self.reader, self.config.frame_bytes_max))

    def send_nowait(self, msg: Any) -> None:
        """Queue a message in the transport; call ``drain`` to apply back-pressure.

        On a closed connection the message is dropped (the reader sees the end):
        asyncio's own loop does that, uvloop would raise RuntimeError instead.
        """
        if not self.writer.is_closing():
            self.writer.write(encode_frame(self.codec.encode(msg), self.config.frame_bytes_max))

    async def drain(self) -> None:
        try:
            await self.writer.drain()
        except (ConnectionError, RuntimeError) as exc:
            raise ConnectionClosed(f"connection to {self.peer} lost: {exc}") from exc

    async def send(self, msg: Any) -> None:
        self.send_nowait(msg)
        await self.drain()

    async def send_many(self, msgs: Iterable[Any]) -> None:
        """Write a batch of messages with one drain (one syscall burst, not one per message)."""
        limit = self.config.frame_bytes_max
        if not self.writer.is_closing():  # else dropped, as in send_nowait
            self.writer.writelines([encode_frame(self.codec.encode(m), limit) for m in msgs])
        await self.drain()

    async def __aiter__(self) -> AsyncIterator[T]:
        while True:
            try:
                yield await self.recv()
            except ConnectionClosed:
                return

    @property
    def closed(self) -> bool:
        return self.writer.is_closing()

    async def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


def _tune(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        # Small request/response frames: Nagle would add up to 40 ms per round trip.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def connect(
    host: str,
    port: int,
    *,
    token: str,
    codec: Codec[T],
    config: WireConfig | None = None,
) -> Connection[T]:
    """Open an authenticated connection; ``OSError``/``TimeoutError``/``AuthError`` on failure."""
    cfg = config or WireConfig()
    reader, writer = await _open(host, port, cfg)
    _tune(writer)
    try:
        await asyncio.wait_for(
            client_handshake(reader, writer, token, cfg.handshake_bytes_max),
            cfg.handshake_timeout_s,
        )
    except ssl.SSLError as exc:  # TLS 1.3: the server refuses our certificate only now
        writer.close()
        raise TlsError(
            f"{host}:{port} refused the TLS connection: {describe_ssl_error(exc)}"
        ) from None
    except ConnectionClosed as exc:
        writer.close()
        if cfg.tls is None:
            raise
        # TLS 1.3 finishes the client's side first; a refusal of our certificate
        # comes as the connection closing under the first read.
        raise TlsError(
            f"{host}:{port} closed the connection after the TLS handshake: it refused "
            f"our certificate (not from its CA?) ({exc})"
        ) from None
    except BaseException:
        writer.close()
        raise
    return Connection(reader, writer, codec, cfg)


async def _open(
    host: str, port: int, cfg: WireConfig
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """TCP connect, then the TLS handshake if configured; both under the connect timeout."""
    tls: dict[str, Any] = {}
    if cfg.tls is not None:
        tls = {
            "ssl": cfg.tls.client,
            "server_hostname": host,  # checked against the certificate's subjectAltNames
            "ssl_handshake_timeout": cfg.handshake_timeout_s,
        }
    try:
        return await asyncio.wait_for(
            asyncio.open_connection(host, port, limit=cfg.read_buffer_bytes_max, **tls),
            cfg.connect_timeout_s,
        )
    except ssl.SSLError as exc:
        raise TlsError(
            f"TLS handshake with {host}:{port} failed: {describe_ssl_error(exc)}"
        ) from None


Handler = Callable[[Connection[T]], Awaitable[None]]


async def serve(
    host: str | None,
    port: int | None,
    *,
    token: str,
    codec: Codec[T],
    handler: Handler[T],
    config: WireConfig | None = None,
    sock: socket.socket | None = None,
) -> asyncio.Server:
    """Listen on ``host:port`` (0 = ephemeral; read it from ``server.sockets``).

    Or serve on ``sock``, a socket already bound and listening (host and port
    None): a launcher binds it and hands it to a child, so the address is known
    before the child starts.
    """
    cfg = config or WireConfig()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _tune(writer)
        conn = Connection(reader, writer, codec, cfg)
        try:
            await asyncio.wait_for(
                server_handshake(reader, writer, token, cfg.handshake_bytes_max),
                cfg.handshake_timeout_s,
            )
        except (LeptonError, TimeoutError, ConnectionError) as exc:
            _HANDSHAKE_FAILURES.warn("closing %s: handshake failed: %s", conn.peer, exc)
            await conn.close()
            return
        await _handle(conn, handler)

    tls: dict[str, Any] = {}
    if cfg.tls is not None:
        tls = {"ssl": cfg.tls.server, "ssl_handshake_timeout": cfg.handshake_timeout_s}
    limit = cfg.read_buffer_bytes_max
    if sock is not None:
        return await asyncio.start_server(on_connect, sock=sock, limit=limit, **tls)
    return await asyncio.start_server(on_connect, host, port, limit=limit, **tls)


async def _handle(conn: Connection[T], handler: Handler[T]) -> None:
    try:
        await handler(conn)
    except ProtocolError as exc:
        log.warning("closing %s: %s", conn.peer, exc)
    except (ConnectionClosed, ConnectionError):
        pass
    finally:
        await conn.close()


class RateLimitedLog:
    """At most ``burst`` warnings per ``window_s``; the rest are counted and reported
    once the window ends (a port scan or a client with a wrong token must not flood
    the log, nor hide that it happened)."""

    def __init__(self, burst: int = 10, window_s: float = 60.0) -> None:
        self.burst, self.window_s = burst, window_s
        self._window_start = -window_s
        self._logged = 0
        self._suppressed = 0

    def warn(self, fmt: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._window_start >= self.window_s:
            if self._suppressed:
                log.warning("%d more like this suppressed: %s", self._suppressed, fmt % args)
            self._window_start, self._logged, self._suppressed = now, 0, 0
        if self._logged < self.burst:
            self._logged += 1
            log.warning(fmt, *args)
        else:
            self._suppressed += 1


_HANDSHAKE_FAILURES = RateLimitedLog()


def bound_port(server: asyncio.Server) -> int:
    """The port an ``asyncio.Server`` listens on (after binding port 0)."""
    return int(server.sockets[0].getsockname()[1])
