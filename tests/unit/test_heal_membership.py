"""The coordinator membership reconciler (pure): which change, when, and never two."""

from __future__ import annotations

import pytest

from lepton_ai.heal.backoff import Backoff
from lepton_ai.heal.membership import (
    EXIT_REMOVED,
    AddMember,
    MembershipConfig,
    MembershipReconciler,
    Observed,
    RemoveMember,
    StandbyView,
)

CFG = MembershipConfig(
    voters=3,
    replace_after_s=10.0,
    caught_up_slots=5,
    standby_silent_max_s=1.0,
    backoff=Backoff(initial_s=1.0, max_s=4.0),
)
READY = StandbyView(100, "h:100", match=50, silent_s=0.2)


def obs(
    members: tuple[int, ...] = (0, 1, 2),
    silent: dict[int, float] | None = None,
    standbys: tuple[StandbyView, ...] = (READY,),
    pending: bool = False,
    commit: int = 50,
) -> Observed:
    return Observed(
        leader=0,
        members=members,
        pending=pending,
        commit=commit,
        silent_s=silent if silent is not None else {m: 0.1 for m in members if m != 0},
        standbys=standbys,
    )


def test_healthy_group_changes_nothing() -> None:
    rec = MembershipReconciler(CFG)
    assert rec.step(obs(), 0.0) == []
    assert rec.step(obs(silent={1: 9.9, 2: 0.1}), 1.0) == []  # not yet past replace_after_s


def test_dead_voter_removed_then_standby_promoted() -> None:
    rec = MembershipReconciler(CFG)
    (action,) = rec.step(obs(silent={1: 10.5, 2: 0.1}), 0.0)
    assert action == RemoveMember(1, 10.5, 100)
    assert rec.step(obs(silent={1: 11.0, 2: 0.1}), 0.3) == []  # one change at a time
    rec.finished(action, True, 0.5)
    (action,) = rec.step(obs(members=(0, 2), silent={2: 0.1}), 0.6)
    assert action == AddMember(100, "h:100")
    rec.finished(action, True, 1.0)
    assert rec.step(obs(members=(0, 2, 100), silent={2: 0.1, 100: 0.1}, standbys=()), 1.2) == []
    assert rec.changes == 2


def test_no_removal_without_a_ready_standby() -> None:
    rec = MembershipReconciler(CFG)
    dead = {1: 60.0, 2: 0.1}
    assert rec.step(obs(silent=dead, standbys=()), 0.0) == []
    behind = StandbyView(100, "h:100", match=40, silent_s=0.1)  # 10 slots behind, bound 5
    assert rec.step(obs(silent=dead, standbys=(behind,)), 0.0) == []
    gone = StandbyView(100, "h:100", match=50, silent_s=3.0)
    assert rec.step(obs(silent=dead, standbys=(gone,)), 0.0) == []
    member = StandbyView(2, "h:2", match=50, silent_s=0.1)  # a member is no standby
    assert rec.step(obs(silent=dead, standbys=(member,)), 0.0) == []


def test_never_removes_the_leader_nor_without_a_live_quorum() -> None:
    rec = MembershipReconciler(CFG)
    assert rec.step(obs(silent={1: 0.1, 2: 0.1, 0: 99.0}), 0.0) == []
    five = MembershipReconciler(MembershipConfig(voters=5, replace_after_s=10.0))
    members = (0, 1, 2, 3, 4)
    # Three of five silent: the two live ones are no quorum of the group; do nothing.
    silent = {1: 20.0, 2: 20.0, 3: 20.0, 4: 0.1}
    assert five.step(obs(members=members, silent=silent), 0.0) == []
    # Two of five: the longest silent goes first.
    silent = {1: 20.0, 2: 30.0, 3: 0.1, 4: 0.1}
    assert five.step(obs(members=members, silent=silent), 0.0) == [RemoveMember(2, 30.0, 100)]


def test_pending_change_in_the_log_waits() -> None:
    rec = MembershipReconciler(CFG)
    assert rec.step(obs(silent={1: 60.0, 2: 0.1}, pending=True), 0.0) == []
    assert rec.step(obs(members=(0, 2), silent={2: 0.1}, pending=True), 0.0) == []


def test_short_group_promotes_only_if_live_voters_carry_the_grown_group() -> None:
    rec = MembershipReconciler(CFG)
    # {0, 2} with 2 silent: adding a third would need 2 live voters of 3; there is one.
    assert rec.step(obs(members=(0, 2), silent={2: 30.0}), 0.0) == []
    assert rec.step(obs(members=(0, 2), silent={2: 0.5}), 0.0) == [AddMember(100, "h:100")]


def test_most_caught_up_standby_first() -> None:
    rec = MembershipReconciler(CFG)
    a = StandbyView(101, "h:101", match=48, silent_s=0.1)
    b = StandbyView(102, "h:102", match=50, silent_s=0.1)
    assert rec.step(obs(members=(0, 2), silent={2: 0.1}, standbys=(a, b)), 0.0) == [
        AddMember(102, "h:102")
    ]


def test_failure_backs_off_and_retry_re_decides() -> None:
    rec = MembershipReconciler(CFG)
    dead = obs(silent={1: 12.0, 2: 0.1})
    (action,) = rec.step(dead, 0.0)
    rec.finished(action, False, 1.0)
    assert rec.step(dead, 1.5) == []  # backing off (1 s after the first failure)
    # The voter came back meanwhile (flapping): the retry does not remove it.
    assert rec.step(obs(silent={1: 0.2, 2: 0.1}), 2.1) == []
    (again,) = rec.step(dead, 2.2)
    rec.finished(again, False, 2.5)
    assert rec.step(dead, 3.0) == []  # 2 s now
    assert rec.step(dead, 4.6) == [again]
    rec.finished(again, True, 5.0)
    assert rec.failures == 0


def test_stale_report_is_ignored() -> None:
    rec = MembershipReconciler(CFG)
    (action,) = rec.step(obs(silent={1: 12.0, 2: 0.1}), 0.0)
    rec.finished(AddMember(7, "x:1"), True, 0.1)
    assert rec.in_flight == action


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        MembershipConfig(voters=3, replace_after_s=0.0)
    with pytest.raises(ValueError):
        MembershipConfig(voters=0)


def test_exit_code_matches_the_restart_supervisor() -> None:
    """``heal.restarts`` (the supervisor) must leave a removed coordinator down."""
    from lepton_ai.heal import restarts

    assert EXIT_REMOVED == 3
    assert getattr(restarts, "EXIT_REMOVED", EXIT_REMOVED) == EXIT_REMOVED
