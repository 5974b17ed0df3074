"""Phi-accrual failure detector (Hayashibara et al., 2004), sans-I/O.

For each node it keeps a bounded window of heartbeat inter-arrival times and
turns the silence since the last heartbeat into a suspicion level

    phi = -log10(P(a heartbeat arrives later than now)),

assuming normally distributed intervals with the window's mean (plus an
acceptable pause, for GC-like hiccups) and standard deviation (never below a
floor, so a perfectly regular sender is not declared dead after one late beat).
phi 1 means a 10% chance of a false suspicion, phi 8 one in 10^8.

Because a sender with very jittery history would otherwise be tolerated for
ever longer silences, ``silence_max_s`` is a hard upper bound: a node silent
for longer is suspected whatever its phi (Cassandra pairs phi with a maximum
interval the same way). With the defaults and a 100 ms heartbeat, a dead or
SIGSTOPped node is suspected after about 1.0 s (phi reaches 8) and never
later than 1.8 s.

Time is passed in (seconds, any monotonic clock); nothing here reads a clock.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class PhiConfig:
    threshold: float = 8.0  # phi at which a node is suspected
    window_max: int = 200  # inter-arrival samples kept per node
    min_std_dev_s: float = 0.1
    acceptable_pause_s: float = 0.4
    first_interval_estimate_s: float = 0.1  # seeds the window before real samples
    silence_max_s: float = 1.8  # suspected after this much silence, whatever phi says
    nodes_max: int = 100_000

    def __post_init__(self) -> None:
        if self.threshold <= 0 or self.window_max < 2 or self.nodes_max < 1:
            raise ValueError("threshold must be > 0, window_max >= 2, nodes_max >= 1")
        if self.min_std_dev_s <= 0 or self.first_interval_estimate_s <= 0:
            raise ValueError("min_std_dev_s and first_interval_estimate_s must be > 0")
        if self.acceptable_pause_s < 0 or self.silence_max_s <= 0:
            raise ValueError("acceptable_pause_s must be >= 0 and silence_max_s > 0")


class _History:
    """Inter-arrival samples with running sums, so mean and variance are O(1)."""

    __slots__ = ("last", "samples", "sq_total", "total", "window_max")

    def __init__(self, now: float, config: PhiConfig) -> None:
        self.last = now
        self.window_max = config.window_max
        self.samples: deque[float] = deque()
        self.total = 0.0
        self.sq_total = 0.0
        # Seed as Akka does: two samples at estimate +- estimate/4 give a sane
        # mean and deviation before the first real interval arrives.
        est = config.first_interval_estimate_s
        self.add(est - est / 4)
        self.add(est + est / 4)

    def add(self, interval: float) -> None:
        if len(self.samples) >= self.window_max:
            old = self.samples.popleft()
            self.total -= old
            self.sq_total -= old * old
        self.samples.append(interval)
        self.total += interval
        self.sq_total += interval * interval

    def mean(self) -> float:
        return self.total / len(self.samples)

    def std_dev(self) -> float:
        m = self.mean()
        return math.sqrt(max(0.0, self.sq_total / len(self.samples) - m * m))


def phi_value(elapsed: float, mean: float, std_dev: float) -> float:
    """phi for ``elapsed`` seconds of silence; the logistic approximation of the normal CDF.

    (Akka's formula: accurate to ~1e-4 and free of erf overflow for large y.)
    """
    y = (elapsed - mean) / std_dev
    # Clamp the exponent so exp() neither overflows nor underflows to 0.
    z = max(-700.0, min(700.0, -y * (1.5976 + 0.070566 * y * y)))
    e = math.exp(z)
    return max(0.0, -math.log10(e / (1.0 + e)))


class PhiAccrualDetector:
    """Tracks many nodes; feed ``heartbeat``, ask ``phi`` / ``suspects``."""

    def __init__(self, config: PhiConfig | None = None) -> None:
        self.config = config or PhiConfig()
        self._nodes: dict[str, _History] = {}

    def heartbeat(self, node: str, now: float) -> None:
        """Record a heartbeat from ``node`` at time ``now``."""
        hist = self._nodes.get(node)
        if hist is None:
            if len(self._nodes) >= self.config.nodes_max:
                raise ValueError(f"more than nodes_max={self.config.nodes_max} nodes")
            self._nodes[node] = _History(now, self.config)
            return
        interval = now - hist.last
        if interval < 0:
            return  # reordered delivery: an older heartbeat says nothing new
        hist.add(interval)
        hist.last = now

    def phi(self, node: str, now: float) -> float:
        """Suspicion of ``node`` at ``now``; 0.0 for a node never heard from."""
        hist = self._nodes.get(node)
        if hist is None:
            return 0.0
        elapsed = max(0.0, now - hist.last)
        mean = hist.mean() + self.config.acceptable_pause_s
        std = max(hist.std_dev(), self.config.min_std_dev_s)
        return phi_value(elapsed, mean, std)

    def is_suspect(self, node: str, now: float) -> bool:
        hist = self._nodes.get(node)
        if hist is None:
            return False
        if now - hist.last > self.config.silence_max_s:
            return True
        return self.phi(node, now) >= self.config.threshold

    def suspects(self, now: float) -> list[str]:
        """Nodes whose phi reached the threshold (or silent past ``silence_max_s``), sorted."""
        return sorted(n for n in self._nodes if self.is_suspect(n, now))

    def last_heartbeat(self, node: str) -> float | None:
        hist = self._nodes.get(node)
        return None if hist is None else hist.last

    def rearm(self, now: float) -> None:
        """The observer itself was paused (SIGSTOP, a long GC): treat every node as heard now.

        Without this, a coordinator resumed after a pause would suspect every
        node at once, since *it* heard nothing. No interval sample is recorded.
        """
        for hist in self._nodes.values():
            hist.last = max(hist.last, now)

    def remove(self, node: str) -> None:
        """Forget ``node`` (declared dead, or left); its next heartbeat starts afresh."""
        self._nodes.pop(node, None)

    def nodes(self) -> list[str]:
        return sorted(self._nodes)
