"""The restart reconciler (``heal/restarts.py``) under deaths, flapping and crash loops.

A seeded simulation drives it like the supervisor does: processes die at random
moments, the core decides, started processes run again. A failure prints its seed.
"""

from __future__ import annotations

import os
import random

import pytest

from lepton_ai.heal.backoff import Backoff
from lepton_ai.heal.restarts import (
    EXIT_REMOVED,
    Observed,
    ReportCrashLoop,
    ReportGone,
    RestartConfig,
    RestartReconciler,
    StartMember,
    describe_exit,
)

CFG = RestartConfig(
    backoff=Backoff(initial_s=0.5, max_s=4.0), stable_after_s=10.0, crash_loop_max=4
)


def test_first_restart_is_immediate_then_back_off_doubles() -> None:
    core = RestartReconciler(CFG)
    core.add("worker-0", 0.0)
    dead = {"worker-0": Observed(False, -9)}
    starts: list[float] = []
    now = 0.0
    for _ in range(4):  # four quick deaths in a row
        while True:
            acts = core.step(dead, now)
            if acts:
                (act,) = acts
                assert isinstance(act, StartMember)
                starts.append(now)
                break
            now += 0.01
        now += 0.1  # it dies again 0.1 s after its start
    deaths = [0.0, *[s + 0.1 for s in starts[:-1]]]
    waits = [round(s - d, 1) for s, d in zip(starts, deaths, strict=True)]
    assert waits == [0.0, 0.5, 1.0, 2.0]
    assert core.members["worker-0"].restarts == 4
    assert core.members["worker-0"].last_exit == "killed by SIGKILL"


def test_crash_loop_is_reported_once_and_left_down_until_reset() -> None:
    core = RestartReconciler(CFG)
    core.add("coordinator-1", 0.0)
    now, reports = 0.0, list[object]()
    for _ in range(2_000):
        # Every start fails at once: "exit 1" whenever it is looked at.
        reports += core.step({"coordinator-1": Observed(False, 1)}, now)
        now += 0.05
    loops = [a for a in reports if isinstance(a, ReportCrashLoop)]
    assert len(loops) == 1 and loops[0].cause == "exit 1"
    assert sum(isinstance(a, StartMember) for a in reports) == CFG.crash_loop_max
    assert core.members["coordinator-1"].state == "crashloop"
    core.reset("coordinator-1", now)  # an operator's restart tries again
    assert core.members["coordinator-1"].state == "running"
    assert core.members["coordinator-1"].restarts == CFG.crash_loop_max


def test_a_member_that_ran_stably_restarts_at_once_again() -> None:
    core = RestartReconciler(CFG)
    core.add("worker-1", 0.0)
    dead = {"worker-1": Observed(False, -9)}
    assert core.step(dead, 1.0)  # immediate
    assert not core.step(dead, 1.1)  # dies quickly again: waits 0.5 s
    assert core.step(dead, 1.6)
    # Runs 20 s (past stable_after_s), then dies: the count of quick deaths restarts.
    assert core.step({"worker-1": Observed(True)}, 21.0) == []
    assert isinstance(core.step(dead, 21.6)[0], StartMember)


def test_removed_coordinator_is_not_restarted() -> None:
    core = RestartReconciler(CFG)
    core.add("coordinator-2", 0.0)
    (act,) = core.step({"coordinator-2": Observed(False, EXIT_REMOVED)}, 5.0)
    assert isinstance(act, ReportGone) and "removed" in act.cause
    assert core.step({"coordinator-2": Observed(False, EXIT_REMOVED)}, 100.0) == []


def test_failed_start_counts_as_a_quick_death() -> None:
    core = RestartReconciler(CFG)
    core.add("coordinator-0", 0.0)
    (act,) = core.step({"coordinator-0": Observed(False, -9)}, 1.0)
    assert isinstance(act, StartMember)
    assert core.start_failed("coordinator-0", 1.0, "address in use") is None
    assert core.members["coordinator-0"].last_exit == "start failed: address in use"
    assert core.step({"coordinator-0": Observed(False, None)}, 1.2) == []
    assert core.step({"coordinator-0": Observed(False, None)}, 1.5)


def test_bad_config_and_exit_descriptions() -> None:
    with pytest.raises(ValueError):
        RestartConfig(stable_after_s=0)
    assert describe_exit(-15) == "killed by SIGTERM"
    assert describe_exit(2) == "exit 2"
    assert describe_exit(-40) == "killed by signal 40"


SEEDS = int(os.environ.get("LEPTON_SIM_SEEDS", "200"))


@pytest.mark.parametrize("seed", range(SEEDS))
def test_simulated_members_always_come_back_unless_crash_looping(seed: int) -> None:
    """Random deaths (some members flap: they die soon after every start); at the
    end every member runs unless it died more than ``crash_loop_max`` times in a
    row within ``stable_after_s`` of a start (a reference count kept here), the
    waits never exceed the cap, and no member is started while it still runs."""
    rng = random.Random(seed)
    core = RestartReconciler(CFG)
    members = [f"worker-{i}" for i in range(rng.randint(1, 6))]
    flappy = {m for m in members if rng.random() < 0.3}
    alive = dict.fromkeys(members, True)
    started_at = dict.fromkeys(members, 0.0)
    streak = dict.fromkeys(members, 0)  # quick deaths in a row, as the rules define them
    looped: set[str] = set()
    for m in members:
        core.add(m, 0.0)
    now = 0.0
    while now < 120.0:
        for m in members:
            # Steady members die now and then; flappy ones 0.2 s after every start.
            dies = rng.random() < 0.05 / 20.0 or (m in flappy and now - started_at[m] > 0.2)
            if alive[m] and dies and now < 100.0:
                alive[m] = False
                quick = now - started_at[m] < CFG.stable_after_s
                streak[m] = streak[m] + 1 if quick else 1
                if streak[m] > CFG.crash_loop_max:
                    looped.add(m)
        observed = {m: Observed(alive[m], None if alive[m] else -9) for m in members}
        for act in core.step(observed, now):
            if isinstance(act, StartMember):
                assert not alive[act.member], f"seed {seed}: {act.member} started twice"
                assert act.delay_s <= CFG.backoff.max_s + 0.05, f"seed {seed}: waited too long"
                alive[act.member] = True
                started_at[act.member] = now
        now += 0.05
    for m in members:
        state = core.members[m].state
        assert (state == "crashloop") == (m in looped), f"seed {seed}: {m} in state {state}"
        assert alive[m] or m in looped, f"seed {seed}: {m} left down"
    assert flappy <= looped, f"seed {seed}: a flapping member was restarted forever"
