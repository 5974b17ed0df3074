"""Small networking helpers shared by the node programs."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TypeVar

from lepton_ai.errors import LeptonError, ProtocolError
from lepton_ai.wire import Codec, Connection, ConnectionClosed, WireConfig
from lepton_ai.wire.conn import Handler
from lepton_ai.wire.handshake import server_handshake

T = TypeVar("T")
log = logging.getLogger("lepton_ai.node")

# Job results travel inline (task results in the log, the finished job's record to
# the client), so node connections allow bigger frames than the wire default.
NODE_FRAME_BYTES_MAX = 256 << 20
# Reports are sent in batches of at most this many payload bytes.
REPORT_BATCH_BYTES_MAX = 32 << 20


def node_wire_config(connect_timeout_s: float = 5.0) -> WireConfig:
    return WireConfig(frame_bytes_max=NODE_FRAME_BYTES_MAX, connect_timeout_s=connect_timeout_s)


def parse_address(address: str) -> tuple[str, int]:
    """``"host:port"`` -> (host, port); ValueError on anything else."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port_text)


def bind_listener(host: str = "127.0.0.1", port: int = 0, backlog: int = 128) -> socket.socket:
    """A listening TCP socket; a parent can bind it and hand it to a child by fd."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    return sock


async def serve_socket(
    sock: socket.socket,
    *,
    token: str,
    codec: Codec[T],
    handler: Handler[T],
    config: WireConfig | None = None,
) -> asyncio.Server:
    """Like ``wire.serve`` but on an already bound socket (inherited from a parent).

    Pre-binding lets ``LocalCluster`` know the coordinator's address before the
    coordinator has even started, so workers start at the same time.
    """
    cfg = config or WireConfig()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raw = writer.get_extra_info("socket")
        if raw is not None:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Connection(reader, writer, codec, cfg)
        try:
            await asyncio.wait_for(
                server_handshake(reader, writer, token, cfg.handshake_bytes_max),
                cfg.handshake_timeout_s,
            )
        except (LeptonError, TimeoutError, ConnectionError) as exc:
            log.warning("closing %s: handshake failed: %s", conn.peer, exc)
            await conn.close()
            return
        try:
            await handler(conn)
        except ProtocolError as exc:
            log.warning("closing %s: %s", conn.peer, exc)
        except (ConnectionClosed, ConnectionError):
            pass
        finally:
            await conn.close()

    return await asyncio.start_server(on_connect, sock=sock, limit=cfg.read_buffer_bytes_max)
