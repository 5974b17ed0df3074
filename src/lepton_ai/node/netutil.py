"""Small networking helpers shared by the node programs."""

from __future__ import annotations

import socket

from lepton_ai.wire import WireConfig

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
