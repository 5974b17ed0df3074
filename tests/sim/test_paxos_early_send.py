"""The leader's early send under faults: its Accept/Heartbeat leave before its own
fdatasync (as ``consensus.driver`` does), its acceptance counts only after it.

A leader that dies inside that sync loses the entries it had not synced while the
followers may hold them: the value is then chosen by the followers alone and must
survive; with the strict order (``early_send=False``) the followers never see it.
"""

from __future__ import annotations

import random

import pytest
from simkit import make

from lepton_ai.consensus.peer_messages import Entry
from lepton_ai.sim.cluster import DiskConfig, SimCluster
from lepton_ai.sim.fuzz import seeds_from_env
from lepton_ai.sim.network import NetConfig

SEEDS = seeds_from_env(range(5))
STALL_UNITS = 1_000  # a leader fdatasync that outlasts everything in these tests
FAST_NET = NetConfig(delay_min=1, delay_max=3)


def _stalled_proposal(c: SimCluster) -> tuple[int, bytes, Entry]:
    """With the cluster idle, propose one command at the leader and stall the leader's
    sync of it; returns (leader, command, the entry being synced)."""
    leader = c.wait_leader()
    c.one()
    c.run(3)  # idle: only heartbeats, which need no sync
    cmd = c.submit(node=leader)
    c.run_until(c.now)  # the leader's loop takes the command and starts the fdatasync
    sync = c.nodes[leader].syncing
    assert sync is not None, c.hint()
    (entry,) = sync.ready.persist_entries
    assert entry.value.commands == (cmd,), c.hint()
    assert c.stall_sync(leader, STALL_UNITS)
    return leader, cmd, entry


@pytest.mark.parametrize("seed", SEEDS)
def test_followers_accept_before_the_leader_syncs(
    seed: int, request: pytest.FixtureRequest
) -> None:
    c = make(3, seed, request, net=FAST_NET)
    leader, cmd, entry = _stalled_proposal(c)
    c.run(2)
    followers = [n for n in c.nodes if n != leader]
    for f in followers:
        assert c.nodes[f].disk.entries.get(entry.slot) == entry, (f, c.hint())
    assert entry.slot not in c.nodes[leader].disk.entries, c.hint()
    # The followers' acceptances wait in the blocked leader's inbox: nothing commits yet.
    assert cmd not in c.committed, c.hint()
    assert c.sync_stats.early_delivered_in_sync >= 2, c.hint()
    c.crash(leader, torn=False)
    assert c.sync_stats.early_entries_lost == 1, c.hint()
    c.settle()
    # A majority accepted it at one ballot: chosen, in the slot the dead leader gave it.
    assert c.committed[cmd] == entry.slot, c.hint()
    assert c.checker.chosen[entry.slot] == entry.value, c.hint()


@pytest.mark.parametrize("seed", SEEDS)
def test_a_stalled_leader_sync_commits_once_it_completes(
    seed: int, request: pytest.FixtureRequest
) -> None:
    c = make(3, seed, request, net=FAST_NET)
    leader, cmd, entry = _stalled_proposal(c)
    c.run(2)
    assert cmd not in c.committed, c.hint()
    sync = c.nodes[leader].syncing
    assert sync is not None, c.hint()
    sync.done_at = c.now + 1  # the disk recovers
    c.run(3)
    assert c.committed.get(cmd) == entry.slot, c.hint()
    assert c.nodes[leader].disk.entries.get(entry.slot) == entry, c.hint()


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_strict_order_keeps_the_entry_behind_the_sync(
    seed: int, request: pytest.FixtureRequest
) -> None:
    c = make(3, seed, request, net=FAST_NET, disk=DiskConfig(early_send=False))
    leader, cmd, entry = _stalled_proposal(c)
    c.run(2)
    assert all(entry.slot not in n.disk.entries for n in c.nodes.values()), c.hint()
    assert c.sync_stats.early_sent == 0, c.hint()
    c.crash(leader, torn=False)
    c.settle()
    # The command was never accepted anywhere: the client's retry commits it elsewhere.
    assert cmd in c.committed, c.hint()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", SEEDS)
def test_leaders_die_inside_their_sync(seed: int, request: pytest.FixtureRequest) -> None:
    """Slow disks, leaders crashing inside a sync after their early messages went out,
    torn writes: safety at every step, then everything settles."""
    disk = DiskConfig(sync_units_min=1, sync_units_max=12, crash_in_sync=0.05)
    c = make(5, seed, request, net=NetConfig(delay_min=1, delay_max=6), disk=disk)
    rng = random.Random(seed)
    for _ in range(300):
        for _ in range(rng.randint(0, 3)):
            c.submit()
        dead = [n for n in c.nodes.values() if not n.alive]
        if dead and rng.random() < 0.3:
            c.restart(rng.choice(dead).node_id)
        c.run(rng.randint(1, 4))
    c.settle(ticks_max=3_000)
    c.one()
    assert c.sync_stats.crashes_in_sync >= 3, c.hint()
    assert c.sync_stats.early_entries_lost >= 1, c.hint()
    assert c.sync_stats.early_delivered_in_sync >= 100, c.hint()
