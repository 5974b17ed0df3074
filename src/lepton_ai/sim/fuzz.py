"""Seeded random fault schedules (VOPR style): one seed -> one cluster, one fault plan.

``run_seed(seed)`` picks the cluster size, network faults, clock drift and Paxos bounds
from the seed, then for ``fault_ticks`` mixes client load and reads with crashes (torn
writes included), restarts, symmetric and asymmetric partitions and, for some seeds,
membership changes, and the disk: how long an fdatasync takes (the window in which a
leader's early Accept/Heartbeat are out and its own write is not durable) and how often
a leader dies inside it. Safety is checked at every step; at the end the faults stop and
``SimCluster.settle`` demands a leader, every command committed and every replica
caught up. A failure names the seed and the command that replays it.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

from lepton_ai.consensus.core_types import NotLeader, Overloaded
from lepton_ai.sim.cluster import UNIT, DiskConfig, LivenessViolation, SimCluster
from lepton_ai.sim.network import NetConfig

SEEDS_ENV = "LEPTON_SIM_SEEDS"
SEED_ENV = "LEPTON_SIM_SEED"
MESSAGES_PER_NODE_TICK_MAX = 20.0
RECOVERY_TICKS_MAX = 200.0
"""Once faults stop, a leader followed by a majority within this many ticks (about ten
election timeouts; measured: median 6, p99 25, max 49 over 400 seeds)."""


def seeds_from_env(default: range) -> list[int]:
    """``LEPTON_SIM_SEED=n`` runs one seed; ``LEPTON_SIM_SEEDS=N`` runs 0..N-1 and
    ``LEPTON_SIM_SEEDS=a-b`` runs a..b inclusive; otherwise ``default``."""
    one = os.environ.get(SEED_ENV)
    if one:
        return [int(one)]
    many = os.environ.get(SEEDS_ENV)
    if not many:
        return list(default)
    if "-" in many:
        lo, hi = many.split("-", 1)
        return list(range(int(lo), int(hi) + 1))
    return list(range(int(many)))


@dataclass(slots=True)
class FuzzReport:
    seed: int
    nodes: int
    ticks: int
    committed: int
    crashes: int
    messages: int
    snapshots_installed: int
    membership_changes: int
    recovery_ticks: float
    """From the end of the faults to a leader followed by a majority."""
    early_delivered_in_sync: int = 0
    """Leader messages a peer received before the leader's own sync completed."""
    crashes_in_sync: int = 0
    early_entries_lost: int = 0
    """Entries a leader had sent early and lost in a crash before its sync completed."""


def make_cluster(seed: int, name: str) -> tuple[SimCluster, random.Random]:
    plan = random.Random(seed ^ 0x5EED)
    n = plan.choice((3, 3, 5, 5, 1, 4))
    net = NetConfig(
        delay_min=1,
        delay_max=plan.choice((3, 5, 10, 20)),
        loss=plan.choice((0.0, 0.02, 0.1, 0.2)),
        duplicate=plan.choice((0.0, 0.02, 0.1)),
        long_delay=plan.choice((0.0, 0.01, 0.05)),
        long_delay_max=plan.choice((50, 200, 600)),
        replay=plan.choice((0.0, 0.0, 0.01, 0.05)),
    )
    paxos: dict[str, object] = {
        "inflight_max": plan.choice((2, 8, 64)),
        "batch_commands_max": plan.choice((1, 4, 32)),
        "catchup_entries_max": plan.choice((1, 3, 16)),
        "snapshot_entries": plan.choice((5, 20, 100, 10_000)),
        "log_retain_entries": plan.choice((0, 3, 20)),
        "retransmit_ticks": plan.choice((2, 4, 8)),
        "leader_stickiness": plan.random() < 0.8,
    }
    # A separate stream, so adding disk timing left the rest of each seed's plan as it was.
    disk_plan = random.Random(seed ^ 0xD15C)
    sync_max = disk_plan.choice((0, 2, 5, 10, 25))
    disk = DiskConfig(
        sync_units_min=min(sync_max, disk_plan.choice((0, 1, 2))),
        sync_units_max=sync_max,
        crash_in_sync=disk_plan.choice((0.0, 0.005, 0.02, 0.05)),
    )
    cluster = SimCluster(
        n, seed, name=name, net=net, drift=plan.choice((0.0, 0.1, 0.3)), paxos=paxos, disk=disk
    )
    return cluster, plan


