"""The timeline's one vocabulary: kinds, which are replicated, and their phases."""

from __future__ import annotations

import re

from lepton_ai.monitor.events import EventKind, phase_of


def test_kinds_are_unique_snake_case_names() -> None:
    values = [k.value for k in EventKind]
    assert len(values) == len(set(values))
    assert all(re.fullmatch(r"[a-z]+(_[a-z]+)*", v) for v in values)


def test_what_every_replica_shows() -> None:
    replicated = {k.value for k in EventKind if k.replicated}
    # The faults, their healing and every job's end reach every coordinator (a
    # client after a failover still sees them); a member's own start does not.
    assert {
        "worker_joined",
        "worker_lost",
        "task_rescheduled",
        "task_moved",
        "backup_launched",
        "task_failed",
        "fetch_failed",
        "job_expired",
        "output_lost",
        "coordinator_removed",
        "standby_promoted",
        "deployment_changed",
        "replica_placed",
        "replica_removed",
        "replica_lost",
        "unschedulable",
        "rollout_done",
        "autoscaled",
        "alert_raised",
        "alert_cleared",
    } == replicated
    assert not EventKind.COORDINATOR_STARTED.replicated
    # A job's end is derived from the logged command on every replica instead.
    assert not EventKind.JOB_FINISHED.replicated
    assert not EventKind.LEADER.replicated  # LEADER_ELECTED is, as its own log entry


def test_phases_tell_fault_detection_healing() -> None:
    assert EventKind.FAULT_INJECTED.phase == "fault"
    assert EventKind.WORKER_LOST.phase == "detection"
    assert EventKind.MEMBER_RESTARTED.phase == "healing"
    assert EventKind.JOB_FINISHED.phase == "progress"
    assert EventKind.COORDINATOR_STARTED.phase == "info"
    assert phase_of("worker_lost") == "detection"
    assert phase_of("something_a_newer_version_records") == "info"
