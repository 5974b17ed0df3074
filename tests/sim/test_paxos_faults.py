"""Fault models beyond the Raft lab list: asymmetric partitions, replayed stale messages
from a confused peer, clock drift, and torn writes on every crash."""

from __future__ import annotations

import random

import pytest
from simkit import make

from lepton_ai.sim.fuzz import seeds_from_env
from lepton_ai.sim.network import NetConfig

SEEDS = seeds_from_env(range(5))


@pytest.mark.parametrize("seed", SEEDS)
def test_leader_that_cannot_hear_steps_down(seed: int, request: pytest.FixtureRequest) -> None:
    c = make(3, seed, request)
    leader = c.wait_leader()
    c.one()
    for other in c.nodes:
        if other != leader:
            c.net.blocked.add((other, leader))  # the leader talks but hears nothing
    c.run(60)
    # check-quorum: a leader that hears no majority gives up within ~election_ticks_max
    assert not c.nodes[leader].replica.is_leader, c.hint()
    c.net.heal()
    c.wait_leader()
    c.one()


@pytest.mark.parametrize("seed", SEEDS)
def test_follower_that_cannot_speak(seed: int, request: pytest.FixtureRequest) -> None:
    c = make(3, seed, request)
    leader = c.wait_leader()
    mute = next(n for n in c.nodes if n != leader)
    c.net.blocked.add((mute, leader))  # hears the leader, its acks are lost
    for _ in range(5):
        c.one(expected=2)
    assert c.nodes[leader].replica.is_leader, c.hint()  # the other follower suffices
    c.net.heal()
    c.one(expected=3)


@pytest.mark.parametrize("seed", SEEDS)
def test_confused_peer_replays_stale_messages(seed: int, request: pytest.FixtureRequest) -> None:
    # Old Prepares, Accepts, Promises and Nacks come back long after they were sent.
    net = NetConfig(replay=0.2, delay_max=8)
    c = make(5, seed, request, net=net)
    rng = random.Random(seed)
    c.wait_leader(ticks_max=400)
    for _ in range(150):
        c.submit()
        if rng.random() < 0.05:
            leader = c.leader_node()
            if leader is not None:
                c.crash(leader.node_id)
        if rng.random() < 0.1:
            c.restart(rng.choice(sorted(c.nodes)))
        c.run(rng.randint(1, 3))
    c.settle()
    assert len(c.committed) >= 150, c.hint()


@pytest.mark.parametrize("seed", SEEDS)
def test_clock_drift(seed: int, request: pytest.FixtureRequest) -> None:
    c = make(5, seed, request, drift=0.5)  # ticks from 5 to 15 simulation units apart
    c.wait_leader()
    periods = {n.tick_period for n in c.nodes.values()}
    assert len(periods) > 1, c.hint()
    for _ in range(20):
        c.one()
    leader = c.wait_leader()
    c.crash(leader)
    c.wait_leader()
    c.one(expected=4)
    c.restart(leader)
    c.settle()


@pytest.mark.parametrize("seed", SEEDS)
def test_torn_writes_on_every_crash(seed: int, request: pytest.FixtureRequest) -> None:
    c = make(3, seed, request, paxos={"snapshot_entries": 8, "log_retain_entries": 2})
    rng = random.Random(seed)
    c.wait_leader()
    for _ in range(60):
        for _ in range(rng.randint(1, 4)):
            c.submit()
        c.run(rng.randint(0, 2))
        # Crash in the middle of whatever the node is writing (a random prefix survives).
        c.crash(rng.choice(sorted(c.nodes)), torn=True)
        c.run(rng.randint(1, 5))
        for n in c.nodes:
            c.restart(n)
    c.settle()
    assert len(c.committed) > 60, c.hint()
