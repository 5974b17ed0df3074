"""Exponential back-off for every retry loop: pure, time passed in.

No jitter here: the cores must replay exactly under the seeded simulator. A caller
that needs to spread retries of many peers adds its own (seeded) jitter.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Delay after ``failures`` consecutive failures: 0, then initial_s * factor**(n-1), capped."""

    initial_s: float = 1.0
    factor: float = 2.0
    max_s: float = 60.0

    def __post_init__(self) -> None:
        if not (0 <= self.initial_s <= self.max_s) or self.factor < 1:
            raise ValueError(f"bad back-off {self}: need 0 <= initial_s <= max_s and factor >= 1")

    def next_delay(self, failures: int) -> float:
        """How long to wait after the ``failures``-th consecutive failure (0: no wait)."""
        if failures <= 0:
            return 0.0
        try:
            delay = self.initial_s * float(self.factor) ** (failures - 1)
        except OverflowError:  # a huge failure count: the cap applies
            return self.max_s
        return min(self.max_s, delay)

    def ready(self, now: float, last_failure_at: float, failures: int) -> bool:
        """May the next attempt start at ``now``?"""
        return now >= last_failure_at + self.next_delay(failures)
