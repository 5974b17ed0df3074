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


WILDCARDS = frozenset({"0.0.0.0", "::", ""})


def local_ip_toward(host: str) -> str:
    """This host's address on the interface that routes to ``host`` (a peer): what
    the peer can reach us on. No packet is sent (a UDP connect only picks a route);
    127.0.0.1 when there is no route at all."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))
            return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1"


def advertised_address(sock: socket.socket, advertise: str | None, toward: str | None) -> str:
    """The HOST:PORT others should dial for the listener ``sock``.

    ``advertise`` (``HOST`` or ``HOST:PORT``, e.g. behind NAT) wins; else the bound
    address, except that a wildcard bind (``0.0.0.0``) is not an address anyone can
    dial: then the local address of the interface routing ``toward`` a peer.
    """
    host, port = sock.getsockname()[:2]
    if advertise:
        if ":" in advertise:
            a_host, a_port = parse_address(advertise)
            return f"{a_host}:{a_port}"
        return f"{advertise}:{port}"
    if host in WILDCARDS:
        host = local_ip_toward(toward or "192.0.2.1")  # TEST-NET-1: the default route
    return f"{host}:{port}"


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
