"""Versioned HMAC challenge-response handshake on the cluster token.

    server -> client  Hello(version, server_nonce)
    client -> server  Auth(version, client_nonce, HMAC(token, "c" | server_nonce | client_nonce))
    server -> client  Welcome(HMAC(token, "s" | client_nonce | server_nonce))   or Reject(reason)

Both sides prove knowledge of the token without sending it, fresh nonces stop
replay, and the direction labels stop a reflected MAC from being accepted. The
server reads nothing but these small, bounded frames before the handshake
succeeds.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import secrets

import msgspec

from lepton_ai.errors import AuthError
from lepton_ai.wire.codec import Codec
from lepton_ai.wire.frames import ConnectionClosed, encode_frame, read_frame

PROTOCOL_VERSION = 1
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


async def server_handshake(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, token: str, bound: int
) -> None:
    """Authenticate a connecting peer; raise ``AuthError`` (after telling it why) on failure."""
    server_nonce = secrets.token_bytes(NONCE_BYTES)
    _send(writer, Hello(PROTOCOL_VERSION, server_nonce))
    await writer.drain()
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


async def client_handshake(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, token: str, bound: int
) -> None:
    """Answer the server's challenge and check that the server knows the token too."""
    hello = await _recv(reader, bound)
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
