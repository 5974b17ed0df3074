"""The pure leader search both clients use after losing the leader (time passed in)."""

from __future__ import annotations

import pytest

from lepton_ai.consensus.leader_search import Asking, LeaderSearch, SearchConfig

A, B, C = "a:1", "b:1", "c:1"
CONFIG = SearchConfig(suspect_s=1.0, poll_s=0.02, poll_max_s=0.05, backoff_s=0.1, backoff_max_s=0.4)


def test_a_failed_address_is_suspect_until_it_answers_or_suspicion_expires() -> None:
    s = LeaderSearch([A, B, C], CONFIG)
    s.failed(A, now=10.0)
    assert s.suspect(A, 10.5) and not s.usable(A, 10.5)
    assert not s.suspect(A, 11.0) and s.usable(A, 11.0)  # a restarted replica may lead again
    s.failed(B, now=10.0)
    s.answered(B)
    assert s.usable(B, 10.1)
    assert not s.usable(None, 10.1)
    # A replica nobody listed (a hint named one that joined) is suspected like the others.
    s.failed("d:1", now=10.0)
    assert s.suspect("d:1", 10.1) and "d:1" in s.to_ask(11.5)


def test_remembered_addresses_are_bounded() -> None:
    s = LeaderSearch([A], SearchConfig(addresses_max=2))
    s.add(B)
    s.failed(C, 0.0)  # beyond the bound: neither remembered nor suspected
    assert s.addresses == [A, B] and not s.suspect(C, 0.1)


def test_to_ask_skips_suspects_unless_every_replica_is_one() -> None:
    s = LeaderSearch([A, B, C], CONFIG)
    s.failed(A, 0.0)
    assert s.to_ask(0.1) == [B, C]
    s.failed(B, 0.0)
    s.failed(C, 0.0)
    assert s.to_ask(0.1) == [A, B, C]


def test_next_to_ask_goes_round_from_the_one_that_answered() -> None:
    s = LeaderSearch([A, B, C], CONFIG)
    assert s.next_to_ask(B, {B}, 0.0) == C
    assert s.next_to_ask(C, {B, C}, 0.0) == A
    assert s.next_to_ask(A, {A, B, C}, 0.0) is None
    s.failed(A, 0.0)
    assert s.next_to_ask(C, {B, C}, 0.1) is None  # A is suspect: nobody left this round


def test_pause_is_a_short_poll_while_someone_answers_and_the_backoff_when_nobody_can() -> None:
    s = LeaderSearch([A, B, C], CONFIG)
    s.failed(A, 0.0)
    polls = [s.pause_s(n, 0.1) for n in range(1, 6)]
    assert polls == pytest.approx([0.02, 0.03, 0.045, 0.05, 0.05])
    s.failed(B, 0.0)
    s.failed(C, 0.0)
    backoff = [s.pause_s(n, 0.1) for n in range(1, 5)]
    assert backoff == pytest.approx([0.1, 0.2, 0.4, 0.4])


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError):
        SearchConfig(poll_s=0.1, poll_max_s=0.05)
    with pytest.raises(ValueError):
        SearchConfig(suspect_s=-1)
    with pytest.raises(ValueError):
        LeaderSearch([], CONFIG)


def _failover_walk(election_s: float, rtt_s: float) -> float:
    """Simulated time at which a client asking in turn reaches the new leader C.

    A (the leader) dies at 0. B and C name A until ``election_s`` (their election
    timers), then C leads and B names C. Every question costs ``rtt_s``."""
    s = LeaderSearch([A, B, C], CONFIG)
    asking = Asking(s)
    now, target = 0.0, A
    for _ in range(1000):
        now += rtt_s
        if target == A:  # refused: the process is gone
            s.failed(A, now)
        else:
            s.answered(target)
            leader = A if now < election_s else C
            if leader == target:
                return now
            if s.usable(leader, now):
                asking.found()
                target = leader
                continue
        target, pause = asking.next(target, now)
        now += pause
    raise AssertionError("never reached the leader")


@pytest.mark.parametrize("election_s", [0.2, 0.31, 0.4])
def test_a_client_reaches_the_new_leader_within_a_poll_of_its_election(election_s: float) -> None:
    # The back-off it replaces (0.02 s doubling to 0.3 s) tried at 0.30 s and 0.60 s:
    # an election that ended at 0.31 s was seen at 0.60 s.
    reached = _failover_walk(election_s, rtt_s=0.001)
    assert election_s <= reached <= election_s + CONFIG.poll_max_s + 3 * 0.001


def test_a_whole_group_down_is_asked_on_the_backoff_not_the_poll() -> None:
    s = LeaderSearch([A, B, C], CONFIG)
    asking = Asking(s)
    target, pauses = A, []
    for _ in range(9):  # three rounds over three dead replicas
        s.failed(target, 0.0)
        target, pause = asking.next(target, 0.0)
        pauses.append(pause)
    assert pauses == pytest.approx([0, 0, 0.1, 0, 0, 0.2, 0, 0, 0.4])
    asking.found()
    assert asking.empty_rounds == 0 and not asking.asked
