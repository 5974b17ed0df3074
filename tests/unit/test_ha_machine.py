"""``node.replicated.CoordinatorMachine``: jobs, KV and meta commands on one log."""

from __future__ import annotations

from helpers import PLAN, map_done
from lepton_ai.compute.job_state import (
    ApplyResult,
    JobCommand,
    JobStateConfig,
    JobSubmitted,
    decode_apply_result,
    encode_command,
)
from lepton_ai.compute.plan import JobOptions
from lepton_ai.consensus.kv import Get, OpenSession, Put, Request
from lepton_ai.consensus.kv import encode_command as kv_encode
from lepton_ai.node.replicated import (
    ClusterEvent,
    CoordinatorMachine,
    LeaderElected,
    encode_meta,
)


def _log() -> list[bytes]:
    return [
        encode_meta(LeaderElected(0, "127.0.0.1:1", 1024, 1.0)),
        encode_command(JobSubmitted("j1", PLAN, JobOptions())),
        kv_encode(OpenSession()),
        kv_encode(Request(1, 1, 1, Put("k", "v"))),
        encode_command(map_done("j1", 0, 1)),
        encode_command(map_done("j1", 0, 2)),  # a late duplicate: rejected
        encode_meta(ClusterEvent(2.0, "worker_lost", "w9")),
    ]


def test_commands_are_routed_and_the_first_result_wins() -> None:
    sm = CoordinatorMachine()
    seen: list[tuple[JobCommand, ApplyResult]] = []
    sm.listener = lambda cmd, res: seen.append((cmd, res))
    results = [sm.apply(raw) for raw in _log()]
    assert decode_apply_result(results[1]).accepted
    assert decode_apply_result(results[4]).accepted
    assert decode_apply_result(results[5]) == ApplyResult(False, "task already finished")
    assert sm.read(Get("k")).value == "v"
    assert sm.leaders == {0: "127.0.0.1:1"}
    assert [e.kind for e in sm.events] == ["leader_elected", "worker_lost"]
    assert [type(c).__name__ for c, _ in seen] == ["JobSubmitted", "TaskFinished", "TaskFinished"]
    job = sm.jobs.job("j1")
    assert job is not None and job.results_accepted == 1 and job.results_rejected == 1


def test_snapshot_restores_jobs_kv_leaders_and_events() -> None:
    sm = CoordinatorMachine()
    for raw in _log():
        sm.apply(raw)
    copy = CoordinatorMachine()
    copy.restore(sm.snapshot())
    assert copy.snapshot() == sm.snapshot()
    assert copy.read(Get("k")).value == "v"
    assert copy.leaders == sm.leaders and list(copy.events) == list(sm.events)
    # The copy keeps applying like the original (same session table, same jobs).
    raw = encode_command(map_done("j1", 1, 1))
    assert copy.apply(raw) == sm.apply(raw)


def test_event_log_is_bounded_and_retention_is_configurable() -> None:
    sm = CoordinatorMachine(JobStateConfig(finished_jobs_max=3), events_max=5)
    for i in range(20):
        sm.apply(encode_meta(ClusterEvent(float(i), "task_rescheduled", str(i))))
    assert [e.detail for e in sm.events] == ["15", "16", "17", "18", "19"]
    assert sm.jobs.config.finished_jobs_max == 3


def test_garbage_changes_no_job_and_no_key() -> None:
    sm = CoordinatorMachine()
    for raw in _log():
        sm.apply(raw)
    jobs, keys = sm.jobs.snapshot(), len(sm)
    sm.apply(b"\x00\x01garbage")  # the KV machine rejects it (its apply clock still ticks)
    assert sm.jobs.snapshot() == jobs and len(sm) == keys
