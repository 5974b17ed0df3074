"""A worker agent's Prometheus metrics: its own and its executors'.

The executors are short-lived children that run user code (and are replaced when
they die), so the agent exports them, the way a node exporter or cAdvisor exports
the containers of a host: the tasks they ran and how long (from the executors'
own timings in their ``ExecOutcome``s), and each executor process's CPU and memory read with
psutil at scrape time, labelled ``executor``. One target per node, then, whatever
its executors do.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import psutil
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from lepton_ai.monitor import metrics as m
from lepton_ai.node.messages import ExecOutcome, ExecOutcomeKind

if TYPE_CHECKING:
    from lepton_ai.node.worker import WorkerAgent

# An executor's outcome kind -> the label of its count (the coordinator's words).
_OUTCOME_OF: dict[ExecOutcomeKind, str] = {
    "done": "succeeded",
    "infra": "failed",
    "user": "user_error",
    "cancelled": "cancelled",
    "corrupt_input": "corrupt_input",
}


class AgentMonitor:
    def __init__(self, agent: WorkerAgent) -> None:
        self.agent = agent
        self.tasks: dict[str, int] = dict.fromkeys(_OUTCOME_OF.values(), 0)
        self.task_seconds = m.Histo(m.TASK_BUCKETS_S)
        self._procs: dict[int, psutil.Process] = {}  # by pid: cpu_times needs the object

    def executor_replied(self, reply: ExecOutcome) -> None:
        self.tasks[_OUTCOME_OF[reply.kind]] += 1
        if reply.kind == "done":
            self.task_seconds.observe(reply.duration_s)

    def collect(self) -> Iterator[Metric]:
        yield m.labelled_counter(
            "lepton_executor_tasks",
            "Tasks this node's executors ran, by outcome",
            "outcome",
            self.tasks.items(),
        )
        yield m.histogram(
            "lepton_executor_task_seconds",
            "A task's run time in its executor (reading input, user code, writing output)",
            self.task_seconds,
        )
        yield from self._executors()
        yield from self._storage()

    def _executors(self) -> Iterator[Metric]:
        states = GaugeMetricFamily(
            "lepton_executor_up", "1 per executor slot in its state", labels=["executor", "state"]
        )
        restarts = CounterMetricFamily(
            "lepton_executor_restarts",
            "Times each executor slot's process was replaced",
            labels=["executor"],
        )
        cpu = CounterMetricFamily(
            "lepton_executor_cpu_seconds", "CPU time of each executor process", labels=["executor"]
        )
        rss = GaugeMetricFamily(
            "lepton_executor_resident_memory_bytes",
            "Resident memory of each executor",
            labels=["executor"],
        )
        live: dict[int, psutil.Process] = {}
        for slot in self.agent.slots:
            name = str(slot.slot)
            states.add_metric([name, slot.state], 1)
            restarts.add_metric([name], slot.restarts)
            proc = self._process(slot.pid)
            if proc is None:
                continue
            live[slot.pid] = proc
            try:
                with proc.oneshot():
                    times = proc.cpu_times()
                    cpu.add_metric([name], times.user + times.system)
                    rss.add_metric([name], proc.memory_info().rss)
            except psutil.Error:
                continue  # it died between the listing and the read
        self._procs = live
        yield from (states, restarts, cpu, rss)

    def _process(self, pid: int) -> psutil.Process | None:
        if pid <= 0:
            return None
        proc = self._procs.get(pid)
        if proc is None:
            try:
                proc = psutil.Process(pid)
            except psutil.Error:
                return None
        return proc

    def _storage(self) -> Iterator[Metric]:
        usage = self.agent.storage.usage()
        yield m.gauge(
            "lepton_storage_used_bytes", "Bytes this node's object store holds", usage.used_bytes
        )
        yield m.gauge(
            "lepton_storage_capacity_bytes",
            "Capacity of this node's object store",
            usage.capacity_bytes,
        )
        yield m.gauge("lepton_storage_objects", "Object replicas this node holds", usage.objects)
        yield m.counter(
            "lepton_shuffle_bytes_served",
            "Shuffle blocks this node sent to the tasks that read them",
            self.agent.shuffle_bytes_served,
        )
