"""Unit tests of the sans-I/O Multi-Paxos core, driven by hand (no simulator)."""

from __future__ import annotations

import itertools

import msgspec
import pytest

from lepton_ai.consensus.core import (
    DurableState,
    NotLeader,
    Overloaded,
    PaxosConfig,
    Ready,
    Replica,
)
from lepton_ai.consensus.peer_messages import (
    KIND_COMMANDS,
    KIND_NOOP,
    NACK_BEHIND,
    NACK_NOT_MEMBER,
    NACK_STALE,
    Accept,
    Accepted,
    Announce,
    Entry,
    Heartbeat,
    HeartbeatAck,
    InstallSnapshot,
    Nack,
    PeerMessage,
    Prepare,
    Promise,
    Snapshot,
    Value,
)


def fixed_random() -> float:
    return 0.5


def replica(node: int = 1, members: tuple[int, ...] = (1, 2, 3), **kw: object) -> Replica:
    cfg = PaxosConfig(node_id=node, members=members, **kw)  # type: ignore[arg-type]
    return Replica(cfg, None, random_fn=fixed_random)


def cycle(r: Replica) -> Ready:
    """One runtime iteration: take the Ready and acknowledge it."""
    rd = r.ready()
    r.advance(rd)
    return rd


def sent(rd: Ready, kind: type) -> list[tuple[int, PeerMessage]]:
    return [(to, m) for to, m in rd.messages if isinstance(m, kind)]


def elect(r: Replica) -> Ready:
    """Make ``r`` leader of a 3-node group by answering its Prepare with empty promises."""
    r.campaign()
    rd = cycle(r)
    prepare = sent(rd, Prepare)[0][1]
    for peer in (2, 3):
        r.step(Promise(src=peer, ballot=prepare.ballot, commit=0, entries=[]))
    return cycle(r)


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        PaxosConfig(node_id=1, members=(1, 1, 2))
    with pytest.raises(ValueError):
        PaxosConfig(node_id=1, members=(1,), election_ticks_min=5, election_ticks_max=4)
    with pytest.raises(ValueError):
        PaxosConfig(node_id=1, members=(1,), inflight_max=0)
    with pytest.raises(TypeError):
        Replica("nope", None, random_fn=fixed_random)  # type: ignore[arg-type]


def test_election_timeout_is_randomised_and_deterministic() -> None:
    r = replica(election_ticks_min=10, election_ticks_max=20)
    for _ in range(14):
        r.tick()
    assert r.role == "follower"
    r.tick()  # 0.5 -> 10 + int(0.5 * 11) = 15 ticks
    rd = cycle(r)
    assert r.role == "candidate"
    assert rd.persist_ballot == (1, 1)
    assert sorted(to for to, _ in sent(rd, Prepare)) == [2, 3]


def test_promise_is_persisted_before_it_is_sent() -> None:
    r = replica(node=2)
    r.step(Prepare(src=1, ballot=(3, 1), commit=0))
    rd = r.ready()
    assert rd.persist_ballot == (3, 1) and rd.must_sync
    assert isinstance(rd.messages[0][1], Promise)


def test_leader_recovers_highest_ballot_value_and_fills_gaps() -> None:
    r = replica(members=(1, 2, 3, 4, 5))  # needs both promises below
    r.campaign()
    rd = cycle(r)
    ballot = sent(rd, Prepare)[0][1].ballot
    old = Value(kind=KIND_COMMANDS, origin=(1, 2), commands=(b"old",))
    newer = Value(kind=KIND_COMMANDS, origin=(2, 3), commands=(b"newer",))
    r.step(
        Promise(
            src=2,
            ballot=ballot,
            commit=0,
            entries=[Entry(1, (1, 2), old), Entry(3, (1, 2), old)],
        )
    )
    r.step(Promise(src=3, ballot=ballot, commit=0, entries=[Entry(1, (2, 3), newer)]))
    assert r.is_leader
    rd = cycle(r)
    values = {e.slot: e.value for e in rd.persist_entries}
    assert values[1] == newer  # highest ballot wins
    assert values[2].kind == KIND_NOOP  # gap filled
    assert values[3] == old
    assert values[4].kind == KIND_NOOP  # the leader's start slot
    assert all(e.ballot == ballot for e in rd.persist_entries)


