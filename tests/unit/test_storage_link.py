"""Jobs and stored objects on one log: stored results become objects owned by their
job, a ``lep://`` output is re-keyed into place by ``JobFinished`` itself, and a
failed or forgotten job's objects go - the same on every replica, snapshots included."""

from __future__ import annotations

from helpers import NoRunner
from lepton_ai.compute.api import DistributedTask
from lepton_ai.compute.job_state import (
    ErrorInfo,
    JobCommand,
    JobDeleted,
    JobFailedCmd,
    JobFinished,
    JobSubmitted,
    OutputRef,
    TaskFinished,
    encode_command,
)
from lepton_ai.compute.plan import JobOptions
from lepton_ai.data.outputs import WriteSpec
from lepton_ai.node.coord_machine import JobsMachine
from lepton_ai.node.replicated import CoordinatorMachine
from lepton_ai.storage.messages import ObjectMeta
from lepton_ai.storage.meta import ObjectPut, encode_storage_command

TASK = DistributedTask(NoRunner())
COLLECT = TASK.parallelize(range(10), 2).map(str).plan_bytes()
WRITE = TASK.parallelize(range(10), 2).plan_bytes("write", None, WriteSpec("lep://out/x", "jsonl"))


def stored(oid_digit: str, node: str = "n1") -> ObjectMeta:
    return ObjectMeta("", oid_digit * 32, 100, 7, 1 << 20, [node, "n2"], 2)


def result(job: str, partition: int, oid_digit: str) -> TaskFinished:
    ref = OutputRef("w1", f"obj:{oid_digit * 32}", 100, None, stored(oid_digit))
    return TaskFinished(job, 0, partition, 1, 1, "w1", [ref], 0.1)


def run(machine: JobsMachine | CoordinatorMachine, cmds: list[JobCommand]) -> list[ObjectMeta]:
    removed: list[ObjectMeta] = []
    machine.storage_listener = removed.extend
    for cmd in cmds:
        machine.apply(encode_command(cmd))
    return removed


def test_stored_results_are_objects_of_their_job_and_go_with_it() -> None:
    for machine in (JobsMachine(), CoordinatorMachine()):
        run(machine, [JobSubmitted("j", COLLECT, JobOptions()), result("j", 0, "a")])
        meta = machine.storage.get("_jobs/j/result-0")
        assert meta is not None and meta.job == "j" and meta.replicas == ["n1", "n2"]
        run(machine, [result("j", 1, "b"), JobFinished("j", 1.0)])
        assert machine.storage.total_objects == 2  # kept while the job's result is
        gone = run(machine, [JobDeleted("j")])
        assert sorted(m.oid for m in gone) == ["a" * 32, "b" * 32]
        assert machine.storage.total_objects == 0


def test_a_failed_job_keeps_no_stored_result() -> None:
    machine = CoordinatorMachine()
    run(machine, [JobSubmitted("j", COLLECT, JobOptions()), result("j", 0, "a")])
    gone = run(machine, [JobFailedCmd("j", ErrorInfo("user", "boom"), 1.0)])
    assert [m.oid for m in gone] == ["a" * 32]
    assert machine.storage.total_objects == 0


def test_a_lep_output_appears_whole_in_the_finishing_command_replacing_the_old_one() -> None:
    machine = CoordinatorMachine()
    old = ObjectMeta("out/x/part-00007.jsonl", "c" * 32, 5, 1, 1 << 20, ["n1"], 1)
    machine.apply(encode_storage_command(ObjectPut(old)))
    run(machine, [JobSubmitted("j", WRITE, JobOptions()), result("j", 0, "a"), result("j", 1, "b")])
    assert [m.key for m in machine.storage.list("out/")] == ["out/x/part-00007.jsonl"]
    gone = run(machine, [JobFinished("j", 2.0)])
    keys = [m.key for m in machine.storage.list("out/")]
    assert keys == ["out/x/part-00000.jsonl", "out/x/part-00001.jsonl"]
    assert [m.oid for m in gone] == ["c" * 32]  # only the earlier output's bytes go
    assert all(m.job == "" for m in machine.storage.list("out/"))
    # The output outlives its job.
    run(machine, [JobDeleted("j")])
    assert [m.key for m in machine.storage.list("out/")] == keys


def test_replicas_agree_through_a_snapshot() -> None:
    a, b = CoordinatorMachine(), CoordinatorMachine()
    cmds: list[JobCommand] = [JobSubmitted("j", WRITE, JobOptions()), result("j", 0, "a")]
    run(a, cmds)
    b.restore(a.snapshot())
    tail: list[JobCommand] = [result("j", 1, "b"), JobFinished("j", 2.0)]
    run(a, tail)
    run(b, tail)
    assert a.snapshot() == b.snapshot()
    local = JobsMachine()
    run(local, [*cmds, *tail])
    copy = JobsMachine()
    copy.restore(local.snapshot())
    assert copy.snapshot() == local.snapshot()
    assert [m.key for m in copy.storage.list("out/")] == [m.key for m in a.storage.list("out/")]


def test_an_output_survives_its_job_evicted_by_its_own_finish() -> None:
    from lepton_ai.compute.job_state import JobStateConfig

    machine = CoordinatorMachine(JobStateConfig(finished_jobs_max=1))
    run(machine, [JobSubmitted("writer", WRITE, JobOptions())])
    run(machine, [JobSubmitted("other", COLLECT, JobOptions())])
    run(machine, [result("other", 0, "c"), result("other", 1, "d"), JobFinished("other", 1.0)])
    # The writer was submitted first: finishing it evicts its own record at once.
    run(machine, [result("writer", 0, "a"), result("writer", 1, "b"), JobFinished("writer", 2.0)])
    assert machine.jobs.job("writer") is None
    assert [m.key for m in machine.storage.list("out/")] == [
        "out/x/part-00000.jsonl",
        "out/x/part-00001.jsonl",
    ]
