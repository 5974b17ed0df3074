"""The scheduler's task states: the transition table is the only way a task moves.

Every listed transition is taken; every unlisted (state, event) pair raises one
``InvariantError`` naming it and carrying the task's last transitions; and the
scheduler itself turns a second accepted result for one task into that error.
"""

from __future__ import annotations

import itertools

import pytest

from lepton_ai.compute.api import DistributedTask
from lepton_ai.compute.job_state import ApplyResult, JobStateMachine, JobSubmitted, OutputRef
from lepton_ai.compute.plan import JobOptions
from lepton_ai.compute.scheduler import TRANSITIONS, Scheduler, TaskEvent, TaskState
from lepton_ai.compute.scheduler.task_state import HISTORY_MAX, Task
from lepton_ai.compute.scheduler_events import (
    Applied,
    Dispatch,
    Propose,
    SchedulerConfig,
    TaskSucceeded,
    WorkerJoined,
)
from lepton_ai.errors import InvariantError

S, E = TaskState, TaskEvent
UNLISTED = [(s, e) for s, e in itertools.product(TaskState, TaskEvent) if (s, e) not in TRANSITIONS]


def _task(state: TaskState = S.PENDING) -> Task:
    task = Task("job", 1, 2)
    task.state = state  # set directly: a test fixture, not a transition
    return task


@pytest.mark.parametrize(("state", "event"), list(TRANSITIONS), ids=lambda x: x.name)
def test_every_listed_transition_is_taken(state: TaskState, event: TaskEvent) -> None:
    task = _task(state)
    task.to(event)
    assert task.state is TRANSITIONS[state, event]
    assert task.recent() == [f"{state.name} -{event.name}-> {task.state.name}"]


@pytest.mark.parametrize(("state", "event"), UNLISTED, ids=lambda x: x.name)
def test_every_unlisted_transition_raises_with_history(state: TaskState, event: TaskEvent) -> None:
    task = _task()
    task.to(E.DISPATCHED)  # some history first
    task.state = state
    with pytest.raises(InvariantError) as info:
        task.to(event)
    msg = str(info.value)
    assert f"{event.name} is not allowed in state {state.name}" in msg
    assert "task job/1/2" in msg and "PENDING -DISPATCHED-> RUNNING" in msg
    assert info.value.history == ("PENDING -DISPATCHED-> RUNNING",)
    assert task.state is state  # a refused transition changes nothing


def test_the_table_covers_each_state_and_each_event() -> None:
    assert {s for s, _ in TRANSITIONS} == set(TaskState)
    assert {e for _, e in TRANSITIONS} == set(TaskEvent)
    assert len(UNLISTED) > 0
    # A second result for one output generation is the invariant the old assert checked.
    assert (S.DONE, E.RESULT_APPLIED) in UNLISTED and (S.LOST, E.RESULT_APPLIED) in UNLISTED


def test_history_is_bounded_to_the_last_transitions() -> None:
    task = _task()
    for _ in range(3 * HISTORY_MAX):
        task.to(E.DISPATCHED)
        task.to(E.ATTEMPT_ENDED)
    assert len(task.history) <= 2 * HISTORY_MAX
    task.to(E.RESULT_PROPOSED)
    with pytest.raises(InvariantError) as info:
        task.to(E.LOSS_PROPOSED)
    history = info.value.history
    assert len(history) == HISTORY_MAX
    assert history[-1] == "PENDING -RESULT_PROPOSED-> COMMITTING"
    assert history[-2] == "RUNNING -ATTEMPT_ENDED-> PENDING"
    assert "; ".join(history) in str(info.value)


def test_invariant_error_is_shared_and_still_an_assertion_error() -> None:
    from lepton_ai.consensus.core import InvariantError as core_error
    from lepton_ai.consensus.core_types import InvariantError as types_error

    assert core_error is types_error is InvariantError
    assert issubclass(InvariantError, AssertionError)
    assert InvariantError("x").history == ()


def test_a_second_accepted_result_stops_the_scheduler_with_the_task_history() -> None:
    plan = DistributedTask(_NoRunner()).parallelize(range(4), 1).plan_bytes("count")
    sm = JobStateMachine()
    sched = Scheduler(SchedulerConfig(), epoch=1)
    sched.step(WorkerJoined("w1", "a1", 2, 0.0))
    cmd = JobSubmitted("j", plan, JobOptions())
    (dispatch,) = sched.step(Applied(cmd, sm.apply_command(cmd), 0.0))
    assert isinstance(dispatch, Dispatch)
    out = [OutputRef("w1", "", 1, b"4")]
    (propose,) = sched.step(TaskSucceeded(dispatch.attempt, "w1", out, 1.0))
    assert isinstance(propose, Propose)
    sched.step(Applied(propose.command, sm.apply_command(propose.command), 1.0))
    with pytest.raises(InvariantError) as info:  # the log would never accept it twice
        sched.step(Applied(propose.command, ApplyResult(True), 1.1))
    assert "RESULT_APPLIED is not allowed in state DONE" in str(info.value)
    assert info.value.history == (
        "PENDING -DISPATCHED-> RUNNING",
        "RUNNING -RESULT_PROPOSED-> COMMITTING",
        "COMMITTING -RESULT_APPLIED-> DONE",
    )


class _NoRunner:
    def submit_plan(self, plan: bytes, options: object) -> str:
        raise AssertionError("not submitted")
