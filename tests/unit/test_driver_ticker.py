"""How often a replica's ticker wakes its loop, and that elections still start on time.

A follower that hears from its leader sleeps several ticks (messages wake it and
their pass catches the ticks up); one whose leader went silent ticks every tick
again, so its randomised election timeout fires when it should. Real drivers on a
temporary directory; the peers' addresses are never answered (nothing listens on
port 1), so the only leader a follower hears is the Heartbeat the test delivers.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

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


def _driver(tmp_path: Path, node: int, members: tuple[int, ...]) -> ReplicaDriver:
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
    )


def _heartbeat(driver: ReplicaDriver) -> None:
    driver.deliver(Heartbeat(src=0, ballot=(1, 0), commit=0, read_seq=0))
    driver._pass()


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
            assert follower._ticks_per_wake() == cap - 1
            # Silent for a heartbeat interval: back to every tick, long before any
            # election timeout (election_ticks_min) can run out. The switch depends on
            # the clock alone (the driver takes no clock to fake), so the test watches
            # for it and checks each look against the moment the heartbeat arrived:
            # asleep before one heartbeat interval of silence, every tick from then on.
            switch_at = follower._last_heard + follower.paxos.heartbeat_ticks * TICK_S
            looks: list[tuple[float, int, float]] = []  # (before, ticks per wake, after)

            def every_tick() -> bool:
                before = time.monotonic()
                per = follower._ticks_per_wake()
                looks.append((before, per, time.monotonic()))
                return per == 1

            await wait_until_async(every_tick, 5.0, "ticking every tick", interval_s=0.002)
            *asleep, (_, _, switched_by) = looks
            assert all(before < switch_at for before, _, _ in asleep), (switch_at, looks)
            assert switched_by >= switch_at, (switch_at, looks)  # not before the silence
            assert follower.paxos.heartbeat_ticks < follower.paxos.election_ticks_min
        finally:
            await follower.close()

    asyncio.run(scenario())


@pytest.mark.timeout(30)
def test_leader_wakes_once_per_heartbeat(tmp_path: Path) -> None:
    async def scenario() -> None:
        leader = _driver(tmp_path, 0, (0,))
        async with running(leader):
            await wait_until_async(
                lambda: leader.is_leader, 5.0, "a one-member group electing itself"
            )
            assert leader._ticks_per_wake() == leader.paxos.heartbeat_ticks
            passes, t1 = leader.passes, time.monotonic()
            await asyncio.sleep(0.5)  # a measuring window (nothing to wait for): count passes
            elapsed_ticks = (time.monotonic() - t1) / TICK_S
            # Idle: one pass per wake-up, every heartbeat_ticks ticks (not every tick).
            assert leader.passes - passes <= elapsed_ticks / leader.paxos.heartbeat_ticks + 3

    asyncio.run(scenario())


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
            silent_at = time.monotonic()
            await wait_until_async(
                lambda: follower.core.promised != (1, 0),
                5.0,
                "the follower campaigning",
                interval_s=0.002,
            )
            waited_s = time.monotonic() - silent_at
            paxos = follower.paxos
            # Not before the shortest timeout; not much after the longest one (the
            # sleep-longer ticker must not delay it by its nap: generous load margin).
            assert waited_s >= paxos.election_ticks_min * TICK_S * 0.9
            assert waited_s <= paxos.election_ticks_max * TICK_S + 0.5

    asyncio.run(scenario())
