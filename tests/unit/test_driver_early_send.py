"""When a leader may send its Accept/Heartbeat before its own fdatasync (driver._handle)."""

from __future__ import annotations

from lepton_ai.consensus.core_types import Ready
from lepton_ai.consensus.driver import _commit_is_durable
from lepton_ai.consensus.messages import KIND_COMMANDS, Entry, Value

VALUE = Value(KIND_COMMANDS, (1, 1), (b"cmd",))


def _entries(*slots: int) -> list[Entry]:
    return [Entry(s, (1, 1), VALUE) for s in slots]


def test_new_entries_without_commits_may_go_early() -> None:
    assert _commit_is_durable(Ready(persist_entries=_entries(5, 6)))


def test_commits_of_older_synced_slots_may_go_early() -> None:
    rd = Ready(persist_entries=_entries(7, 8), committed=[(5, VALUE), (6, VALUE)])
    assert _commit_is_durable(rd)


def test_a_commit_that_counts_this_readys_own_vote_waits_for_the_sync() -> None:
    # A single-voter group commits slot 7 on the leader's own, not yet synced, vote.
    rd = Ready(persist_entries=_entries(7), committed=[(6, VALUE), (7, VALUE)])
    assert not _commit_is_durable(rd)
    # Re-accepting an older slot at a new ballot while committing it: also waits.
    rd = Ready(persist_entries=_entries(3, 9), committed=[(3, VALUE)])
    assert not _commit_is_durable(rd)


def test_commits_without_new_entries_are_durable() -> None:
    assert _commit_is_durable(Ready(committed=[(4, VALUE)], persist_commit=4))
