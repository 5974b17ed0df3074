"""The warm-spare pool starts a spare only when its node runs nothing (or waited too long).

``SparePool._until_idle`` reads the loop's clock and sleeps on it, so the tests run
it on an event loop with a fake clock (``looptime``): sleeps take no real time and
``loop.time()`` moves only by them, so each scripted timeline gives an exact answer
and no test waits for a guessed while.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import looptime
import pytest

from lepton_ai.node.executor_slots import ExecutorConfig, SparePool

IDLE_FOR_S = 0.3  # a lull must last this long; far longer than a poll, so a gap is no lull
POLL_S = 0.005


class Slot:
    """Stands in for an ``ExecutorSlot``: the pool reads only ``outstanding``, which
    is busy during the given ``(start, end)`` windows of loop time."""

    def __init__(self, busy: list[tuple[float, float]]) -> None:
        self.busy = busy

    @property
    def outstanding(self) -> dict[str, object]:
        now = asyncio.get_running_loop().time()
        running = any(start <= now < end for start, end in self.busy)
        return {"attempt": object()} if running else {}


def _pool(wait_s: float) -> SparePool:
    config = ExecutorConfig(
        spares_idle_for_s=IDLE_FOR_S, spares_idle_wait_s=wait_s, spares_idle_poll_s=POLL_S
    )
    return SparePool(1, lambda: ("w", "/nonexistent"), config)


def on_fake_clock(main: Callable[[], Coroutine[Any, Any, float]]) -> float:
    """Run ``main`` on a loop whose clock starts at 0 and moves only by its sleeps."""
    with asyncio.Runner(loop_factory=lambda: looptime.new_event_loop(start=0.0)) as runner:
        return runner.run(main())


def _returns_at(slots: list[Any], wait_s: float) -> float:
    """The loop time at which the pool decided a spare may start."""

    async def main() -> float:
        await _pool(wait_s)._until_idle(slots)
        return asyncio.get_running_loop().time()

    return on_fake_clock(main)


def test_spare_start_waits_for_an_idle_node() -> None:
    # Busy until 1.0; a 0.1 s gap between two tasks (no lull); busy again until 2.0;
    # the other slot idle throughout. The lull starts at 2.0 and must last IDLE_FOR_S.
    slots: list[Any] = [Slot([]), Slot([(0.0, 1.0), (1.1, 2.0)])]
    assert _returns_at(slots, wait_s=10.0) == pytest.approx(2.0 + IDLE_FOR_S, abs=2 * POLL_S)


def test_a_gap_shorter_than_the_lull_is_not_one() -> None:
    # Gaps of IDLE_FOR_S / 2 every second until 5.0: only the idle node after 5.0 counts.
    windows = [(float(t), t + 1.0 - IDLE_FOR_S / 2) for t in range(5)]
    assert _returns_at([Slot(windows)], wait_s=10.0) == pytest.approx(
        5.0 - IDLE_FOR_S / 2 + IDLE_FOR_S, abs=2 * POLL_S
    )


def test_spare_start_waits_no_longer_than_its_bound() -> None:
    # Never idle: the pool gives up waiting at its bound, not before, not much after.
    assert _returns_at([Slot([(0.0, 1e9)])], wait_s=3.0) == pytest.approx(3.0, abs=2 * POLL_S)


def test_an_idle_node_starts_a_spare_after_one_lull() -> None:
    assert _returns_at([Slot([]), Slot([])], wait_s=10.0) == pytest.approx(
        IDLE_FOR_S, abs=2 * POLL_S
    )
