"""Versioned HMAC challenge-response handshake on the cluster token.

    client -> server  the 8-byte preamble b"LEPTON2\n" (sent on connect, not awaited)
    server -> client  Hello(version, server_nonce)
    client -> server  Auth(version, client_nonce, HMAC(token, "c" | server_nonce | client_nonce))
    server -> client  Welcome(HMAC(token, "s" | client_nonce | server_nonce))   or Reject(reason)

Both sides prove knowledge of the token without sending it, fresh nonces stop
replay, and the direction labels stop a reflected MAC from being accepted. The
server reads nothing but these small, bounded frames before the handshake
succeeds.

The preamble is there for the case of a TLS mismatch: a plain client's first
bytes make a TLS server abort at once (instead of both sides waiting for the
other to speak until a timeout), and a TLS server's alert, or a TLS client's
ClientHello reaching a plain server, is recognised and named.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import secrets

import msgspec

from lepton_ai.errors import AuthError, FrameTooLarge
from lepton_ai.wire.codec import Codec
from lepton_ai.wire.frames import HEADER, ConnectionClosed, encode_frame, read_frame

PROTOCOL_VERSION = 2  # 2: the client's preamble
# At least a TLS record header (5 bytes) long: a TLS server rejects it at once.
PREAMBLE = b"LEPTON2\n"
# The first two bytes of a TLS record (handshake or alert, version 3.x).
_TLS_RECORD_STARTS = (b"\x16\x03", b"\x15\x03")
_TLS_HINT = "the peer speaks TLS: give this side the cluster's certificates (--tls-dir)"
NONCE_BYTES = 32
TOKEN_ENV = "LEPTON_TOKEN"


class Hello(msgspec.Struct, tag=True, frozen=True):
    version: int
    nonce: bytes


class Auth(msgspec.Struct, tag=True, frozen=True):
    version: int
    nonce: bytes
    mac: bytes


class Welcome(msgspec.Struct, tag=True, frozen=True):
    mac: bytes


class Reject(msgspec.Struct, tag=True, frozen=True):
    reason: str


HandshakeMessage = Hello | Auth | Welcome | Reject
_CODEC = Codec[HandshakeMessage](HandshakeMessage)


def generate_token() -> str:
    """A fresh random cluster token (128 bits, hex)."""
    return secrets.token_hex(16)


def resolve_token(token: str | None) -> str:
    """The token given, else ``$LEPTON_TOKEN``; a clear error when there is neither."""
    value = token or os.environ.get(TOKEN_ENV)
    if not value:
        raise ValueError(f"no cluster token: pass --token or set {TOKEN_ENV}")
    return value


def _mac(token: str, label: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.new(token.encode(), label + first + second, hashlib.sha256).digest()


async def _recv(reader: asyncio.StreamReader, bound: int) -> HandshakeMessage:
    return _CODEC.decode(await read_frame(reader, bound))


def _send(writer: asyncio.StreamWriter, msg: HandshakeMessage) -> None:
    if writer.is_closing():  # uvloop raises RuntimeError on a write to a closed transport
        raise ConnectionClosed("peer closed the connection during the handshake")
    writer.write(encode_frame(_CODEC.encode(msg)))


def _send_raw(writer: asyncio.StreamWriter, data: bytes) -> None:
    if writer.is_closing():
        raise ConnectionClosed("peer closed the connection during the handshake")
    writer.write(data)


async def server_handshake(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, token: str, bound: int
) -> None:
    """Authenticate a connecting peer; raise ``AuthError`` (after telling it why) on failure."""
    server_nonce = secrets.token_bytes(NONCE_BYTES)
    _send(writer, Hello(PROTOCOL_VERSION, server_nonce))
    await writer.drain()
    await _read_preamble(reader)
    msg = await _recv(reader, bound)
    if not isinstance(msg, Auth):
        raise AuthError(f"expected Auth, got {type(msg).__name__}")
    if msg.version != PROTOCOL_VERSION:
        _send(
            writer, Reject(f"protocol version {msg.version} unsupported; want {PROTOCOL_VERSION}")
        )
        await writer.drain()
        raise AuthError(f"peer speaks protocol version {msg.version}")
    expected = _mac(token, b"c", server_nonce, msg.nonce)
    if len(msg.nonce) != NONCE_BYTES or not hmac.compare_digest(expected, msg.mac):
        _send(writer, Reject("authentication failed (wrong cluster token?)"))
        await writer.drain()
        raise AuthError("peer failed the HMAC challenge (wrong token)")
    _send(writer, Welcome(_mac(token, b"s", msg.nonce, server_nonce)))
    await writer.drain()


async def _read_preamble(reader: asyncio.StreamReader) -> None:
    try:
        got = await reader.readexactly(len(PREAMBLE))
    except asyncio.IncompleteReadError as exc:
        raise ConnectionClosed("peer closed the connection before its preamble") from exc
    if got[:2] in _TLS_RECORD_STARTS:
        raise AuthError("peer started a TLS handshake; this server runs without TLS (--tls-dir)")
    if got != PREAMBLE:
        raise AuthError(f"bad preamble {got!r} (not a lepton peer, or protocol version < 2)")


async def _recv_hello(reader: asyncio.StreamReader, bound: int) -> HandshakeMessage:
    """The server's first frame, telling a TLS server's answer from a lepton one."""
    try:
        header = await reader.readexactly(HEADER.size)
    except (asyncio.IncompleteReadError, ConnectionResetError) as exc:
        partial = exc.partial if isinstance(exc, asyncio.IncompleteReadError) else b""
        if partial[:2] in _TLS_RECORD_STARTS:
            raise AuthError(_TLS_HINT) from exc
        raise ConnectionClosed(
            "server closed the connection at once (a TLS-only server? then give this "
            "side the cluster's certificates: --tls-dir)"
        ) from exc
    if header[:2] in _TLS_RECORD_STARTS:
        raise AuthError(_TLS_HINT)
    (length,) = HEADER.unpack(header)
    if length > bound:
        raise FrameTooLarge(f"server announced a {length}-byte Hello; the bound is {bound}")
    try:
        return _CODEC.decode(await reader.readexactly(length))
    except asyncio.IncompleteReadError as exc:
        raise ConnectionClosed("connection closed inside the server's Hello") from exc


async def client_handshake(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, token: str, bound: int
) -> None:
    """Answer the server's challenge and check that the server knows the token too."""
    _send_raw(writer, PREAMBLE)
    hello = await _recv_hello(reader, bound)
    if not isinstance(hello, Hello):
        raise AuthError(f"expected Hello, got {type(hello).__name__}")
    if hello.version != PROTOCOL_VERSION:
        raise AuthError(f"server speaks protocol version {hello.version}; want {PROTOCOL_VERSION}")
    client_nonce = secrets.token_bytes(NONCE_BYTES)
    mac = _mac(token, b"c", hello.nonce, client_nonce)
    _send(writer, Auth(PROTOCOL_VERSION, client_nonce, mac))
    await writer.drain()
    reply = await _recv(reader, bound)
    if isinstance(reply, Reject):
        raise AuthError(f"server rejected the handshake: {reply.reason}")
    if not isinstance(reply, Welcome):
        raise AuthError(f"expected Welcome, got {type(reply).__name__}")
    if not hmac.compare_digest(reply.mac, _mac(token, b"s", client_nonce, hello.nonce)):
        raise AuthError("server failed the HMAC challenge (wrong token)")
