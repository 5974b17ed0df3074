"""How often a replica's ticker wakes its loop, and that elections still start on time.

A follower that hears from its leader sleeps several ticks (messages wake it and
their pass catches the ticks up); one whose leader went silent ticks every tick
again, so its randomised election timeout fires when it should. Real drivers on a
temporary directory, on an event loop with a fake clock (``looptime``: sleeps take
no real time, the clock moves only by them) that the driver reads too, so every
timing window below is exact rather than padded for a loaded machine. The peers'
addresses are never answered (nothing listens on port 1), so the only leader a
follower hears is the Heartbeat the test delivers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import looptime
import pytest

from helpers import running, wait_until_async
from lepton_ai.consensus.core_types import PaxosConfig
from lepton_ai.consensus.driver import ReplicaDriver
from lepton_ai.consensus.driver_config import DriverConfig
from lepton_ai.consensus.peer_messages import Heartbeat
from lepton_ai.consensus.replica_disk import ReplicaStorage
from lepton_ai.consensus.server import SERVER_CODEC

TICK_S = 0.02


class Null:
    def apply(self, command: bytes) -> bytes:
        return command

    def snapshot(self) -> bytes:
        return b""

    def restore(self, data: bytes) -> None:
        pass


def on_fake_clock(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``scenario`` on a loop whose clock starts at 0 and moves only by sleeps."""
    with asyncio.Runner(loop_factory=lambda: looptime.new_event_loop(start=0.0)) as runner:
        runner.run(scenario())


def _driver(tmp_path: Path, node: int, members: tuple[int, ...]) -> ReplicaDriver:
    """Call inside the running fake loop: the driver reads that loop's clock."""
    storage, durable = ReplicaStorage.open(tmp_path / f"r{node}", fsync=False)
    return ReplicaDriver.create(
        PaxosConfig(node_id=node, members=members),
        {m: "127.0.0.1:1" for m in members},
        Null(),
        storage,
        durable,
        token="t" * 32,
        peer_codec=SERVER_CODEC,
        config=DriverConfig(tick_s=TICK_S),
        clock=asyncio.get_running_loop().time,
    )


def _heartbeat(driver: ReplicaDriver) -> None:
    driver.deliver(Heartbeat(src=0, ballot=(1, 0), commit=0, read_seq=0))
    driver._pass()


def _now() -> float:
    return asyncio.get_running_loop().time()


def test_follower_sleeps_while_it_hears_its_leader_and_ticks_each_tick_when_not(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        follower = _driver(tmp_path, 1, (0, 1, 2))
        try:
            assert follower._ticks_per_wake() == 1  # no leader known yet
            _heartbeat(follower)
            assert follower.leader_id == 0
            cap = follower.config.ticks_per_pass_max
            silence_s = follower.paxos.heartbeat_ticks * TICK_S
            # Asleep (cap - 1 ticks per wake) right up to one heartbeat interval of
            # silence, every tick from then on: long before any election timeout
            # (election_ticks_min) can run out.
            assert follower._ticks_per_wake() == cap - 1
            await asyncio.sleep(silence_s - TICK_S / 10)
            assert follower._ticks_per_wake() == cap - 1
            await asyncio.sleep(TICK_S / 10)
            assert follower._ticks_per_wake() == 1
            await asyncio.sleep(10 * TICK_S)
            assert follower._ticks_per_wake() == 1
            _heartbeat(follower)  # heard again: asleep again
            assert follower._ticks_per_wake() == cap - 1
            assert follower.paxos.heartbeat_ticks < follower.paxos.election_ticks_min
        finally:
            await follower.close()

    on_fake_clock(scenario)


@pytest.mark.timeout(30)
def test_leader_wakes_once_per_heartbeat(tmp_path: Path) -> None:
    async def scenario() -> None:
        leader = _driver(tmp_path, 0, (0,))
        async with running(leader):
            await wait_until_async(
                lambda: leader.is_leader, 5.0, "a one-member group electing itself"
            )
            heartbeat_ticks = leader.paxos.heartbeat_ticks
            assert leader._ticks_per_wake() == heartbeat_ticks
            window_ticks = 100
            passes = leader.passes
            await asyncio.sleep(window_ticks * TICK_S)  # idle: nothing else wakes it
            # One pass per wake-up, every heartbeat_ticks ticks (not every tick).
            wakes = leader.passes - passes
            assert (
                window_ticks // heartbeat_ticks - 1 <= wakes <= window_ticks // heartbeat_ticks + 1
            )

    on_fake_clock(scenario)


@pytest.mark.timeout(30)
def test_a_follower_whose_leader_goes_silent_campaigns_within_its_election_timeout(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        follower = _driver(tmp_path, 2, (0, 1, 2))  # not the lowest id: no first campaign
        async with running(follower):
            for _ in range(10):  # a leader heard for a while, then silent
                _heartbeat(follower)
                await asyncio.sleep(TICK_S)
            silent_at = _now() - TICK_S  # the last heartbeat
            await wait_until_async(
                lambda: follower.core.promised != (1, 0),
                5.0,
                "the follower campaigning",
                interval_s=TICK_S / 10,
            )
            waited_ticks = (_now() - silent_at) / TICK_S
            paxos = follower.paxos
            # Within its randomised timeout, to the tick: the sleep-longer ticker
            # delays no tick (each pass catches up the ticks due), it only batches them.
            assert paxos.election_ticks_min - 1 <= waited_ticks <= paxos.election_ticks_max + 1

    on_fake_clock(scenario)
