"""Raft lab 2D, in simulation: log compaction and InstallSnapshot, with reliable and
unreliable networks, crashes, whole-cluster crashes and restart from a snapshot."""

from __future__ import annotations

import random

import pytest
from simkit import make

from lepton_ai.sim.cluster import SimCluster
from lepton_ai.sim.fuzz import seeds_from_env
from lepton_ai.sim.network import NetConfig

SEEDS = seeds_from_env(range(5))
SNAP = {"snapshot_entries": 10, "log_retain_entries": 3, "batch_commands_max": 1}
"""One command per slot, a snapshot every 10 applied slots, 3 slots kept below it."""


def log_bound(c: SimCluster) -> int:
    cfg = next(iter(c.nodes.values())).config
    return cfg.snapshot_entries + cfg.log_retain_entries + cfg.inflight_max + 2


def assert_compacted(c: SimCluster) -> None:
    for node in c.alive_nodes():
        held = len(node.replica.log.entries)
        assert held <= log_bound(c), (node.node_id, held, c.hint())
        assert len(node.disk.entries) <= log_bound(c), (node.node_id, c.hint())


@pytest.mark.parametrize("seed", SEEDS)
def test_snapshot_basic(seed: int, request: pytest.FixtureRequest) -> None:
    c = make(3, seed, request, paxos=SNAP)
    c.wait_leader()
    for _ in range(60):
        c.one()
        assert_compacted(c)
    assert all(n.replica.log.snapshot.slot >= 50 for n in c.nodes.values()), c.hint()


def _install(c: SimCluster, rng: random.Random, crash: bool) -> None:
    for _ in range(6):
        leader = c.wait_leader(ticks_max=600)
        victim = rng.choice([n for n in c.nodes if n != leader])
        if crash:
            c.crash(victim)
        else:
            c.disconnect(victim)
        for _ in range(25):  # more than snapshot_entries + log_retain_entries
            c.submit()
            c.run(1)
        c.one(expected=len(c.nodes) - 1, ticks_max=600)
        if crash:
            c.restart(victim)
        else:
            c.connect(victim)
        c.one(expected=len(c.nodes), ticks_max=600)
        assert_compacted(c)
    assert c.net.sent_by_type.get("InstallSnapshot", 0) >= 1, c.hint()


@pytest.mark.parametrize("seed", SEEDS)
def test_snapshot_install(seed: int, request: pytest.FixtureRequest) -> None:
    c = make(3, seed, request, paxos=SNAP)
    _install(c, random.Random(seed), crash=False)
    c.settle()


@pytest.mark.parametrize("seed", SEEDS)
def test_snapshot_install_unreliable(seed: int, request: pytest.FixtureRequest) -> None:
    net = NetConfig(loss=0.1, duplicate=0.1, delay_max=15, long_delay=0.02)
    c = make(3, seed, request, net=net, paxos=SNAP)
    _install(c, random.Random(seed), crash=False)
    c.settle()


@pytest.mark.parametrize("seed", SEEDS)
def test_snapshot_install_crash(seed: int, request: pytest.FixtureRequest) -> None:
    c = make(3, seed, request, paxos=SNAP)
    _install(c, random.Random(seed), crash=True)
    c.settle()


@pytest.mark.parametrize("seed", SEEDS)
def test_snapshot_all_crash(seed: int, request: pytest.FixtureRequest) -> None:
    c = make(3, seed, request, paxos=SNAP)
    c.wait_leader()
    for _ in range(5):
        for _ in range(15):
            c.submit()
            c.run(1)
        c.one()
        top = c.checker.max_chosen()
        for n in c.nodes:
            c.crash(n)
        for n in c.nodes:
            c.restart(n)
        c.wait_leader()
        slot = c.one()
        assert slot > top, c.hint()  # nothing chosen before the crash was lost
    c.settle()


@pytest.mark.parametrize("seed", SEEDS)
def test_snapshot_init(seed: int, request: pytest.FixtureRequest) -> None:
    c = make(3, seed, request, paxos=SNAP)
    c.wait_leader()
    for _ in range(25):
        c.one()
    snaps = {n: c.nodes[n].replica.log.snapshot.slot for n in c.nodes}
    assert all(s >= 20 for s in snaps.values()), (snaps, c.hint())
    for n in c.nodes:
        c.crash(n, torn=False)
        c.restart(n)
        # A restarted replica restores its snapshot before any leader exists.
        assert c.nodes[n].sm.slot >= snaps[n], c.hint()
    c.one()
    for n in c.nodes:
        c.crash(n)
    for n in c.nodes:
        c.restart(n)
    c.one()
    c.settle()
