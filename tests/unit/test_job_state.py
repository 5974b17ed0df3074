"""The job state machine: first result wins, stale loss reports, outcome, retention, snapshots."""

from __future__ import annotations

import pytest

from helpers import PLAN, map_done
from lepton_ai.compute.job_state import (
    ErrorInfo,
    JobDeleted,
    JobFailedCmd,
    JobFinished,
    JobStateConfig,
    JobStateMachine,
    JobSubmitted,
    OutputLost,
    OutputRef,
    TaskFinished,
    decode_apply_result,
    encode_command,
)
from lepton_ai.compute.plan import JobOptions
from lepton_ai.compute.run_task import run_task
from lepton_ai.errors import JobFailed, TaskError


def _result_done(job: str, p: int, attempt: int, data: bytes) -> TaskFinished:
    return TaskFinished(job, 1, p, 1, attempt, "w1", [OutputRef("w1", "", len(data), data)])


def _submitted(sm: JobStateMachine, job: str = "j1") -> None:
    assert sm.apply_command(JobSubmitted(job, PLAN, JobOptions())).accepted


def test_first_task_finished_wins_and_duplicates_change_nothing() -> None:
    sm = JobStateMachine()
    _submitted(sm)
    assert sm.apply_command(map_done("j1", 0, 1)).accepted
    before = sm.snapshot()
    res = sm.apply_command(map_done("j1", 0, 2))
    assert not res.accepted and "already finished" in res.reason
    rec = sm.job("j1")
    assert rec is not None and rec.outcomes[0][0] is not None and rec.outcomes[0][0].attempt == 1
    assert rec.results_rejected == 1
    rec.results_rejected = 0
    assert sm.snapshot() == before


def test_output_lost_clears_only_the_named_attempt() -> None:
    sm = JobStateMachine()
    _submitted(sm)
    sm.apply_command(map_done("j1", 0, 1))
    assert not sm.apply_command(OutputLost("j1", 0, 0, 1, 99)).accepted  # stale
    assert sm.apply_command(OutputLost("j1", 0, 0, 1, 1)).accepted
    assert sm.apply_command(map_done("j1", 0, 3)).accepted  # the re-run is a new generation
    assert not sm.apply_command(OutputLost("j1", 1, 0, 1, 1)).accepted  # results are never lost


def test_job_outcome_and_result_through_real_tasks() -> None:
    from lepton_ai.compute.plan import decode_plan

    plan = decode_plan(PLAN)
    sm = JobStateMachine()
    _submitted(sm)
    maps = [run_task(plan, 0, p) for p in range(2)]
    for p in range(2):
        assert sm.apply_command(map_done("j1", p, 1)).accepted
    assert not sm.apply_command(JobFinished("j1")).accepted  # results missing
    for r in range(2):
        inputs = [m.buckets[r] for m in maps if m.buckets is not None]
        out = run_task(plan, 1, r, inputs)
        assert out.result is not None
        assert sm.apply_command(_result_done("j1", r, 1, out.result)).accepted
    assert sm.apply_command(JobFinished("j1", 5.0)).accepted
    rec = sm.job("j1")
    assert rec is not None and rec.status == "finished" and rec.finished_at == 5.0
    assert rec.progress() == (4, 4)  # the map outcomes are dropped; every task was done
    assert sorted(rec.result()) == [(0, 20), (1, 25)]
    assert not sm.apply_command(map_done("j1", 0, 7)).accepted  # closed job


def test_failed_job_raises_task_error() -> None:
    sm = JobStateMachine()
    _submitted(sm)
    err = ErrorInfo("user", "boom", 0, 1, "ZeroDivisionError", "Traceback...\nZeroDivisionError")
    assert sm.apply_command(JobFailedCmd("j1", err, 1.0)).accepted
    rec = sm.job("j1")
    assert rec is not None
    with pytest.raises(TaskError) as info:
        rec.result()
    assert info.value.partition == 1 and "ZeroDivisionError" in info.value.remote_traceback
    infra = ErrorInfo("infra", "task failed 4 times", 1, 0)
    assert isinstance(infra.to_exception(), JobFailed)
    assert not isinstance(infra.to_exception(), TaskError)


def test_bad_commands_are_rejected_without_change() -> None:
    sm = JobStateMachine()
    _submitted(sm)
    before = sm.snapshot()
    assert not decode_apply_result(sm.apply(b"\x93garbage")).accepted
    assert not sm.apply_command(JobSubmitted("j1", PLAN, JobOptions())).accepted  # duplicate
    assert not sm.apply_command(JobSubmitted("j2", b"not a plan", JobOptions())).accepted
    assert not sm.apply_command(map_done("nope", 0, 1)).accepted
    assert not sm.apply_command(TaskFinished("j1", 0, 9, 1, 1, "w", [])).accepted
    assert not sm.apply_command(TaskFinished("j1", 0, 0, 1, 1, "w", [])).accepted  # bucket count
    not_inline = TaskFinished("j1", 1, 0, 1, 1, "w1", [OutputRef("w1", "blk", 3)])
    assert not sm.apply_command(not_inline).accepted  # a result must be inline
    assert sm.snapshot() == before


def test_bytes_interface_snapshot_restore_and_determinism() -> None:
    cmds = [
        JobSubmitted("a", PLAN, JobOptions()),
        map_done("a", 0, 1),
        map_done("a", 0, 2),
        JobSubmitted("b", PLAN, JobOptions(max_retries=1)),
        JobDeleted("b"),
    ]
    one, two = JobStateMachine(), JobStateMachine()
    for c in cmds:
        r1, r2 = one.apply(encode_command(c)), two.apply(encode_command(c))
        assert r1 == r2
    assert one.snapshot() == two.snapshot()
    three = JobStateMachine()
    three.restore(one.snapshot())
    assert three.snapshot() == one.snapshot() and three.job("b") is None


def test_finished_jobs_are_evicted_oldest_first() -> None:
    sm = JobStateMachine(JobStateConfig(finished_jobs_max=2, jobs_max=10))
    for i in range(4):
        _submitted(sm, f"j{i}")
        sm.apply_command(JobFailedCmd(f"j{i}", ErrorInfo("infra", "x")))
    assert sorted(sm.state.jobs) == ["j2", "j3"]
    for i in range(10 - 2):
        _submitted(sm, f"r{i}")
    assert not sm.apply_command(JobSubmitted("over", PLAN, JobOptions())).accepted
