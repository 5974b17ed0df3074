"""Which of a Ready's messages may leave before its fdatasync (``consensus.ready_order``)."""

from __future__ import annotations

from lepton_ai.consensus.core_types import Ready
from lepton_ai.consensus.peer_messages import (
    KIND_COMMANDS,
    Accept,
    Accepted,
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
from lepton_ai.consensus.ready_order import commit_is_durable, split_early

B = (3, 1)
VALUE = Value(KIND_COMMANDS, B, (b"cmd",))


def _entries(*slots: int) -> list[Entry]:
    return [Entry(s, B, VALUE) for s in slots]


def _every_kind() -> list[tuple[int, PeerMessage]]:
    return [
        (2, Accept(src=1, ballot=B, first_slot=7, values=[VALUE], commit=6)),
        (2, Promise(src=1, ballot=(4, 2), commit=6, entries=[])),
        (3, Heartbeat(src=1, ballot=B, commit=6, read_seq=0)),
        (3, Accepted(src=1, ballot=(2, 3), through=6)),
        (2, HeartbeatAck(src=1, ballot=(2, 2), through=6, read_seq=1)),
        (3, Nack(src=1, ballot=(1, 3), promised=B, reason=0, commit=6)),
        (2, Prepare(src=1, ballot=B, commit=6)),
        (3, InstallSnapshot(src=1, ballot=B, snapshot=Snapshot(5, (1, 2, 3), b""), commit=6)),
    ]


def test_only_proposals_overtake_the_sync_and_order_is_kept() -> None:
    messages = _every_kind()
    early, late = split_early(Ready(persist_entries=_entries(7), messages=messages))
    assert [type(m) for _, m in early] == [Accept, Heartbeat]
    assert [type(m) for _, m in late] == [
        Promise,
        Accepted,
        HeartbeatAck,
        Nack,
        Prepare,
        InstallSnapshot,
    ]
    assert sorted(map(id, early + late)) == sorted(map(id, messages))


def test_a_new_ballot_to_sync_still_lets_proposals_go_first() -> None:
    # A deposed leader's last Accept (old ballot) next to its Promise to the new one.
    early, late = split_early(Ready(persist_ballot=(4, 2), messages=_every_kind()))
    assert {type(m) for _, m in early} == {Accept, Heartbeat}
    assert Promise in {type(m) for _, m in late}


def test_nothing_to_sync_means_nothing_goes_early() -> None:
    messages = _every_kind()
    early, late = split_early(Ready(persist_commit=6, messages=messages))
    assert early == []
    assert late == messages


def test_a_commit_counting_the_unsynced_own_vote_holds_everything() -> None:
    # A single-voter group commits slot 7 on its own, not yet synced, acceptance.
    rd = Ready(persist_entries=_entries(7), committed=[(6, VALUE), (7, VALUE)])
    assert not commit_is_durable(rd)
    rd.messages = _every_kind()
    assert split_early(rd) == ([], rd.messages)
    # Re-accepting an older slot at a new ballot while committing it: also waits.
    assert not commit_is_durable(Ready(persist_entries=_entries(3, 9), committed=[(3, VALUE)]))


def test_commits_of_older_synced_slots_may_go_early() -> None:
    assert commit_is_durable(Ready(persist_entries=_entries(7, 8), committed=[(5, VALUE)]))
    assert commit_is_durable(Ready(committed=[(4, VALUE)], persist_commit=4))
    assert commit_is_durable(Ready(persist_entries=_entries(5, 6)))
