"""The warm-spare pool starts a spare only when its node runs nothing (or waited too long).

``SparePool._until_idle`` reads the loop's clock and sleeps on it (no clock to inject),
so the tests do not sleep for a guessed while: a fake slot counts how often the pool
looked at it, and the test waits for the pool to have looked (seen the state the test
set up) a given number of times.
"""

from __future__ import annotations

import asyncio
from typing import Any

from helpers import wait_until_async
from lepton_ai.node.executor_slots import ExecutorConfig, SparePool

IDLE_FOR_S = 0.3  # a lull must last this long; far longer than a poll, so a gap is no lull
POLL_S = 0.005


class Slot:
    """Stands in for an ``ExecutorSlot``: the pool reads only ``outstanding``."""

    def __init__(self, busy: bool) -> None:
        self._outstanding: dict[str, object] = {"attempt": object()} if busy else {}
        self.looks = 0  # how many times the pool read ``outstanding``

    @property
    def outstanding(self) -> dict[str, object]:
        self.looks += 1
        return self._outstanding


def _pool(wait_s: float) -> SparePool:
    config = ExecutorConfig(
        spares_idle_for_s=IDLE_FOR_S, spares_idle_wait_s=wait_s, spares_idle_poll_s=POLL_S
    )
    return SparePool(1, lambda: ("w", "/nonexistent"), config)


async def _looked(slot: Slot, times: int) -> None:
    """Until the pool has read ``slot`` ``times`` more times."""
    target = slot.looks + times
    await wait_until_async(lambda: slot.looks >= target, 5.0, f"the pool polled {times} times")


def test_spare_start_waits_for_an_idle_node() -> None:
    async def main() -> None:
        busy, idle = Slot(busy=True), Slot(busy=False)
        slots: list[Any] = [idle, busy]
        waiting = asyncio.ensure_future(_pool(10.0)._until_idle(slots))
        await _looked(busy, 20)  # many polls that saw a task running
        assert not waiting.done()  # one slot still runs a task
        busy._outstanding.clear()
        await _looked(busy, 1)  # the pool saw the gap ...
        busy._outstanding["next"] = object()  # ... but a gap between two tasks is no lull
        await _looked(busy, 20)
        assert not waiting.done()
        busy._outstanding.clear()
        t0 = asyncio.get_running_loop().time()
        await asyncio.wait_for(waiting, 5.0)
        # It returned for the lull, after the lull had lasted long enough.
        assert asyncio.get_running_loop().time() - t0 >= IDLE_FOR_S - POLL_S

    asyncio.run(main())


def test_spare_start_waits_no_longer_than_its_bound() -> None:
    async def main() -> None:
        slots: list[Any] = [Slot(busy=True)]
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await asyncio.wait_for(_pool(0.05)._until_idle(slots), 1.0)
        assert 0.04 <= loop.time() - t0 < 0.5

    asyncio.run(main())
