"""How a leader's driver groups proposals into log slots (one real replica, no network).

A one-member group on a temporary directory: the lowest id of a new group campaigns
at once, an idle leader's commands go out at once (a burst in one slot, and a command
that a commit's apply proposes), and commands that queued up behind the last slot
wait ``batch_interval_s`` after it and share the next one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from helpers import running, wait_until_async
from lepton_ai.consensus.core_types import PaxosConfig
from lepton_ai.consensus.driver import ReplicaDriver
from lepton_ai.consensus.driver_config import DriverConfig
from lepton_ai.consensus.replica_disk import ReplicaStorage
from lepton_ai.consensus.server import SERVER_CODEC

INTERVAL_S = 0.3  # large against scheduling noise on a loaded machine


class Recorder:
    """A state machine that remembers what it applied."""

    def __init__(self) -> None:
        self.applied: list[bytes] = []
        self.on_apply: Callable[[bytes], None] | None = None

    def apply(self, command: bytes) -> bytes:
        self.applied.append(command)
        if self.on_apply is not None:
            self.on_apply(command)
        return command

    def snapshot(self) -> bytes:
        return b"\n".join(self.applied)

    def restore(self, data: bytes) -> None:
        self.applied = data.split(b"\n") if data else []


def _driver(
    tmp_path: Path, interval_s: float, per_pass: int = 2048
) -> tuple[ReplicaDriver, Recorder]:
    storage, durable = ReplicaStorage.open(tmp_path / "r0", fsync=False)
    machine = Recorder()
    driver = ReplicaDriver.create(
        PaxosConfig(node_id=0, members=(0,)),
        {0: "127.0.0.1:1"},  # never dialled: a one-member group has no peer links
        machine,
        storage,
        durable,
        token="t" * 32,
        peer_codec=SERVER_CODEC,
        config=DriverConfig(batch_interval_s=interval_s, proposals_per_pass_max=per_pass),
    )
    return driver, machine


async def _leading(driver: ReplicaDriver) -> float:
    t0 = time.monotonic()
    await wait_until_async(
        lambda: driver.is_leader, 5.0, "the only member of a new group leading", interval_s=0.001
    )
    return time.monotonic() - t0


@pytest.mark.timeout(30)
def test_an_idle_leader_does_not_wait_and_a_burst_shares_one_slot(tmp_path: Path) -> None:
    async def scenario() -> None:
        driver, machine = _driver(tmp_path, INTERVAL_S)
        async with running(driver):
            # Immediate first election: well below election_ticks_min (10 ticks, 0.2 s).
            assert await _leading(driver) < 0.15
            t0 = time.monotonic()
            assert await driver.submit(b"first") == b"first"
            assert time.monotonic() - t0 < INTERVAL_S / 2  # idle leader: no pacing delay
            slot_before = driver.core.log.last
            t1 = time.monotonic()
            burst = [driver.submit(f"c{i}".encode()) for i in range(50)]
            results = await asyncio.gather(*burst)
            # Nothing was queued when "first" committed: still idle, so no wait.
            assert time.monotonic() - t1 < INTERVAL_S / 2
            assert results == [f"c{i}".encode() for i in range(50)]
            assert driver.core.log.last == slot_before + 1  # all 50 in one slot
            assert machine.applied == [b"first", *results]

    asyncio.run(scenario())


@pytest.mark.timeout(30)
def test_commands_queued_behind_a_slot_wait_the_interval(tmp_path: Path) -> None:
    interval_s = 0.1

    async def scenario() -> None:
        # 10 commands per pass: a burst of 50 leaves 40 queued behind its first slot,
        # a stream as far as pacing is concerned.
        driver, machine = _driver(tmp_path, interval_s, per_pass=10)
        async with running(driver):
            await _leading(driver)
            slot_before = driver.core.log.last
            t0 = time.monotonic()
            results = await asyncio.gather(*[driver.submit(b"%d" % i) for i in range(50)])
            waited = time.monotonic() - t0
            assert results == [b"%d" % i for i in range(50)]
            assert driver.core.log.last == slot_before + 5  # 10 a slot ...
            assert waited >= 4 * interval_s * 0.9  # ... one interval apart
            assert machine.applied == results

    asyncio.run(scenario())


@pytest.mark.timeout(30)
def test_a_command_proposed_by_an_apply_goes_at_once(tmp_path: Path) -> None:
    """A job's JobFinished, proposed when its last TaskFinished applies, must not wait
    out the interval since that TaskFinished's slot: it is on the job's critical path."""

    async def scenario() -> None:
        driver, machine = _driver(tmp_path, INTERVAL_S)
        applied_next = asyncio.Event()
        async with running(driver):
            await _leading(driver)

            def chain(command: bytes) -> None:
                if command == b"last-task":
                    driver.propose_cb(b"job-finished", lambda r, e: applied_next.set())

            machine.on_apply = chain
            t0 = time.monotonic()
            await driver.submit(b"last-task")
            await asyncio.wait_for(applied_next.wait(), 5.0)
            assert time.monotonic() - t0 < INTERVAL_S / 2
            assert machine.applied == [b"last-task", b"job-finished"]

    asyncio.run(scenario())


def test_bad_pacing_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="slots_in_flight_max"):
        DriverConfig(slots_in_flight_max=0)
    with pytest.raises(ValueError, match="batch_interval_s"):
        DriverConfig(batch_interval_s=-1.0)
