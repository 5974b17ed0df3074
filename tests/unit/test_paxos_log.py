"""Unit tests of the core's log, quorum arithmetic and Phase 1 recovery."""

from __future__ import annotations

import pytest

from lepton_ai.consensus.core_leader import has_quorum, merge_promises, quorum_slot
from lepton_ai.consensus.core_log import Log
from lepton_ai.consensus.core_types import InvariantError, ProposalId
from lepton_ai.consensus.peer_messages import (
    KIND_COMMANDS,
    KIND_CONFIG,
    Entry,
    Promise,
    Snapshot,
    Value,
)


def cmd(text: str, origin: tuple[int, int] = (1, 1)) -> Value:
    return Value(kind=KIND_COMMANDS, origin=origin, commands=(text.encode(),))


def test_chosen_slots_never_change_and_commit_needs_every_slot() -> None:
    log = Log((1, 2, 3))
    log.put(Entry(1, (1, 1), cmd("a")))
    log.put(Entry(3, (1, 1), cmd("c")))
    with pytest.raises(InvariantError):
        log.advance_commit(3)  # slot 2 missing
    log.advance_commit(1)
    with pytest.raises(InvariantError):
        log.put(Entry(1, (2, 2), cmd("other")))
    assert log.contiguous_at(1, (1, 1)) == 1
    log.put(Entry(2, (1, 1), cmd("b")))
    assert log.contiguous_at(1, (1, 1)) == 3
    assert log.held_through(10) == 3


def test_configuration_takes_effect_when_committed() -> None:
    log = Log((1, 2, 3))
    cfg = Value(kind=KIND_CONFIG, origin=(1, 1), commands=(b"",), members=(1, 2, 3, 4))
    log.put(Entry(1, (1, 1), cfg))
    assert log.committed_config() == (1, 2, 3)
    assert log.pending_config() == (1, (1, 2, 3, 4))
    log.advance_commit(1)
    assert log.committed_config() == (1, 2, 3, 4)
    assert log.pending_config() is None
    # Overwriting an uncommitted config entry with a command forgets that config.
    log.put(Entry(2, (1, 1), Value(KIND_CONFIG, (1, 1), (b"",), (1, 2))))
    log.put(Entry(2, (2, 2), cmd("x")))
    assert log.pending_config() is None


def test_compaction_keeps_retained_entries_and_snapshot_config() -> None:
    log = Log((1, 2, 3))
    for s in range(1, 11):
        log.put(Entry(s, (1, 1), cmd(str(s))))
    log.advance_commit(10)
    log.compact(Snapshot(slot=8, members=(1, 2, 3), data=b"s"), retain=3)
    assert log.first == 6 and sorted(log.entries) == [6, 7, 8, 9, 10]
    with pytest.raises(InvariantError):
        log.compact(Snapshot(slot=11, members=(1, 2, 3), data=b"s"), retain=0)
    log.install(Snapshot(slot=20, members=(1, 2), data=b"t"))
    assert log.commit == 20 and log.first == 21 and not log.entries
    assert log.committed_config() == (1, 2)


def test_quorums_over_joint_configurations() -> None:
    assert has_quorum({1, 2}, [(1, 2, 3)])
    assert not has_quorum({1, 2}, [(1, 2, 3), (1, 2, 3, 4, 5)])
    assert has_quorum({1, 2, 4}, [(1, 2, 3), (1, 2, 3, 4)])
    match = {1: 10, 2: 7, 3: 3, 4: 9}
    assert quorum_slot(match, [(1, 2, 3)]) == 7
    assert quorum_slot(match, [(1, 2, 3), (1, 2, 3, 4)]) == 7
    assert quorum_slot(match, [(1, 2, 3, 4)]) == 7
    assert quorum_slot({1: 10, 2: 1, 3: 1, 4: 10}, [(1, 2, 3, 4)]) == 1


def test_merge_prefers_chosen_then_highest_ballot_and_finds_new_configs() -> None:
    chosen = cmd("chosen", (1, 2))
    stale = cmd("stale", (2, 3))
    cfg = Value(kind=KIND_CONFIG, origin=(2, 3), commands=(b"",), members=(1, 2, 3, 4))
    promises = {
        2: Promise(src=2, ballot=(5, 1), commit=1, entries=[Entry(1, (1, 2), chosen)]),
        3: Promise(
            src=3,
            ballot=(5, 1),
            commit=0,
            entries=[Entry(1, (2, 3), stale), Entry(2, (2, 3), cfg)],
        ),
    }
    merged = merge_promises(0, (1, 2, 3), promises)
    assert merged.chosen_through == 1
    assert merged.values[1] == chosen  # known chosen beats a higher-ballot leftover
    assert merged.values[2] == cfg
    assert merged.configs == [(1, 2, 3), (1, 2, 3, 4)]


def test_merge_detects_two_chosen_values() -> None:
    promises = {
        2: Promise(src=2, ballot=(5, 1), commit=1, entries=[Entry(1, (1, 2), cmd("a"))]),
        3: Promise(src=3, ballot=(5, 1), commit=1, entries=[Entry(1, (1, 3), cmd("b"))]),
    }
    with pytest.raises(InvariantError):
        merge_promises(0, (1, 2, 3), promises)


def test_proposal_id_matches_only_its_own_value() -> None:
    pid = ProposalId(slot=4, origin=(3, 1), index=1)
    assert pid.matches(Value(KIND_COMMANDS, (3, 1), (b"a", b"b")))
    assert not pid.matches(Value(KIND_COMMANDS, (3, 2), (b"a", b"b")))
    assert not pid.matches(Value(KIND_COMMANDS, (3, 1), (b"a",)))
