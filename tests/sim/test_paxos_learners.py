"""Learners (standbys) and automatic replacement of dead voters, in simulation.

A learner is a replica in no configuration that announces itself; the leader streams it
the log (snapshot, then entries) without ever counting it for a quorum, and a new leader
learns it again from its announcements. ``heal.membership.MembershipReconciler`` runs on
whichever node leads (``Shell`` below is the simulated counterpart of
``node/coord_membership.py``): it removes a voter silent past ``replace_after_s`` and
promotes a caught-up learner, one change at a time, under flapping, a learner lost
mid-promotion and leader changes mid-repair. A removed voter that comes back learns it
was removed (``Replica.removed``) and stops campaigning; the shell stops it, as the real
one exits with EXIT_REMOVED. Time here is in ticks (``silent_s`` = ticks).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from simkit import make

from lepton_ai.consensus.core import Overloaded, PaxosConfig, ProposalId, Replica
from lepton_ai.consensus.core_types import NotLeader
from lepton_ai.heal.backoff import Backoff
from lepton_ai.heal.membership import (
    AddMember,
    MembershipAction,
    MembershipConfig,
    MembershipReconciler,
    Observed,
    StandbyView,
)
from lepton_ai.sim.cluster import UNIT, SimCluster, SimNode
from lepton_ai.sim.fuzz import seeds_from_env

SEEDS = seeds_from_env(range(5))
SNAP = {"snapshot_entries": 10, "log_retain_entries": 2}
REPLACE_AFTER = 40.0  # ticks


def add_learner(c: SimCluster, node_id: int) -> SimNode:
    """Start an empty standby replica that knows the bootstrap members."""
    node = c._make_node(node_id, c.members)
    node.config = PaxosConfig(
        node_id=node_id,
        members=c.members,
        learner=True,
        address=f"sim:{node_id}",
        **c.paxos,  # type: ignore[arg-type]
    )
    node.replica = Replica(node.config, None, random_fn=c._node_random(node_id, 0))
    return node


def leader_replica(c: SimCluster) -> Replica:
    leader = c.leader_node()
    assert leader is not None, c.hint()
    return leader.replica


def members_now(c: SimCluster) -> set[int]:
    """The current leader's committed configuration (empty while there is no leader)."""
    leader = c.leader_node()
    return set(leader.replica.members) if leader is not None else set()


def wait_for(
    c: SimCluster, cond: Callable[[], bool], ticks_max: int, what: str, shell: Shell | None = None
) -> None:
    """Run tick by tick (stepping ``shell``) until ``cond()`` holds."""
    for _ in range(ticks_max):
        c.run(1)
        if shell is not None:
            shell.step()
        if cond():
            return
    raise AssertionError(f"{what} not within {ticks_max} ticks; {c.hint()}")


class Shell:
    """The simulated membership shell: steps the reconciler on the current leader each
    tick, proposes its changes, reports their outcome, and stops removed replicas."""

    def __init__(self, c: SimCluster, voters: int, **kw: object) -> None:
        self.c = c
        self.config = MembershipConfig(
            voters,
            replace_after_s=REPLACE_AFTER,
            standby_silent_max_s=15.0,
            backoff=Backoff(initial_s=5.0, max_s=20.0),
            **kw,  # type: ignore[arg-type]
        )
        self.rec: MembershipReconciler | None = None
        self.term: tuple[int, tuple[int, int]] | None = None
        self.inflight: list[tuple[MembershipReconciler, MembershipAction, ProposalId]] = []
        self.done: list[MembershipAction] = []
        self.stopped: list[int] = []
        # Run right after a change is proposed (tests inject faults there).
        self.on_issue: list[Callable[[MembershipAction], None]] = []

    def step(self) -> None:
        c = self.c
        for node in c.alive_nodes():
            if node.replica.removed:
                self.stopped.append(node.node_id)
                c.crash(node.node_id, torn=False)  # the real process exits (EXIT_REMOVED)
        self._resolve()
        leader = c.leader_node()
        if leader is None or leader.syncing is not None:
            return
        rep = leader.replica
        if self.rec is None or self.term != (leader.node_id, rep.promised):
            self.rec = MembershipReconciler(self.config)
            self.term = (leader.node_id, rep.promised)
        now = c.now / UNIT
        for action in self.rec.step(observe(rep), now):
            try:
                if isinstance(action, AddMember):
                    pid = rep.add_member(action.node)
                else:
                    pid = rep.remove_member(action.node)
            except (NotLeader, Overloaded, ValueError):
                self.rec.finished(action, False, now)
                continue
            c._dirty.add(leader.node_id)
            self.inflight.append((self.rec, action, pid))
            for hook in self.on_issue:
                hook(action)

    def _resolve(self) -> None:
        chosen = self.c.checker.chosen
        now = self.c.now / UNIT
        keep = []
        for rec, action, pid in self.inflight:
            value = chosen.get(pid.slot)
            if value is None:
                leader = self.c.leader_node()
                if rec is self.rec and leader is not None:
                    keep.append((rec, action, pid))
                else:
                    rec.finished(action, False, now)  # leadership changed: a new reconciler
                continue
            ok = pid.matches(value)
            rec.finished(action, ok, now)
            if ok:
                self.done.append(action)
        self.inflight = keep


