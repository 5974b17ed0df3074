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
    assert len(loops) == 1 and loops[0].cause == "exit 1" and not loops[0].retrying
    assert sum(isinstance(a, StartMember) for a in reports) == CFG.crash_loop_max
    assert core.members["coordinator-1"].state == "crashloop"
    assert core.members["coordinator-1"].verdict == "crashloop"
    core.reset("coordinator-1", now)  # an operator's restart tries again
    assert core.members["coordinator-1"].state == "running"
    assert core.members["coordinator-1"].restarts == CFG.crash_loop_max


def test_a_member_killed_from_outside_in_a_loop_keeps_coming_back_at_the_cap() -> None:
    """SIGKILLed over and over (a chaos tool, the OOM killer): reported once, then
    restarted every ``backoff.max_s``; a stable run ends the loop."""
    core = RestartReconciler(CFG)
    core.add("worker-0", 0.0)
    dead, up = {"worker-0": Observed(False, -9)}, {"worker-0": Observed(True)}
    now, waits, loops = 0.0, list[float](), list[ReportCrashLoop]()
    while now < 60.0 or core.members["worker-0"].state != "running":
        for act in core.step(dead, now):
            if isinstance(act, StartMember):
                waits.append(round(act.delay_s, 1))
            elif isinstance(act, ReportCrashLoop):
                loops.append(act)
                assert core.members["worker-0"].verdict == "crashloop"
        now = round(now + 0.05, 2)
    assert len(loops) == 1 and loops[0].retrying and loops[0].deaths == CFG.crash_loop_max + 1
    assert waits[: CFG.crash_loop_max] == [0.0, 0.5, 1.0, 2.0]
    assert len(waits) > CFG.crash_loop_max + 5 and set(waits[CFG.crash_loop_max :]) == {4.0}
    # It runs past stable_after_s: the loop is over, the next death restarts at once.
    assert core.step(up, now) == [] and core.members["worker-0"].verdict == ""
    now += CFG.stable_after_s
    assert core.step(up, now) == []
    assert isinstance(core.step(dead, now)[0], StartMember)
    assert not core.members["worker-0"].looping


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
    """Random deaths (some members flap: they die soon after every start, by their
    own failure or killed from outside); at the end every member runs unless it
    failed by itself more than ``crash_loop_max`` times in a row within
    ``stable_after_s`` of a start (a reference count kept here), the waits never
    exceed the cap, and no member is started while it still runs."""
    rng = random.Random(seed)
    core = RestartReconciler(CFG)
    members = [f"worker-{i}" for i in range(rng.randint(1, 6))]
    flappy = {m for m in members if rng.random() < 0.3}
    # How each dies: killed from outside (-9) or failing by itself (exit 1).
    code = {m: rng.choice((-9, 1)) for m in members}
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
                if streak[m] > CFG.crash_loop_max and code[m] > 0:
                    looped.add(m)
        observed = {m: Observed(alive[m], None if alive[m] else code[m]) for m in members}
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
    own = {m for m in flappy if code[m] > 0}
    assert own <= looped, f"seed {seed}: a member failing by itself was restarted forever"
