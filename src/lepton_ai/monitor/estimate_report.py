"""``Job.report()``: a finished job's cost-model terms, predicted and measured.

Measured, from the job itself (docs/cost-model.md):

* total: ``job_submitted`` to ``job_finished`` in the cluster's timeline;
* reduce ``r``: from the end of the last map-stage task to the job's end
  (``cluster.job_tasks``); without per-task times, the longest last-stage task
  (its executor time, from the job's record);
* transfer + compute: the rest (the map phase). With per-task times, compute is
  the map tasks' busy time per node and transfer the map phase's remainder
  (input and outputs moving, dispatch); without them the map phase is split in
  the calibration's proportion, and the report says so.

Predicted: ``calibration`` (``lep.cost.Calibration``), else the one the last
``lepton estimate job`` left in the timeline (``cost_calibrated``), at the job's
``N`` (its input items; a text input's from its size and the calibration's
items per byte) and ``n`` (the nodes that ran its tasks).
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

from lepton_ai.compute.job_state import JobRecord
from lepton_ai.compute.plan import decode_plan
from lepton_ai.data.sources import InlineSource, RangeSource, Source, TextSource
from lepton_ai.monitor.cost import Calibration, JobReport, JobTerms

CALIBRATION_EVENT = "cost_calibrated"
_record_decoder = msgspec.msgpack.Decoder(JobRecord)


def _input_items(sources: list[Source], per_byte: float) -> float | None:
    total = 0.0
    for s in sources:
        if isinstance(s, RangeSource):
            total += len(range(s.start, s.stop, s.step))
        elif isinstance(s, TextSource):
            if per_byte <= 0:
                return None
            total += (s.end - s.start) * per_byte
        elif isinstance(s, InlineSource) or hasattr(s, "count"):
            total += float(getattr(s, "count", 0))
        else:
            return None
    return total


def latest_calibration(events: list[dict[str, Any]]) -> Calibration | None:
    """The calibration of the last ``cost_calibrated`` event, if any."""
    for e in reversed(events):
        if e["kind"] == CALIBRATION_EVENT:
            return Calibration(**json.loads(e["detail"]))
    return None


def _event_time(events: list[dict[str, Any]], kind: str) -> float | None:
    times = [float(e["t"]) for e in events if e["kind"] == kind]
    return times[-1] if times else None


def _measured(
    record: JobRecord, events: list[dict[str, Any]], tasks: list[dict[str, Any]] | None
) -> tuple[float, float, float | None, int, dict[str, str]]:
    """(total, reduce, map-task busy time per node or None, nodes, how)."""
    start, end = _event_time(events, "job_submitted"), _event_time(events, "job_finished")
    how = {"total": "job_submitted -> job_finished in the timeline"}
    if start is None or end is None:
        start, end = record.submitted_at, record.finished_at
        how["total"] = "the job record's submitted_at -> finished_at"
    total = max(end - start, 0.0)
    last = len(record.outcomes) - 1
    if tasks:
        maps = [t for t in tasks if t["stage"] == 0]
        nodes = len({t["worker"] for t in tasks}) or 1
        map_end = max(float(t["ended"]) for t in maps)
        busy = sum(float(t["ended"]) - float(t["started"]) for t in maps) / nodes
        how["reduce"] = "end of the last map task -> job_finished (cluster.job_tasks)"
        how["compute"] = "the map tasks' busy time per node (cluster.job_tasks)"
        how["transfer"] = "the map phase less compute: inputs, outputs and dispatch moving"
        return total, max(end - map_end, 0.0), busy, nodes, how
    outcomes = [o for o in record.outcomes[last] if o is not None]
    nodes = 0  # the caller counts the cluster's nodes
    reduce_s = max((o.duration_s for o in outcomes), default=0.0) if last > 0 else 0.0
    how["reduce"] = "the longest reduce task's executor time (the job's record)"
    return total, min(reduce_s, total), None, nodes, how


def job_report(cluster: Any, job_id: str, calibration: Calibration | None = None) -> JobReport:
    info = cluster.job_info(job_id, 0.0)
    if info.status != "finished" or info.record is None:
        raise ValueError(f"job {job_id} is {info.status}: a report needs a finished job")
    record = _record_decoder.decode(info.record)
    events = cluster.events(job_id)
    job_tasks = getattr(cluster, "job_tasks", None)
    tasks = job_tasks(job_id) if callable(job_tasks) else None
    total, reduce_s, busy, nodes, how = _measured(record, events, tasks)
    if not nodes:
        members = cluster.status()["members"]
        nodes = max(1, sum(1 for m in members if m["role"] == "worker"))
    cal = calibration or latest_calibration(cluster.events())
    sources = list(decode_plan(record.plan).stages[0].sources or [])
    n_items = _input_items(sources, cal.items_per_byte if cal else 0.0)
    map_phase = total - reduce_s
    if busy is not None:
        compute = min(busy, map_phase)
    elif cal is not None:
        compute = map_phase * cal.b / (cal.b + cal.c)  # share of 1/c in 1/b + 1/c
        how["compute"] = how["transfer"] = "the map phase, split as the calibration's b : c"
    else:
        compute = map_phase
        how["compute"] = "the whole map phase (no per-task times, no calibration to split it)"
        how["transfer"] = "not separable without per-task times: counted in compute"
    measured = JobTerms(map_phase - compute, compute, reduce_s)
    predicted = cal.predict(n_items, nodes) if cal is not None and n_items is not None else None
    return JobReport(job_id, n_items, nodes, measured, predicted, cal, how)