def test_stale_ballot_gets_nack_with_the_higher_ballot() -> None:
    r = replica(node=2)
    r.step(Prepare(src=3, ballot=(5, 3), commit=0))
    cycle(r)
    r.step(Accept(src=1, ballot=(4, 1), first_slot=1, values=[], commit=0))
    r.step(Prepare(src=1, ballot=(4, 1), commit=0))
    rd = cycle(r)
    nacks = [m for _, m in sent(rd, Nack)]
    assert len(nacks) == 2
    assert all(n.promised == (5, 3) and n.reason == NACK_STALE for n in nacks)
    assert rd.persist_entries == []


def test_leader_steps_down_on_nack_and_fails_reads() -> None:
    r = replica()
    elect(r)
    r.read_index(7)
    r.step(Nack(src=2, ballot=r.promised, promised=(9, 3), reason=NACK_STALE, commit=0))
    assert not r.is_leader
    rd = cycle(r)
    assert rd.reads_failed == [7]
    with pytest.raises(NotLeader):
        r.propose(b"x")
    r.campaign()
    assert r.promised == (10, 1)  # campaigns above the ballot it was told about


def test_future_ballot_is_followed_spoofed_ballot_is_dropped() -> None:
    r = replica(node=2)
    # A ballot that names another node than the sender: a confused peer; dropped.
    r.step(Accept(src=1, ballot=(9, 3), first_slot=1, values=[], commit=0))
    r.step(Prepare(src=1, ballot=(9, 3), commit=0))
    assert r.dropped_messages == 2
    assert not r.has_ready()
    # A higher ballot from its owner is legitimate (the sender ran Phase 1 elsewhere).
    v = Value(kind=KIND_COMMANDS, origin=(9, 1), commands=(b"a",))
    r.step(Accept(src=1, ballot=(9, 1), first_slot=1, values=[v], commit=1))
    rd = cycle(r)
    assert rd.persist_ballot == (9, 1)
    assert rd.committed == [(1, v)]
    assert sent(rd, Accepted)[0][1].through == 1


def test_follower_marks_chosen_only_what_it_accepted_at_the_leaders_ballot() -> None:
    r = replica(node=2)
    a = Value(kind=KIND_COMMANDS, origin=(1, 1), commands=(b"a",))
    b = Value(kind=KIND_COMMANDS, origin=(1, 1), commands=(b"b",))
    r.step(Accept(src=1, ballot=(1, 1), first_slot=1, values=[a, b], commit=0))
    cycle(r)
    # A new leader says slot 2 is committed, but we hold slot 2 only at ballot (1, 1).
    r.step(Heartbeat(src=3, ballot=(2, 3), commit=2, read_seq=0))
    rd = cycle(r)
    assert rd.committed == []
    ack = rd.messages[0][1]
    assert ack.through == 0  # type: ignore[union-attr]
    # Its Accept at (2, 3) for slot 1 leaves a gap at 2: reported for a resend.
    r.step(Accept(src=3, ballot=(2, 3), first_slot=2, values=[b], commit=2))
    rd = cycle(r)
    assert sent(rd, Accepted)[0][1].gap is True
    assert rd.committed == []


def test_pipeline_window_and_batching() -> None:
    r = replica(inflight_max=2, batch_commands_max=3)
    elect(r)
    ids = [r.propose(b"c%d" % i) for i in range(3)]
    assert {i.slot for i in ids} == {ids[0].slot}  # one slot holds the batch
    assert [i.index for i in ids] == [0, 1, 2]
    r.propose(b"c3")  # seals the first batch, opens the next
    for i in range(2):
        r.propose(b"d%d" % i)
    with pytest.raises(Overloaded):
        # window: start no-op + batch 1 uncommitted (2 slots), and batch 2 is full
        r.propose(b"over")
    with pytest.raises(TypeError):
        r.propose("text")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        r.propose(b"x" * (2 << 20))


