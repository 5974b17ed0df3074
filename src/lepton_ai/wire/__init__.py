"""Wire protocol: bounded length-prefixed frames of msgspec MessagePack structs.

Every connection starts with an HMAC challenge-response handshake on the cluster token.

Usage::

    class Ping(msgspec.Struct, tag=True):
        n: int

    Msg = Ping | Pong
    codec = Codec[Msg](Msg)
    server = await serve("127.0.0.1", 0, token=tok, codec=codec, handler=handle)
    conn = await connect("127.0.0.1", bound_port(server), token=tok, codec=codec)
    await conn.send(Ping(1)); reply = await conn.recv()
"""

from lepton_ai.wire.codec import Codec, encode
from lepton_ai.wire.conn import Connection, WireConfig, bound_port, connect, serve
from lepton_ai.wire.frames import ConnectionClosed, encode_frame, read_frame
from lepton_ai.wire.handshake import PROTOCOL_VERSION, generate_token, resolve_token

__all__ = [
    "PROTOCOL_VERSION",
    "Codec",
    "Connection",
    "ConnectionClosed",
    "WireConfig",
    "bound_port",
    "connect",
    "encode",
    "encode_frame",
    "generate_token",
    "read_frame",
    "resolve_token",
    "serve",
]
