"""The leader's per-job task timeline: bounded, first report wins, kinds of dispatch."""

from lepton_ai.compute.scheduler_events import TaskAttempt
from lepton_ai.monitor.tasklog import TaskLog


def att(job: str, stage: int, part: int, attempt: int, epoch: int = 1) -> TaskAttempt:
    return TaskAttempt(job, stage, part, epoch, attempt)


def test_a_span_runs_from_dispatch_to_its_first_report() -> None:
    log = TaskLog()
    assert log.dispatched(att("j", 0, 0, 1), "w1", False, 10.0) == "first"
    span = log.ended(att("j", 0, 0, 1), "w1", "succeeded", 12.5)
    assert span is not None
    assert (span.started, span.ended, span.outcome, span.worker) == (10.0, 12.5, "succeeded", "w1")
    assert log.ended(att("j", 0, 0, 1), "w1", "failed", 13.0) is None  # duplicate report
    spans, dropped = log.spans("j")
    assert [(s.outcome, s.ended) for s in spans] == [("succeeded", 12.5)]
    assert dropped == 0


def test_retries_and_backups_are_told_apart() -> None:
    log = TaskLog()
    assert log.dispatched(att("j", 0, 3, 1), "w1", False, 1.0) == "first"
    log.ended(att("j", 0, 3, 1), "w1", "failed", 2.0)
    assert log.dispatched(att("j", 0, 3, 2), "w2", False, 2.0) == "retry"
    assert log.dispatched(att("j", 0, 3, 3), "w1", True, 3.0) == "backup"
    spans, _ = log.spans("j")
    assert [(s.attempt, s.worker, s.speculative) for s in spans] == [
        (1, "w1", False),
        (2, "w2", False),
        (3, "w1", True),
    ]


def test_a_report_from_the_previous_term_is_a_point_span() -> None:
    log = TaskLog()
    span = log.ended(att("j", 1, 0, 7, epoch=0), "w9", "succeeded", 5.0)
    assert span is not None and span.started == span.ended == 5.0


def test_bounded_per_job_and_in_jobs() -> None:
    log = TaskLog(spans_per_job_max=10, jobs_max=3)
    for i in range(100):  # 10x past the per-job bound
        log.dispatched(att("big", 0, i, 1), "w", False, float(i))
    spans, dropped = log.spans("big")
    assert len(spans) == 10 and dropped == 90
    assert spans[0].partition == 90  # the oldest went first
    for j in range(30):  # 10x past the job bound
        log.dispatched(att(f"j{j}", 0, 0, 1), "w", False, 0.0)
    assert log.spans("big") == ([], 0)
    assert [log.spans(f"j{j}")[0] != [] for j in (27, 28, 29)] == [True, True, True]
    assert log.spans("j26") == ([], 0)


def test_a_queued_attempt_starts_when_its_worker_says_so() -> None:
    log = TaskLog()
    log.dispatched(att("j", 0, 0, 1), "w1", False, 10.0)
    log.started(att("j", 0, 0, 1), 12.0)  # it sat behind another attempt for 2 s
    span = log.ended(att("j", 0, 0, 1), "w1", "succeeded", 13.0)
    assert span is not None
    assert (span.dispatched, span.started, span.ended) == (10.0, 12.0, 13.0)
    log.started(att("j", 0, 0, 1), 14.0)  # late: an ended attempt keeps its times
    assert log.spans("j")[0][0].started == 12.0


def test_a_lost_worker_takes_its_running_attempts_with_it() -> None:
    log = TaskLog()
    log.dispatched(att("j", 0, 0, 1), "w1", False, 1.0)
    log.dispatched(att("j", 0, 1, 2), "w1", False, 1.0)
    log.dispatched(att("j", 0, 2, 3), "w2", False, 1.0)
    log.ended(att("j", 0, 1, 2), "w1", "succeeded", 2.0)
    assert log.worker_lost("w1", 3.0) == 1  # the finished one stays finished
    outcomes = {s.partition: (s.outcome, s.ended) for s in log.spans("j")[0]}
    assert outcomes == {0: ("lost", 3.0), 1: ("succeeded", 2.0), 2: ("running", 0.0)}
    assert log.ended(att("j", 0, 0, 1), "w1", "succeeded", 4.0) is None  # too late
    assert log.worker_lost("w1", 5.0) == 0


def test_a_lost_worker_counts_only_attempts_still_kept_and_running() -> None:
    log = TaskLog(spans_per_job_max=2)
    for i in range(3):  # the first is pushed out by the bound while it runs
        log.dispatched(att("j", 0, i, i + 1), "w1", False, 1.0)
    log.dispatched(att("k", 0, 0, 9), "w2", False, 1.0)
    assert log.worker_lost("w1", 2.0) == 2
    assert [s.outcome for s in log.spans("j")[0]] == ["lost", "lost"]
    assert [s.outcome for s in log.spans("k")[0]] == ["running"]
    assert log.worker_lost("w1", 3.0) == 0
    assert log.worker_lost("w2", 3.0) == 1