def observe(rep: Replica) -> Observed:
    standbys = tuple(
        StandbyView(s.node, s.address, s.match, float(s.silent_ticks)) for s in rep.learner_status()
    )
    return Observed(
        leader=rep.node_id,
        members=rep.members,
        pending=rep.log.pending_config() is not None,
        commit=rep.commit,
        silent_s={m: float(t) for m, t in rep.member_silence_ticks().items()},
        standbys=standbys,
    )


# -- learners -------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_learner_catches_up_and_never_votes(seed: int, request: pytest.FixtureRequest) -> None:
    c = make(3, seed, request, paxos=SNAP, learners=True)
    c.wait_leader()
    for _ in range(30):  # past snapshot_entries + log_retain_entries: needs a snapshot
        c.one()
    learner = add_learner(c, 100)
    slot = c.one()
    wait_for(c, lambda: learner.sm.slot >= slot, 200, "learner caught up")
    rep = leader_replica(c)
    status = rep.learner_status()
    assert [s.node for s in status] == [100], c.hint()
    assert status[0].match >= slot and status[0].address == "sim:100", c.hint()
    assert c.net.sent_by_type.get("InstallSnapshot", 0) >= 1, c.hint()
    assert 100 not in rep.members and not learner.replica.removed, c.hint()
    # Two of three voters down: the learner's acknowledgements make no quorum.
    leader = c.wait_leader()
    down = [n for n in c.members if n != leader]
    for n in down:
        c.crash(n)
    cmd = c.submit()
    c.run(150)
    assert cmd not in c.committed, c.hint()
    assert learner.replica.role == "follower" and learner.replica.promised[1] != 100, c.hint()
    for n in down:
        c.restart(n)
    c.settle()
    assert learner.sm.slot >= c.checker.max_chosen() - 64, c.hint()


@pytest.mark.parametrize("seed", SEEDS)
def test_new_leader_learns_the_learners(seed: int, request: pytest.FixtureRequest) -> None:
    c = make(3, seed, request, paxos=SNAP, learners=True)
    c.wait_leader()
    learner = add_learner(c, 100)
    c.one()
    old = c.wait_leader()
    wait_for(c, lambda: bool(leader_replica(c).learner_status()), 100, "learner known")
    c.crash(old)
    new = c.wait_leader()
    assert new != old, c.hint()
    # Within a few announce periods (10 ticks each) the new leader streams to it again.
    wait_for(c, lambda: bool(leader_replica(c).learner_status()), 60, "learner re-learnt")
    slot = c.one(expected=2)
    wait_for(c, lambda: learner.sm.slot >= slot, 100, "learner follows the new leader")
    c.restart(old)
    c.settle()


@pytest.mark.parametrize("seed", SEEDS)
def test_silent_learner_is_forgotten_and_learners_are_bounded(
    seed: int, request: pytest.FixtureRequest
) -> None:
    c = make(
        3,
        seed,
        request,
        paxos={**SNAP, "learners_max": 2, "learner_timeout_ticks": 50},
        learners=True,
    )
    c.wait_leader()
    for node_id in (100, 101, 102):
        add_learner(c, node_id)
    c.run(40)
    assert len(leader_replica(c).learner_status()) == 2, c.hint()
    assert leader_replica(c).dropped_messages > 0, c.hint()
    known = [s.node for s in leader_replica(c).learner_status()]
    c.crash(known[0])
    # Forgotten after learner_timeout_ticks; the waiting one takes the freed place.
    wait_for(
        c,
        lambda: known[0] not in [s.node for s in leader_replica(c).learner_status()],
        120,
        "silent learner forgotten",
    )
    wait_for(c, lambda: len(leader_replica(c).learner_status()) == 2, 60, "free slot reused")
    c.settle()


# -- replacement of dead voters ---------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_dead_voter_replaced_and_removed_one_stops(
    seed: int, request: pytest.FixtureRequest
) -> None:
    c = make(3, seed, request, paxos=SNAP, learners=True)
    leader = c.wait_leader()
    shell = Shell(c, voters=3)
    learner = add_learner(c, 100)
    c.one()
    dead = next(n for n in c.members if n != leader)
    c.crash(dead)
    survivors = set(c.members) - {dead}
    wait_for(
        c,
        lambda: members_now(c) == survivors | {100},
        int(REPLACE_AFTER) + 300,
        "dead voter replaced",
        shell,
    )
    kinds = [type(a).__name__ for a in shell.done]
    assert kinds == ["RemoveMember", "AddMember"], (kinds, c.hint())
    slot = c.one(expected=3)
    assert learner.sm.slot >= slot, c.hint()
    # The removed voter comes back (from its disk): it learns it was removed, stops
    # campaigning and does not depose the leader.
    ballot = leader_replica(c).promised
    c.restart(dead)
    wait_for(c, lambda: dead in shell.stopped, 200, "removed voter stopped", shell)
    assert leader_replica(c).promised == ballot, c.hint()
    # Another voter dies: the group of (two survivors + the promoted standby) commits.
    other = next(n for n in survivors if n != c.wait_leader())
    c.crash(other)
    c.one(expected=2)
    c.restart(other)
    for _ in range(100):
        c.run(1)
        shell.step()
    assert len(shell.done) == 2, c.hint()  # no spare standby: nothing else changes


