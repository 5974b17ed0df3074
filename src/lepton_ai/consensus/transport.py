"""Peer-to-peer transport of Paxos messages over authenticated ``lepton_ai.wire`` connections.

Each replica keeps one *outbound* connection per peer (it only sends on it) and
accepts the peers' outbound connections on its listening port (it only receives on
those). A peer connection opens with ``PeerHello(node)`` after the HMAC handshake;
every later message must carry that node as ``src`` or the connection is closed.

Sending never blocks the replica's loop: ``PeerLink.send_many`` writes into the
connection's bounded transport buffer, and messages that do not fit (or arrive while
the link is down) are dropped and counted. Paxos tolerates lost messages (the
leader retransmits), so dropping is safe, while an unbounded queue to a dead or
paused peer would not be.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import msgspec

from lepton_ai.consensus.peer_messages import PeerMessage
from lepton_ai.errors import AuthError, FrameTooLarge, LeptonError
from lepton_ai.wire import Codec, Connection, ConnectionClosed, WireConfig, connect, encode_frame
from lepton_ai.wire.frames import HEADER as _HEADER

log = logging.getLogger("lepton_ai.consensus.transport")


class PeerHello(msgspec.Struct, tag=True, frozen=True):
    """First message on a peer connection: who is talking."""

    node: int


@dataclass(frozen=True)
class TransportConfig:
    send_buffer_bytes_max: int = 32 * 1024 * 1024  # unsent bytes to one peer; beyond: drop
    reconnect_backoff_s: float = 0.05
    reconnect_backoff_max_s: float = 0.5
    wire: WireConfig = field(default_factory=WireConfig)

    def __post_init__(self) -> None:
        if self.send_buffer_bytes_max < 1:
            raise ValueError("send_buffer_bytes_max must be >= 1")


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


class FrameSplitter:
    """Cuts a byte stream into frames (``lepton_ai.wire.frames`` format) many at a time.

    The hot paths read whatever the socket has (one ``read`` call) and decode every
    complete frame in it, instead of two ``readexactly`` awaits per message.
    """

    def __init__(self, frame_bytes_max: int) -> None:
        self._buf = bytearray()
        self._max = frame_bytes_max

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        buf += data
        frames: list[bytes] = []
        pos = 0
        while len(buf) - pos >= _HEADER.size:
            (length,) = _HEADER.unpack_from(buf, pos)
            if length > self._max:
                raise FrameTooLarge(f"peer announced a {length}-byte frame; bound {self._max}")
            end = pos + _HEADER.size + length
            if end > len(buf):
                break
            frames.append(bytes(buf[pos + _HEADER.size : end]))
            pos = end
        if pos:
            del buf[:pos]
        return frames


async def read_frames(
    reader: asyncio.StreamReader, splitter: FrameSplitter, chunk_bytes: int = 1 << 18
) -> list[bytes]:
    """The next complete frames (at least one); ``ConnectionClosed`` at EOF."""
    while True:
        data = await reader.read(chunk_bytes)
        if not data:
            raise ConnectionClosed("connection closed")
        frames = splitter.feed(data)
        if frames:
            return frames


class PeerLink:
    """The outbound connection to one peer, with reconnect and a bounded send buffer.

    ``send`` writes straight into the connection's transport (no task hop on the
    latency path); when the transport's buffer holds more than
    ``send_buffer_bytes_max`` (a slow or paused peer) or the link is down, the
    messages are dropped and counted instead.
    """

    def __init__(
        self,
        self_id: int,
        peer_id: int,
        address: str,
        *,
        token: str,
        codec: Codec[object],
        config: TransportConfig,
    ) -> None:
        self.self_id = self_id
        self.peer_id = peer_id
        self.address = address
        self._token = token
        self._codec = codec
        self._config = config
        self._conn: Connection[object] | None = None
        self.dropped = 0
        self.sent = 0
        self.last_error = ""
        self.generation = 0  # connections made so far: a new one may reach a restarted peer

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def send_many(self, msgs: list[PeerMessage]) -> bool:
        """Write ``msgs`` with one syscall; False (and dropped) if down or backed up."""
        conn = self._conn
        if conn is None or conn.closed:
            self.dropped += len(msgs)
            return False
        transport = conn.writer.transport
        if transport.get_write_buffer_size() > self._config.send_buffer_bytes_max:
            self.dropped += len(msgs)
            return False
        limit = self._config.wire.frame_bytes_max
        encode = self._codec.encode
        conn.writer.writelines([encode_frame(encode(m), limit) for m in msgs])
        self.sent += len(msgs)
        return True

    async def run(self) -> None:
        """Connect, hold the connection until it breaks, reconnect with backoff; forever."""
        backoff = self._config.reconnect_backoff_s
        host, port = _split(self.address)
        while True:
            conn: Connection[object] | None = None
            try:
                conn = await connect(
                    host, port, token=self._token, codec=self._codec, config=self._config.wire
                )
                await conn.send(PeerHello(self.self_id))
                self.generation += 1
                self._conn = conn
                backoff = self._config.reconnect_backoff_s
                # The peer never sends on this connection: a completed read means it closed.
                await conn.reader.read(1)
                self.last_error = "closed by peer"
            except AuthError as exc:
                self.last_error = f"auth: {exc}"
                log.error("peer %s at %s rejected our token: %s", self.peer_id, self.address, exc)
            except (OSError, TimeoutError, LeptonError) as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
            finally:
                self._conn = None
                if conn is not None:
                    await conn.close()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._config.reconnect_backoff_max_s)
