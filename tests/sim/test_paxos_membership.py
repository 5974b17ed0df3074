"""Single-member configuration changes in simulation: add, remove (the leader too),
replace a dead replica, one change at a time, and changes under crashes."""

from __future__ import annotations

import random

import pytest
from simkit import make

from lepton_ai.consensus.core import Overloaded
from lepton_ai.sim.cluster import SimCluster
from lepton_ai.sim.fuzz import seeds_from_env

SEEDS = seeds_from_env(range(5))


def wait_members(c: SimCluster, members: set[int], ticks_max: int = 300) -> None:
    for _ in range(ticks_max):
        c.run(1)
        leader = c.leader_node()
        if leader is not None and set(leader.replica.members) == members:
            return
    raise AssertionError(f"configuration {sorted(members)} not committed; {c.hint()}")


@pytest.mark.parametrize("seed", SEEDS)
def test_add_member(seed: int, request: pytest.FixtureRequest) -> None:
    c = make(3, seed, request)
    c.wait_leader()
    c.one()
    c.add_node(4)
    wait_members(c, {1, 2, 3, 4})
    slot = c.one(expected=4)
    assert c.nodes[4].sm.slot >= slot, c.hint()  # the new member caught up and applies
    # With four members the quorum is three: two down means no progress.
    leader = c.wait_leader()
    down = [n for n in c.nodes if n != leader][:2]
    for n in down:
        c.crash(n)
    cmd = c.submit()
    c.run(100)
    assert cmd not in c.committed, c.hint()
    for n in down:
        c.restart(n)
    c.settle()


@pytest.mark.parametrize("seed", SEEDS)
def test_remove_leader(seed: int, request: pytest.FixtureRequest) -> None:
    c = make(3, seed, request)
    leader = c.wait_leader()
    c.one()
    c.remove_node(leader)
    rest = set(c.nodes) - {leader}
    wait_members(c, rest)
    new_leader = c.wait_leader()
    assert new_leader != leader, c.hint()
    c.crash(leader)  # the removed replica is no longer needed
    c.one(expected=2)
    c.settle()


@pytest.mark.parametrize("seed", SEEDS)
def test_replace_dead_member(seed: int, request: pytest.FixtureRequest) -> None:
    c = make(3, seed, request, paxos={"snapshot_entries": 10, "log_retain_entries": 2})
    leader = c.wait_leader()
    for _ in range(20):
        c.one()
    dead = next(n for n in c.nodes if n != leader)
    c.crash(dead)
    c.add_node(4)  # caught up by snapshot: the log before it was compacted
    wait_members(c, {1, 2, 3, 4})
    c.remove_node(dead)
    wait_members(c, {1, 2, 3, 4} - {dead})
    slot = c.one(expected=3)
    assert c.nodes[4].sm.slot >= slot, c.hint()
    assert c.net.sent_by_type.get("InstallSnapshot", 0) >= 1, c.hint()
    c.settle()


@pytest.mark.parametrize("seed", SEEDS)
def test_one_change_at_a_time(seed: int, request: pytest.FixtureRequest) -> None:
    c = make(3, seed, request)
    c.wait_leader()
    c.one()
    leader = c.wait_leader()
    c.nodes[leader].replica.add_member(4)
    with pytest.raises(Overloaded):
        c.nodes[leader].replica.add_member(5)
    with pytest.raises(ValueError):
        c.nodes[leader].replica.remove_member(99)


@pytest.mark.parametrize("seed", SEEDS)
def test_membership_churn(seed: int, request: pytest.FixtureRequest) -> None:
    c = make(3, seed, request)
    rng = random.Random(seed)
    c.wait_leader()
    next_id = 4
    for _ in range(6):
        leader = c.wait_leader(ticks_max=400)
        members = set(c.nodes[leader].replica.members)
        if len(members) <= 3:
            c.add_node(next_id)
            members.add(next_id)
            next_id += 1
        else:
            victim = rng.choice(sorted(members))
            c.remove_node(victim)
            members.discard(victim)
        for _ in range(5):
            c.submit()
        if rng.random() < 0.5:
            c.crash(rng.choice(sorted(members)))
        c.run(rng.randint(1, 20))
        for n in list(c.nodes):
            c.restart(n)
        wait_members(c, members, ticks_max=600)
    c.settle()