def test_commit_needs_a_majority_and_is_cumulative() -> None:
    r = replica()
    elect(r)
    pid = r.propose(b"x")
    rd = cycle(r)
    accepts = sent(rd, Accept)
    assert accepts
    assert r.commit < pid.slot
    r.step(Accepted(src=2, ballot=r.promised, through=pid.slot))
    rd = cycle(r)
    assert r.commit == pid.slot
    assert [s for s, _ in rd.committed][-1] == pid.slot
    assert pid.matches(rd.committed[-1][1])


def test_restart_from_durable_state_replays_committed_prefix() -> None:
    v = Value(kind=KIND_COMMANDS, origin=(1, 1), commands=(b"a",))
    snap = Snapshot(slot=3, members=(1, 2, 3), data=b"state@3")
    durable = DurableState(
        promised=(4, 2),
        entries=[Entry(2, (1, 1), v), Entry(4, (1, 1), v), Entry(5, (1, 1), v)],
        snapshot=snap,
        commit=5,
    )
    cfg = PaxosConfig(node_id=2, members=(1, 2, 3))
    r = Replica(cfg, durable, random_fn=fixed_random)
    rd = cycle(r)
    assert rd.snapshot_to_install == snap
    assert [s for s, _ in rd.committed] == [4, 5]
    assert rd.persist_ballot is None  # nothing new to write
    assert r.promised == (4, 2)
    r.campaign()
    assert r.promised == (5, 2)  # never reuses a ballot


def test_install_snapshot_and_refuse_candidate_behind_compaction() -> None:
    r = replica(node=2, snapshot_entries=1, log_retain_entries=0, leader_stickiness=False)
    snap = Snapshot(slot=10, members=(1, 2, 3), data=b"s")
    r.step(InstallSnapshot(src=1, ballot=(1, 1), snapshot=snap, commit=10))
    rd = cycle(r)
    assert rd.snapshot_to_install == snap and rd.persist_snapshot == snap
    assert sent(rd, Accepted)[0][1].through == 10
    # A candidate that has not even reached our compacted prefix may not lead.
    r.step(Prepare(src=3, ballot=(2, 3), commit=4))
    rd = cycle(r)
    nack = sent(rd, Nack)[0][1]
    assert nack.reason == NACK_BEHIND and nack.commit == 10


def test_ready_advance_misuse_is_refused() -> None:
    r = replica()
    with pytest.raises(ValueError):
        r.advance(Ready())
    r.ready()
    with pytest.raises(ValueError):
        r.ready()
    with pytest.raises(ValueError):
        r.compact(b"x")
    with pytest.raises(TypeError):
        r.step("hello")  # type: ignore[arg-type]


def test_read_index_waits_for_a_heartbeat_quorum() -> None:
    r = replica()
    elect(r)
    # The start no-op must commit first.
    r.step(Accepted(src=2, ballot=r.promised, through=r.log.last))
    cycle(r)
    r.read_index(1)
    rd = cycle(r)
    hb = sent(rd, Heartbeat)
    assert hb and rd.reads_ready == []
    seq = hb[0][1].read_seq
    r.step(HeartbeatAck(src=3, ballot=r.promised, through=r.log.last, read_seq=seq))
    rd = cycle(r)
    assert rd.reads_ready == [1]


def test_messages_round_trip_through_the_wire_union() -> None:
    v = Value(kind=KIND_COMMANDS, origin=(1, 1), commands=(b"a", b"b"))
    msgs: list[PeerMessage] = [
        Prepare(src=1, ballot=(1, 1), commit=0),
        Promise(src=2, ballot=(1, 1), commit=0, entries=[Entry(1, (1, 1), v)]),
        Accept(src=1, ballot=(1, 1), first_slot=1, values=[v], commit=0),
        Accepted(src=2, ballot=(1, 1), through=1, gap=True),
        Nack(src=2, ballot=(1, 1), promised=(2, 3), reason=NACK_STALE, commit=0),
        Heartbeat(src=1, ballot=(1, 1), commit=1, read_seq=4),
        InstallSnapshot(src=1, ballot=(1, 1), snapshot=Snapshot(1, (1, 2), b"d"), commit=1),
        Announce(src=100, ballot=(1, 1), address="h:7400"),
    ]
    for m in msgs:
        data = msgspec.msgpack.encode(m)
        assert msgspec.msgpack.decode(data, type=PeerMessage) == m


