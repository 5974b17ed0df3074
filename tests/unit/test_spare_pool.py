"""The warm-spare pool starts a spare only when its node runs nothing (or waited too long)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from lepton_ai.node.executors import ExecutorConfig, SparePool


def _pool(wait_s: float) -> SparePool:
    config = ExecutorConfig(
        spares_idle_for_s=0.03, spares_idle_wait_s=wait_s, spares_idle_poll_s=0.005
    )
    return SparePool(1, lambda: ("w", "/nonexistent"), config)


def test_spare_start_waits_for_an_idle_node() -> None:
    async def main() -> None:
        busy: Any = SimpleNamespace(outstanding={"attempt": object()})
        idle: Any = SimpleNamespace(outstanding={})
        waiting = asyncio.ensure_future(_pool(10.0)._until_idle([idle, busy]))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # one slot still runs a task
        busy.outstanding.clear()
        await asyncio.sleep(0.01)
        busy.outstanding["next"] = object()  # a gap between two tasks is no lull
        await asyncio.sleep(0.05)
        assert not waiting.done()
        busy.outstanding.clear()
        await asyncio.wait_for(waiting, 1.0)

    asyncio.run(main())


def test_spare_start_waits_no_longer_than_its_bound() -> None:
    async def main() -> None:
        busy: Any = SimpleNamespace(outstanding={"attempt": object()})
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await asyncio.wait_for(_pool(0.05)._until_idle([busy]), 1.0)
        assert 0.04 <= loop.time() - t0 < 0.5

    asyncio.run(main())
