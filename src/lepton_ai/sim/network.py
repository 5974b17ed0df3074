"""A seeded simulated network: delay, loss, duplication, reordering and partitions.

Time is an integer number of simulation units (``SimClock``); a message sent at ``t`` is
delivered at ``t + delay`` unless the directed link is cut or the message is lost.
Different delays reorder messages. Everything random comes from the ``random.Random``
given by the simulator, so one seed replays one run exactly.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field

import msgspec

from lepton_ai.consensus.peer_messages import PeerMessage

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[PeerMessage] = msgspec.msgpack.Decoder(PeerMessage)


@dataclass(slots=True)
class NetConfig:
    """Fault knobs of the simulated network (probabilities in [0, 1], delays in units)."""

    delay_min: int = 1
    delay_max: int = 5
    loss: float = 0.0
    duplicate: float = 0.0
    long_delay: float = 0.0
    """Probability that a message is held back for up to ``long_delay_max`` units."""
    long_delay_max: int = 200
    replay: float = 0.0
    """Probability, per send, of also re-delivering a random old message (a confused or
    lagging peer repeating itself long after the fact: stale ballots, old commits)."""
    replay_history_max: int = 512
    encode: bool = True
    """Round-trip every message through msgpack (catches aliasing and wire-type bugs)."""
    queue_max: int = 200_000
    """Messages in flight; beyond it the network drops (a bounded buffer, like a socket)."""

    def validate(self) -> None:
        for name in ("loss", "duplicate", "long_delay", "replay"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability, got {p}")
        if not 0 <= self.delay_min <= self.delay_max:
            raise ValueError("need 0 <= delay_min <= delay_max")


@dataclass(slots=True)
class SimNetwork:
    rng: random.Random
    config: NetConfig = field(default_factory=NetConfig)
    blocked: set[tuple[int, int]] = field(default_factory=set)
    """Directed links (src, dst) that drop everything (partitions, asymmetric too)."""
    queue: list[tuple[int, int, int, int, bytes | PeerMessage]] = field(default_factory=list)
    seq: int = 0
    sent: int = 0
    delivered: int = 0
    sent_by_type: dict[str, int] = field(default_factory=dict)
    history: list[tuple[int, int, bytes | PeerMessage]] = field(default_factory=list)
    popped_seq: int = 0
    """Sequence number of the message ``pop`` returned last (sends are numbered from 1)."""

    def send(self, now: int, src: int, dst: int, msg: PeerMessage) -> None:
        self.sent += 1
        name = type(msg).__name__
        self.sent_by_type[name] = self.sent_by_type.get(name, 0) + 1
        cfg = self.config
        if (src, dst) in self.blocked or self.rng.random() < cfg.loss:
            return
        copies = 2 if self.rng.random() < cfg.duplicate else 1
        payload: bytes | PeerMessage = _encoder.encode(msg) if cfg.encode else msg
        if cfg.replay:
            self._replay(now, (src, dst, payload))
        for _ in range(copies):
            if len(self.queue) >= cfg.queue_max:
                return
            delay = self.rng.randint(cfg.delay_min, cfg.delay_max)
            if cfg.long_delay and self.rng.random() < cfg.long_delay:
                delay += self.rng.randint(0, cfg.long_delay_max)
            self.seq += 1
            heapq.heappush(self.queue, (now + delay, self.seq, src, dst, payload))

    def _replay(self, now: int, item: tuple[int, int, bytes | PeerMessage]) -> None:
        history = self.history
        if len(history) < self.config.replay_history_max:
            history.append(item)
        else:
            history[self.rng.randrange(len(history))] = item
        if self.rng.random() < self.config.replay:
            src, dst, payload = history[self.rng.randrange(len(history))]
            self.seq += 1
            heapq.heappush(self.queue, (now + self.config.delay_max, self.seq, src, dst, payload))

    def next_time(self) -> int | None:
        return self.queue[0][0] if self.queue else None

    def pop(self) -> tuple[int, int, int, PeerMessage]:
        """The next delivery: (time, src, dst, message). Links cut after sending still drop
        at delivery (a partition also eats what is on the wire)."""
        t, seq, src, dst, payload = heapq.heappop(self.queue)
        self.popped_seq = seq
        msg = _decoder.decode(payload) if isinstance(payload, bytes) else payload
        return t, src, dst, msg

    def link_up(self, src: int, dst: int) -> bool:
        return (src, dst) not in self.blocked

    def isolate(self, node: int, nodes: list[int]) -> None:
        for other in nodes:
            if other != node:
                self.blocked.add((node, other))
                self.blocked.add((other, node))

    def rejoin(self, node: int) -> None:
        self.blocked = {(a, b) for a, b in self.blocked if node not in (a, b)}

    def partition(self, groups: list[list[int]]) -> None:
        """Cut every link between different groups (both directions)."""
        self.blocked = set()
        for i, ga in enumerate(groups):
            for j, gb in enumerate(groups):
                if i != j:
                    self.blocked.update((a, b) for a in ga for b in gb)

    def heal(self) -> None:
        self.blocked = set()
