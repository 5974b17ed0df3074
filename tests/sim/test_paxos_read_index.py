"""Linearizable reads by read index in simulation. The simulator checks every released
read: the replica must have applied every slot chosen anywhere before the read began."""

from __future__ import annotations

import random

import pytest
from simkit import make

from lepton_ai.consensus.core import NotLeader
from lepton_ai.sim.fuzz import seeds_from_env
from lepton_ai.sim.network import NetConfig

SEEDS = seeds_from_env(range(5))


@pytest.mark.parametrize("seed", SEEDS)
def test_read_after_write(seed: int, request: pytest.FixtureRequest) -> None:
    c = make(3, seed, request)
    c.wait_leader()
    for _ in range(5):
        slot = c.one(expected=1)
        rid = c.read()
        assert rid is not None, c.hint()
        c.run(10)
        assert c.reads_done.get(rid) is True, c.hint()
        leader = c.leader_node()
        assert leader is not None and leader.sm.slot >= slot, c.hint()


@pytest.mark.parametrize("seed", SEEDS)
def test_read_on_follower_is_refused(seed: int, request: pytest.FixtureRequest) -> None:
    c = make(3, seed, request)
    c.wait_leader()
    c.run(10)  # every follower has heard a heartbeat by now
    leader = c.wait_leader()
    follower = next(n for n in c.nodes if n != leader)
    with pytest.raises(NotLeader) as exc:
        c.nodes[follower].replica.read_index(1)
    assert exc.value.leader == str(leader)


@pytest.mark.parametrize("seed", SEEDS)
def test_partitioned_leader_cannot_serve_reads(seed: int, request: pytest.FixtureRequest) -> None:
    c = make(5, seed, request)
    old = c.wait_leader()
    c.one()
    c.disconnect(old)
    rid = c.read(node=old)  # the deposed leader still believes it leads
    c.wait_leader()
    c.one(expected=4)  # the majority moves on
    c.run(50)
    assert rid is not None
    assert c.reads_done.get(rid) is not True, c.hint()  # never released stale
    c.connect(old)
    c.run(50)
    assert c.reads_done.get(rid) is False, c.hint()  # failed once it learned


@pytest.mark.parametrize("seed", SEEDS)
def test_reads_under_faults(seed: int, request: pytest.FixtureRequest) -> None:
    net = NetConfig(loss=0.05, duplicate=0.05, delay_max=10, long_delay=0.02)
    c = make(5, seed, request, net=net)
    rng = random.Random(seed)
    c.wait_leader(ticks_max=400)
    for _ in range(200):
        c.submit()
        if rng.random() < 0.5:
            c.read()
        if rng.random() < 0.05:
            leader = c.leader_node()
            if leader is not None:
                c.crash(leader.node_id)
        if rng.random() < 0.1:
            c.restart(rng.choice(sorted(c.nodes)))
        c.run(rng.randint(1, 3))
    c.settle()
    done = [ok for ok in c.reads_done.values() if ok]
    assert len(done) > 10, (len(done), c.hint())  # the checks above are not vacuous
