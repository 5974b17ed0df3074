"""The one back-off (``heal.backoff.Backoff``) and the retry loops that use it.

Each loop used to double its own pause (``backoff = min(backoff * 2, max)``); the
tests pin that every loop's config still gives exactly that sequence.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from lepton_ai.consensus.client import KvClientConfig
from lepton_ai.heal.backoff import Backoff
from lepton_ai.node.client import CoordinatorClientConfig
from lepton_ai.node.executor_slots import ExecutorConfig
from lepton_ai.node.worker import WorkerConfig


def _doubling(initial_s: float, max_s: float, n: int) -> list[float]:
    """The pauses of the loops' former hand-written doubling, for n failures in a row."""
    pauses, pause = [], initial_s
    for _ in range(n):
        pauses.append(pause)
        pause = min(pause * 2, max_s)
    return pauses


def test_no_failure_no_wait_then_doubling_to_the_cap() -> None:
    backoff = Backoff(initial_s=1.0, factor=2.0, max_s=60.0)
    delays = [backoff.next_delay(n) for n in range(9)]
    assert delays == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    assert backoff.next_delay(-1) == 0.0
    assert backoff.next_delay(10**6) == 60.0  # no overflow: the cap applies


def test_ready_after_the_delay() -> None:
    backoff = Backoff(initial_s=1.0, max_s=60.0)
    assert backoff.ready(now=5.0, last_failure_at=5.0, failures=0)
    assert not backoff.ready(now=6.9, last_failure_at=5.0, failures=2)
    assert backoff.ready(now=7.0, last_failure_at=5.0, failures=2)


@pytest.mark.parametrize(
    ("initial_s", "factor", "max_s"), [(-1.0, 2.0, 1.0), (2.0, 2.0, 1.0), (1.0, 0.5, 2.0)]
)
def test_a_bad_back_off_is_refused(initial_s: float, factor: float, max_s: float) -> None:
    with pytest.raises(ValueError):
        Backoff(initial_s, factor, max_s)


LOOPS: dict[str, tuple[Callable[[], Backoff], float, float]] = {
    "executor restarts": (ExecutorConfig().restart_backoff, 0.05, 2.0),
    "worker reconnects": (WorkerConfig().reconnect_backoff, 0.05, 1.0),
    "coordinator client retries": (CoordinatorClientConfig().retry_backoff, 0.05, 0.5),
    "kv client retries": (KvClientConfig().backoff, 0.02, 0.3),
}


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_each_loop_keeps_its_numbers(loop: str) -> None:
    make, initial_s, max_s = LOOPS[loop]
    backoff = make()
    assert (backoff.initial_s, backoff.factor, backoff.max_s) == (initial_s, 2.0, max_s)
    assert [backoff.next_delay(n) for n in range(1, 13)] == _doubling(initial_s, max_s, 12)


def test_executor_restarts_pause_as_before() -> None:
    backoff = ExecutorConfig().restart_backoff()
    pauses = [backoff.next_delay(n) for n in range(1, 9)]
    assert pauses == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]


def test_a_configured_loop_follows_its_config() -> None:
    backoff = ExecutorConfig(restart_backoff_s=0.5, restart_backoff_max_s=3.0).restart_backoff()
    assert [backoff.next_delay(n) for n in range(1, 5)] == [0.5, 1.0, 2.0, 3.0]
