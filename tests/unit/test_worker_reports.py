"""The wire's task structs at their edges: the coordinator's ``Dispatch`` becomes a
``TaskOrder``, an executor's ``ExecOutcome`` becomes the agent's report, and both
survive their codecs."""

from __future__ import annotations

from lepton_ai.compute.job_state import OutputRef
from lepton_ai.compute.scheduler_events import Dispatch, TaskAttempt
from lepton_ai.node.agent_tasks import outcome_report
from lepton_ai.node.coord_outbox import task_order
from lepton_ai.node.messages import (
    CoordinatorMessage,
    ExecOutcome,
    FailedReport,
    FetchFailedReport,
    Reports,
    RunTasks,
    StartedReport,
    SucceededReport,
    TaskOrder,
    WorkerMessage,
)
from lepton_ai.wire import Codec

READER = TaskAttempt("j1", 1, 0, 1, 7)
INPUTS = [OutputRef("w1", "j1/0/0:0", 10), OutputRef("w2", "j1/0/1:0", 10)]


def test_an_order_is_the_dispatch_without_what_the_worker_does_not_need() -> None:
    d = Dispatch(READER, "w3", 5, INPUTS, {"w1": "h:1"}, speculative=True)
    assert task_order(d) == TaskOrder(READER, 5, INPUTS, {"w1": "h:1"})


def test_outcomes_become_reports() -> None:
    order = TaskOrder(READER, 0, INPUTS)
    out = [OutputRef("w3", "result", 2, b"ok")]
    assert outcome_report(order, ExecOutcome(READER, "done", out, 0.1)) == SucceededReport(
        READER, out
    )
    raised = ExecOutcome(READER, "user", message="boom", exc_type="E", traceback="tb")
    assert outcome_report(order, raised) == FailedReport(READER, "user", "boom", "E", "tb")
    cancelled = ExecOutcome(READER, "cancelled", message="stop")
    assert outcome_report(order, cancelled) == FailedReport(READER, "cancelled", "stop")
    # A corrupt input is its map output's fault: a fetch failure of that map, on its holder.
    corrupt = ExecOutcome(READER, "corrupt_input", message="crc", map_partition=1)
    assert outcome_report(order, corrupt) == FetchFailedReport(READER, 0, 1, "w2")
    # ... unless the order never named that input: then the executor failed.
    stray = ExecOutcome(READER, "corrupt_input", message="crc", map_partition=9)
    assert outcome_report(order, stray) == FailedReport(READER, "infra", "crc")


def test_orders_and_reports_survive_their_codecs() -> None:
    to_worker = Codec[WorkerMessage](WorkerMessage)
    run = RunTasks([], [TaskOrder(READER, 0), TaskOrder(READER, 1, INPUTS, {"w1": "h:1"})])
    assert to_worker.decode(to_worker.encode(run)) == run
    to_coordinator = Codec[CoordinatorMessage](CoordinatorMessage)
    reports = Reports(
        [
            StartedReport(READER),
            SucceededReport(READER, INPUTS),
            FailedReport(READER, "infra", "oom"),
            FetchFailedReport(READER, 0, 1, "w2"),
        ]
    )
    assert to_coordinator.decode(to_coordinator.encode(reports)) == reports