def test_single_node_cluster_commits_alone() -> None:
    r = replica(node=1, members=(1,))
    r.campaign()
    assert r.is_leader
    pid = r.propose(b"solo")
    committed: list[tuple[int, Value]] = []
    for _ in itertools.repeat(None, 4):
        committed.extend(cycle(r).committed)
    assert any(s == pid.slot and pid.matches(v) for s, v in committed)


# -- learners and removal ---------------------------------------------------------------


def test_learner_announces_and_the_leader_streams_it_without_a_vote() -> None:
    standby = replica(100, (1, 2, 3), learner=True, address="h:100", announce_ticks=3)
    standby.tick()
    rd = cycle(standby)
    announces = sent(rd, Announce)
    assert sorted(to for to, _ in announces) == [1, 2, 3]
    assert announces[0][1].address == "h:100"
    assert not standby.is_leader and standby.role == "follower"
    for _ in range(100):  # never campaigns
        standby.tick()
    assert standby.promised == (0, 0)

    leader = replica(1, learners_max=1)
    elect(leader)
    leader.step(announces[0][1])
    leader.step(Announce(src=101, ballot=(0, 0), address="h:101"))  # beyond learners_max
    assert [s.node for s in leader.learner_status()] == [100]
    assert leader.dropped_messages == 1
    rd = cycle(leader)
    assert any(to == 100 for to, _ in rd.messages)  # streamed like a peer
    # The learner's acknowledgement alone makes no quorum.
    pid = leader.propose(b"x")
    cycle(leader)
    leader.step(Accepted(src=100, ballot=leader.promised, through=pid.slot))
    assert leader.commit < pid.slot
    assert leader.learner_status()[0].match == pid.slot
    assert set(leader.member_silence_ticks()) == {2, 3}


def test_follower_ignores_announce_and_leader_forgets_a_silent_learner() -> None:
    follower = replica(2)
    follower.step(Announce(src=100, ballot=(0, 0), address="h:100"))
    assert follower.learner_status() == [] and not follower.has_ready()
    leader = replica(1, learner_timeout_ticks=5)
    elect(leader)
    leader.step(Announce(src=100, ballot=(0, 0), address="h:100"))
    for _ in range(6):
        leader.tick()
    assert leader.learner_status() == []


def test_not_member_nack_only_from_a_replica_ahead_and_it_removes() -> None:
    ahead = replica(2, (2, 3))  # committed configuration without node 1
    ahead.step(Prepare(src=1, ballot=(5, 1), commit=0))
    rd = cycle(ahead)
    assert not sent(rd, Nack)  # not ahead of the candidate: it may not know the change
    r = replica(1)
    r.campaign()
    cycle(r)
    assert not r.removed
    # A lagging peer's verdict (commit not past ours) proves nothing.
    r.step(Nack(src=2, ballot=r.promised, promised=(0, 0), reason=NACK_NOT_MEMBER, commit=0))
    assert not r.removed
    r.step(Nack(src=2, ballot=r.promised, promised=(0, 0), reason=NACK_NOT_MEMBER, commit=9))
    assert r.removed and r.role == "follower"
    with pytest.raises(ValueError):
        r.campaign()
    for _ in range(100):
        r.tick()
    assert r.role == "follower"


def test_removed_leader_knows_it() -> None:
    r = replica(1)
    elect(r)
    r.step(Accepted(src=2, ballot=r.promised, through=1))
    cycle(r)
    pid = r.remove_member(1)
    cycle(r)
    r.step(Accepted(src=2, ballot=r.promised, through=pid.slot))
    r.step(Accepted(src=3, ballot=r.promised, through=pid.slot))
    cycle(r)
    assert not r.is_leader and r.removed
    # A standby (never a member) outside the configuration is not "removed".
    assert not replica(100, (1, 2, 3), learner=True).removed
