"""Raft lab 2C, in simulation: persistence across crashes (each crash may tear the Ready
being written), figure 8 with 1,000 leader crashes, figure 8 over an unreliable network,
reliable and unreliable churn."""

from __future__ import annotations

import random

import pytest
from simkit import make

from lepton_ai.sim.cluster import SimCluster
from lepton_ai.sim.fuzz import seeds_from_env
from lepton_ai.sim.network import NetConfig

SEEDS = seeds_from_env(range(5))


@pytest.mark.parametrize("seed", SEEDS)
def test_persist1(seed: int, request: pytest.FixtureRequest) -> None:
    c = make(3, seed, request)
    c.wait_leader()
    c.one()
    for n in c.nodes:  # crash and restart everyone
        c.crash(n)
    for n in c.nodes:
        c.restart(n)
    c.one()
    leader = c.wait_leader()
    c.crash(leader)
    c.restart(leader)
    c.one()
    leader = c.wait_leader()
    c.crash(leader)
    c.one(expected=2)
    c.restart(leader)
    c.one()
    c.settle()
    # Every command survived the restarts: the re-applied prefix matches (checked), and
    # every node applied all of it.
    assert all(b"cmd-%d" % i in c.committed for i in range(1, 6)), c.hint()


@pytest.mark.parametrize("seed", SEEDS)
def test_persist2(seed: int, request: pytest.FixtureRequest) -> None:
    c = make(5, seed, request)
    c.wait_leader()
    for _ in range(5):
        c.one()
        leader = c.wait_leader()
        a, b = [n for n in c.nodes if n != leader][:2]
        c.crash(a)
        c.crash(b)
        c.one(expected=3)
        c.crash(leader)
        c.crash(next(n for n in c.nodes if n not in (a, b, leader)))
        c.restart(a)
        c.restart(b)
        c.wait_leader()
        c.restart(leader)
        c.one(expected=4)
        for n in c.nodes:
            c.restart(n)
    c.settle()


@pytest.mark.parametrize("seed", SEEDS)
def test_persist3(seed: int, request: pytest.FixtureRequest) -> None:
    c = make(3, seed, request)
    c.wait_leader()
    c.one()
    leader = c.wait_leader()
    follower = next(n for n in c.nodes if n != leader)
    c.disconnect(follower)
    c.one(expected=2)
    c.crash(leader)  # with a torn last write
    c.restart(follower)
    c.connect(follower)
    c.one(expected=2)
    c.restart(leader)
    c.one(expected=3)
    c.settle()


def _figure8(c: SimCluster, rng: random.Random, iters: int) -> int:
    """Crash whichever replica leads, again and again, while proposing: a command from
    an old leader's log must never overwrite one chosen later (figure 8)."""
    n = len(c.nodes)
    crashes = 0
    for _ in range(iters):
        leader = c.leader_node()
        if leader is not None:
            c.submit(node=leader.node_id)
        c.run(rng.randint(1, 4) if rng.random() < 0.9 else rng.randint(5, 30))
        leader = c.leader_node()
        if leader is not None:
            c.crash(leader.node_id)
            crashes += 1
        up = [x for x in c.nodes.values() if x.alive]
        if len(up) < n // 2 + 1:
            c.restart(rng.choice([x for x in c.nodes if not c.nodes[x].alive]))
    return crashes


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", SEEDS[:1])
def test_figure8(seed: int, request: pytest.FixtureRequest) -> None:
    c = make(5, seed, request, paxos={"election_ticks_min": 5, "election_ticks_max": 10})
    rng = random.Random(seed)
    c.wait_leader()
    c.one()
    crashes = 0
    while crashes < 1000:
        crashes += _figure8(c, rng, 100)
    c.settle(ticks_max=3_000)
    c.one()
    assert crashes >= 1000


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", SEEDS[:2])
def test_figure8_unreliable(seed: int, request: pytest.FixtureRequest) -> None:
    net = NetConfig(loss=0.1, duplicate=0.05, delay_max=20, long_delay=0.1, long_delay_max=400)
    c = make(5, seed, request, net=net)
    rng = random.Random(seed)
    c.wait_leader(ticks_max=600)
    for _ in range(300):
        if rng.random() < 0.7:
            c.submit()
        c.run(rng.randint(1, 6))
        leader = c.leader_node()
        if leader is not None and rng.random() < 0.1:
            c.disconnect(leader.node_id)
        if rng.random() < 0.2:
            c.connect(rng.choice(sorted(c.nodes)))
    c.settle(ticks_max=4_000)
    c.one()


def _churn(c: SimCluster, rng: random.Random, steps: int) -> None:
    for _ in range(steps):
        for _ in range(rng.randint(0, 3)):
            c.submit()  # clients keep submitting throughout
        r = rng.random()
        node = rng.choice(sorted(c.nodes))
        if r < 0.2:
            c.disconnect(node)
        elif r < 0.5:
            c.connect(node)
        elif r < 0.6:
            c.crash(node)
        elif r < 0.8:
            c.restart(node)
        c.run(rng.randint(1, 8))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", SEEDS)
def test_reliable_churn(seed: int, request: pytest.FixtureRequest) -> None:
    c = make(5, seed, request)
    _churn(c, random.Random(seed), 200)
    c.settle(ticks_max=3_000)
    c.one()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", SEEDS)
def test_unreliable_churn(seed: int, request: pytest.FixtureRequest) -> None:
    net = NetConfig(loss=0.1, duplicate=0.1, delay_max=15, long_delay=0.05)
    c = make(5, seed, request, net=net, drift=0.2)
    _churn(c, random.Random(seed), 200)
    c.settle(ticks_max=4_000)
    c.one()