def run_seed(
    seed: int,
    *,
    fault_ticks: int = 600,
    name: str = "tests/sim",
    membership: bool | None = None,
    crash_in_sync: float | None = None,
) -> FuzzReport:
    """Run one seed's schedule; ``membership`` forces membership changes on or off
    (default: a quarter of the seeds), ``crash_in_sync`` overrides how often a leader
    dies inside its fdatasync. Any failure names the seed that replays it."""
    cluster, plan = make_cluster(seed, name)
    if crash_in_sync is not None:
        cluster.disk.crash_in_sync = crash_in_sync
        cluster.disk.validate()
    try:
        return _run(cluster, plan, fault_ticks, membership)
    except Exception as exc:
        if "replay:" in str(exc):
            raise
        raise SimCrash(f"{type(exc).__name__}: {exc} [{cluster.hint()}]") from exc


class SimCrash(AssertionError):
    """The code under simulation raised an unexpected exception."""


def _run(
    cluster: SimCluster, plan: random.Random, fault_ticks: int, membership: bool | None
) -> FuzzReport:
    seed = cluster.seed
    draw = plan.random() < 0.25
    membership = (draw if membership is None else membership) and len(cluster.nodes) >= 3
    crashes = changes = 0
    next_id = max(cluster.nodes) + 1
    for _ in range(fault_ticks):
        r = plan.random()
        ids = sorted(cluster.nodes)
        if r < 0.30:
            for _ in range(plan.randint(1, 4)):
                cluster.submit()
        elif r < 0.35:
            cluster.read()
        elif r < 0.40:
            crashes += 1
            cluster.crash(plan.choice(ids), torn=plan.random() < 0.7)
        elif r < 0.47:
            cluster.restart(plan.choice(ids))
        elif r < 0.50:
            cluster.disconnect(plan.choice(ids))
        elif r < 0.53:
            a, b = plan.sample(ids, 2) if len(ids) > 1 else (ids[0], ids[0])
            cluster.net.blocked.add((a, b))  # asymmetric: a cannot reach b
        elif r < 0.55:
            cut = plan.randint(1, len(ids))
            shuffled = plan.sample(ids, len(ids))
            cluster.net.partition([shuffled[:cut], shuffled[cut:]])
        elif r < 0.60:
            cluster.net.heal()
        elif r < 0.65 and membership:
            changes += _change_membership(cluster, plan, next_id)
            next_id += 1
        cluster.run(1)
    recovery_ticks = cluster.settle()
    ticks = cluster.now / UNIT
    rate = cluster.messages_sent() / ticks / len(cluster.nodes)
    if rate > MESSAGES_PER_NODE_TICK_MAX:
        # Typical schedules send ~0.5 and at most ~4: more is an amplification bug.
        raise cluster.fail(LivenessViolation(f"message storm: {rate:.1f} messages/node/tick"))
    if recovery_ticks > RECOVERY_TICKS_MAX:
        raise cluster.fail(LivenessViolation(f"leader only after {recovery_ticks} ticks"))
    installed = sum(1 for n in cluster.nodes.values() if n.replica.log.snapshot.slot > 0)
    return FuzzReport(
        seed=seed,
        nodes=len(cluster.nodes),
        ticks=cluster.now,
        committed=len(cluster.committed),
        crashes=crashes,
        messages=cluster.messages_sent(),
        snapshots_installed=installed,
        membership_changes=changes,
        recovery_ticks=recovery_ticks,
        early_delivered_in_sync=cluster.sync_stats.early_delivered_in_sync,
        crashes_in_sync=cluster.sync_stats.crashes_in_sync,
        early_entries_lost=cluster.sync_stats.early_entries_lost,
    )


def _change_membership(cluster: SimCluster, plan: random.Random, next_id: int) -> int:
    leader = cluster.leader_node()
    if leader is None:
        return 0
    members = leader.replica.members
    try:
        if len(members) <= 3 or plan.random() < 0.5:
            cluster.add_node(next_id, ticks_max=0)
        else:
            victim = plan.choice([m for m in members if m != leader.node_id])
            cluster.remove_node(victim, ticks_max=0)
    except (NotLeader, Overloaded):
        return 0
    except ValueError:
        # The change waited for the leader's fdatasync; by then another change or leader
        # may have removed the victim already.
        return 0
    return 1
