"""Raft lab 2A, in simulation: initial election, re-election, many elections, and the
message count of an election. Each test runs a few seeds (``LEPTON_SIM_SEED`` /
``LEPTON_SIM_SEEDS`` override); a failure prints the seed and the replay command."""

from __future__ import annotations

import random

import pytest
from simkit import make

from lepton_ai.sim.fuzz import seeds_from_env

SEEDS = seeds_from_env(range(5))


@pytest.mark.parametrize("seed", SEEDS)
def test_initial_election(seed: int, request: pytest.FixtureRequest) -> None:
    c = make(3, seed, request)
    c.wait_leader(ticks_max=60)
    c.run(30)  # a split vote may still be settling; then everyone agrees on one ballot
    leader = c.wait_leader(ticks_max=60)
    ballot = c.nodes[leader].replica.promised
    assert all(n.replica.promised == ballot for n in c.nodes.values()), c.hint()
    # No failures: the leader and its ballot must stay put (no spurious elections).
    c.run(200)
    assert c.leaders() == [leader], c.hint()
    assert c.nodes[leader].replica.promised == ballot, c.hint()


@pytest.mark.parametrize("seed", SEEDS)
def test_re_election(seed: int, request: pytest.FixtureRequest) -> None:
    c = make(3, seed, request)
    leader1 = c.wait_leader()
    c.disconnect(leader1)
    leader2 = c.wait_leader()
    assert leader2 != leader1, c.hint()
    # The old leader rejoins: it must not disturb the new one for long.
    c.connect(leader1)
    leader3 = c.wait_leader()
    assert c.followed_leader() == leader3, c.hint()
    # No quorum: no leader may be followed by a majority.
    others = [n for n in c.nodes if n != leader3]
    c.disconnect(leader3)
    c.disconnect(others[0])
    c.run(100)
    assert c.followed_leader() is None, c.hint()
    c.connect(others[0])
    c.wait_leader()
    c.connect(leader3)
    c.wait_leader()


@pytest.mark.parametrize("seed", SEEDS)
def test_many_elections(seed: int, request: pytest.FixtureRequest) -> None:
    c = make(7, seed, request)
    rng = random.Random(seed)
    c.wait_leader()
    for _ in range(10):
        cut = rng.sample(sorted(c.nodes), 3)
        for n in cut:
            c.disconnect(n)
        # Four of seven remain connected: still a quorum, so a leader must appear.
        leader = c.wait_leader()
        assert leader not in cut, c.hint()
        for n in cut:
            c.connect(n)
    c.wait_leader()
    c.one()


@pytest.mark.parametrize("seed", SEEDS)
def test_message_count_per_election(seed: int, request: pytest.FixtureRequest) -> None:
    c = make(3, seed, request)
    c.wait_leader(ticks_max=60)
    prepares = c.net.sent_by_type.get("Prepare", 0)
    promises = c.net.sent_by_type.get("Promise", 0)
    # One election round costs (n-1) prepares and at most (n-1) promises; allow a
    # couple of split votes.
    assert 2 <= prepares <= 3 * 2, (prepares, c.hint())
    assert promises <= prepares, (promises, c.hint())
    before = c.messages_sent()
    c.run(100)
    # Idle: only heartbeats and their acks, one pair per follower every heartbeat_ticks.
    idle = c.messages_sent() - before
    assert idle <= 2 * 2 * (100 // 2 + 1), (idle, c.hint())
    assert c.net.sent_by_type.get("Prepare", 0) == prepares, c.hint()