@pytest.mark.parametrize("seed", SEEDS)
def test_flapping_voter_is_not_removed(seed: int, request: pytest.FixtureRequest) -> None:
    c = make(3, seed, request, paxos=SNAP, learners=True)
    leader = c.wait_leader()
    shell = Shell(c, voters=3)
    add_learner(c, 100)
    flappy = next(n for n in c.members if n != leader)
    for _ in range(5):
        c.disconnect(flappy)
        for _ in range(int(REPLACE_AFTER * 0.6)):
            c.run(1)
            shell.step()
        c.connect(flappy)
        for _ in range(30):
            c.run(1)
            shell.step()
    assert shell.done == [] and not shell.inflight, c.hint()
    assert set(leader_replica(c).members) == set(c.members), c.hint()
    c.settle()


@pytest.mark.parametrize("seed", SEEDS)
def test_voter_back_during_removal_is_removed_once(
    seed: int, request: pytest.FixtureRequest
) -> None:
    c = make(3, seed, request, paxos=SNAP, learners=True)
    leader = c.wait_leader()
    shell = Shell(c, voters=3)
    add_learner(c, 100)
    victim = next(n for n in c.members if n != leader)
    issued: list[MembershipAction] = []

    def back(action: MembershipAction) -> None:
        if not issued:
            issued.append(action)
            c.connect(victim)  # it answers again while its removal is in flight

    shell.on_issue.append(back)
    c.disconnect(victim)
    wait_for(c, lambda: bool(issued), int(REPLACE_AFTER) + 200, "removal issued", shell)
    expect = (set(c.members) - {victim}) | {100}
    wait_for(c, lambda: members_now(c) == expect, 400, "replacement", shell)
    for _ in range(100):
        c.run(1)
        shell.step()
    # Its comeback may cost the leader its ballot (it campaigned while cut off), yet the
    # committed history holds exactly one removal, then the promotion.
    configs = [set(v.members) for _, v in sorted(c.checker.chosen.items()) if v.members]
    assert configs == [set(c.members) - {victim}, expect], (configs, c.hint())
    c.settle()


@pytest.mark.parametrize("seed", SEEDS)
def test_standby_lost_mid_promotion(seed: int, request: pytest.FixtureRequest) -> None:
    c = make(3, seed, request, paxos=SNAP, learners=True)
    leader = c.wait_leader()
    shell = Shell(c, voters=3)
    add_learner(c, 100)
    c.one()

    def lose_standby(action: MembershipAction) -> None:
        if isinstance(action, AddMember) and c.nodes[action.node].alive:
            c.crash(action.node)

    shell.on_issue.append(lose_standby)
    dead = next(n for n in c.members if n != leader)
    c.crash(dead)
    survivors = set(c.members) - {dead}
    # The add commits without the standby (the live voters are a majority of the grown
    # group), so the group is never stuck with a pending change.
    wait_for(
        c,
        lambda: members_now(c) == survivors | {100},
        int(REPLACE_AFTER) + 300,
        "promotion committed",
        shell,
    )
    c.one(expected=2)
    # A second standby replaces the lost one once it has been silent long enough.
    shell.on_issue.clear()
    add_learner(c, 101)
    wait_for(
        c,
        lambda: members_now(c) == survivors | {101},
        int(REPLACE_AFTER) + 400,
        "lost standby replaced",
        shell,
    )
    c.one(expected=3)


@pytest.mark.parametrize("seed", SEEDS)
def test_leader_change_mid_repair(seed: int, request: pytest.FixtureRequest) -> None:
    c = make(5, seed, request, paxos=SNAP, learners=True)
    leader = c.wait_leader()
    shell = Shell(c, voters=5)
    add_learner(c, 100)
    c.one()
    killed: list[int] = []

    def kill_leader(action: MembershipAction) -> None:
        # The leader dies right after proposing the promotion (the removal before it
        # committed): the next leader's reconciler continues from what is committed.
        if not killed and isinstance(action, AddMember):
            old = c.leader_node()
            assert old is not None
            killed.append(old.node_id)
            c.crash(old.node_id)

    shell.on_issue.append(kill_leader)
    dead = next(n for n in c.members if n != leader)
    c.crash(dead)
    expect = (set(c.members) - {dead}) | {100}
    wait_for(
        c,
        lambda: bool(killed) and members_now(c) == expect,
        int(REPLACE_AFTER) + 600,
        "promotion after a leader change",
        shell,
    )
    assert c.wait_leader() != killed[0], c.hint()
    c.one(expected=4)
