"""The scheduler core on the real Multi-Paxos cores, with seeded leader crashes and partitions.

``SimCluster`` runs three real ``Replica`` cores over a seeded faulty network.
Job commands proposed by the scheduler go through it; the chosen log, applied in
slot order to a ``JobStateMachine``, feeds the scheduler ``Applied`` events, as
the coordinator's apply hook does. The scheduler runs only on the current
leader, and - as ``node.replicated.Election`` does - only after the leader's own
marker command has been applied (so every earlier command is in its state):
then it is rebuilt with ``Scheduler.from_state`` and the workers re-register with
what they run; reports that found no leader wait in the worker's outbox.

Proposals of a deposed leader are not dropped: ``SimCluster`` re-proposes them on
later leaders, so late results from an old leadership do reach the log, which
must apply only the first ``TaskFinished`` of each task.

Checked per seed: each job's result equals the serial reference and no task
result is accepted twice. ``LEPTON_SIM_SEEDS=200`` runs more seeds.
"""

from __future__ import annotations

import heapq
import itertools
import operator
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from lepton_ai.compute.api import DistributedTask
from lepton_ai.compute.plan import JobOptions, decode_plan
from lepton_ai.compute.scheduler import Scheduler
from lepton_ai.compute.scheduler_events import (
    Applied,
    Cancel,
    Dispatch,
    Propose,
    RunningReport,
    SchedulerConfig,
    SchedulerEvent,
    TaskAttempt,
    TaskFailed,
    TaskSucceeded,
    Tick,
    WorkerJoined,
)
from lepton_ai.compute.state import (
    JobStateMachine,
    JobSubmitted,
    OutputLost,
    OutputRef,
    TaskFinished,
    decode_command,
    encode_command,
)
from lepton_ai.compute.tasks import run_local, run_task
from lepton_ai.consensus.messages import KIND_COMMANDS
from lepton_ai.sim.cluster import SimCluster
from lepton_ai.sim.fuzz import seeds_from_env

TICK_S = 0.01  # world seconds per Paxos tick
NODE_ROUNDS = 1024  # epoch = ballot round * this + node id (as node.replicated)


class _NoRunner:
    def submit_plan(self, plan: bytes, options: JobOptions) -> str:
        raise AssertionError("the simulation submits plans itself")


def _plans() -> dict[str, bytes]:
    task = DistributedTask(_NoRunner())
    words = [f"w{(i * 7919) % 41}" for i in range(400)]
    wordcount = (
        task.parallelize(words, partitions=6)
        .map(lambda w: (w, 1))
        .reduce_by_key(operator.add, partitions=3)
    )
    return {
        "wordcount": wordcount.plan_bytes("collect"),
        "sum": task.parallelize(range(600), partitions=8)
        .map(lambda x: x * 3)
        .plan_bytes("reduce", None),
    }


@dataclass
class _Worker:
    wid: str
    slots: int
    store: dict[str, bytes] = field(default_factory=dict)
    running: dict[TaskAttempt, int] = field(default_factory=dict)  # attempt -> slot
    outbox: list[SchedulerEvent] = field(default_factory=list)
    joined: int = -1  # the epoch of the scheduler it registered with


class HaWorld:
    def __init__(self, seed: int, plans: dict[str, bytes]) -> None:
        self.seed = seed
        self.rng = random.Random(seed * 31 + 7)
        self.paxos = SimCluster(3, seed, name="tests/sim/test_ha_paxos_scheduler.py")
        self.now = 0.0
        self.queue: list[tuple[float, int, Callable[[], None]]] = []
        self.counter = itertools.count()
        self.view = JobStateMachine()  # the log as every replica applies it
        self.applied_through = 0
        self.sched: Scheduler | None = None
        self.term: tuple[int, tuple[int, int]] | None = None  # (leader node, ballot)
        self.marker = b""
        self.epoch = -1
        self.plans = {name: decode_plan(p) for name, p in plans.items()}
        self.accepted: dict[tuple[str, int, int], int] = {}
        self.trace: list[str] = []
        self.leaderships = 0
        self.workers = {f"w{i}": _Worker(f"w{i}", 2) for i in range(2)}
        for i, (name, plan) in enumerate(plans.items()):
            cmd = JobSubmitted(name, plan, JobOptions(max_retries=8), submitted_at=0.0)
            self.at(0.05 + 0.01 * i, lambda c=cmd: self.paxos.submit(encode_command(c)))

    # -- plumbing ---------------------------------------------------------------
    def at(self, delay: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self.queue, (self.now + delay, next(self.counter), fn))

    def feed(self, event: SchedulerEvent) -> None:
        if self.sched is None:
            return
        for action in self.sched.step(event):
            if isinstance(action, Dispatch):
                self.dispatch(action)
            elif isinstance(action, Propose):
                leader = self.term[0] if self.term else None
                self.paxos.submit(encode_command(action.command), node=leader)
            elif isinstance(action, Cancel):
                self.cancel(action.attempt, action.worker)

    # -- the log and leadership -------------------------------------------------
    def pump(self) -> None:
        """One Paxos tick, then apply what was chosen and follow leadership."""
        self.paxos.run(1)
        self.follow_leader()
        chosen = self.paxos.checker.chosen
        while self.applied_through + 1 in chosen:
            self.applied_through += 1
            value = chosen[self.applied_through]
            if value.kind != KIND_COMMANDS:
                continue
            for raw in value.commands:
                self.apply(raw)
        if not self.done():
            self.at(TICK_S, self.pump)

    def apply(self, raw: bytes) -> None:
        if raw == self.marker and self.sched is None and self.term is not None:
            self.take_over()
            return
        try:
            cmd = decode_command(raw)
        except ValueError:
            return  # a marker of another leadership (or a test command)
        result = self.view.apply_command(cmd)
        if result.accepted and isinstance(cmd, OutputLost):
            # The scheduler declared a map output lost: the next result is a new generation.
            self.trace.append(f"{self.now:.2f} output lost {cmd.stage}/{cmd.partition}")
            self.accepted[(cmd.job_id, cmd.stage, cmd.partition)] -= 1
        if result.accepted and isinstance(cmd, TaskFinished):
            key = (cmd.job_id, cmd.stage, cmd.partition)
            self.accepted[key] = self.accepted.get(key, 0) + 1
            if self.accepted[key] != 1:
                raise AssertionError(f"result of {key} accepted twice; {self.explain()}")
        self.feed(Applied(cmd, result, self.now))

    def follow_leader(self) -> None:
        node = self.paxos.leader_node()
        term = None if node is None else (node.node_id, node.replica.promised)
        if term == self.term:
            return
        self.term = term
        if self.sched is not None:
            self.trace.append(f"{self.now:.2f} step down epoch {self.epoch}")
        self.sched = None  # stop at once: another replica orders commands now
        if term is not None:
            ballot = term[1]
            self.epoch = ballot[0] * NODE_ROUNDS + ballot[1]
            # Unique per call: the same term can be seen again after a gap.
            self.marker = b"leader-%d-%d" % (self.epoch, next(self.counter))
            self.paxos.submit(self.marker, node=term[0])

    def take_over(self) -> None:
        self.leaderships += 1
        self.trace.append(f"{self.now:.2f} lead epoch {self.epoch}")
        config = SchedulerConfig(failover_grace_s=0.3)
        self.sched = Scheduler.from_state(
            self.view.state, self.now, epoch=self.epoch, config=config
        )
        epoch = self.epoch
        for w in self.workers.values():
            self.at(self.rng.uniform(0.0, 0.1), lambda ww=w: self.rejoin(ww, epoch))

    def rejoin(self, w: _Worker, epoch: int) -> None:
        if self.sched is None or self.epoch != epoch:
            return
        w.joined = epoch
        running = [RunningReport(a, s) for a, s in w.running.items()]
        self.feed(WorkerJoined(w.wid, f"addr-{w.wid}", w.slots, self.now, running))
        todo, w.outbox = w.outbox, []
        for event in todo:
            self.feed(event)

    # -- workers ----------------------------------------------------------------
    def dispatch(self, d: Dispatch) -> None:
        w = self.workers[d.worker]
        if d.slot in w.running.values() or not 0 <= d.slot < w.slots:
            raise AssertionError(f"slot {d.slot} of {w.wid} given twice; {self.explain()}")
        w.running[d.attempt] = d.slot
        self.at(self.rng.uniform(0.05, 0.3), lambda: self.finish(w, d))

    def cancel(self, attempt: TaskAttempt, worker: str) -> None:
        w = self.workers[worker]
        if w.running.pop(attempt, None) is not None:
            self.report(w, TaskFailed(attempt, w.wid, "cancelled", self.now))

    def report(self, w: _Worker, event: SchedulerEvent) -> None:
        if self.sched is None or w.joined != self.epoch:
            w.outbox.append(event)  # no leader to tell yet: sent after re-registering
        else:
            self.feed(event)

    def finish(self, w: _Worker, d: Dispatch) -> None:
        if w.running.pop(d.attempt, None) is None:
            return  # cancelled
        a = d.attempt
        inputs = [w_store for w_store in self.fetch(d)]
        out = run_task(self.plans[a.job_id], a.stage, a.partition, inputs)
        if out.result is not None:
            refs = [OutputRef(w.wid, "", len(out.result), out.result)]
        else:
            refs = []
            for i, bucket in enumerate(out.buckets or []):
                block = f"{a.job_id}/{a.stage}/{a.partition}/{a.epoch}.{a.attempt}/{i}"
                if bucket:
                    w.store[block] = bucket
                refs.append(OutputRef(w.wid, block if bucket else "", len(bucket)))
        self.report(w, TaskSucceeded(a, w.wid, refs, self.now))

    def fetch(self, d: Dispatch) -> list[bytes]:
        out: list[bytes] = []
        for ref in d.inputs:
            out.append(b"" if ref.size_bytes == 0 else self.workers[ref.worker].store[ref.block])
        return out

    # -- faults -----------------------------------------------------------------
    def crash_leader(self) -> None:
        node = self.paxos.leader_node()
        if node is None:
            return
        self.trace.append(f"{self.now:.2f} crash node {node.node_id}")
        self.paxos.crash(node.node_id)
        nid = node.node_id
        self.at(self.rng.uniform(0.3, 1.5), lambda: self.paxos.restart(nid))

    def partition_leader(self) -> None:
        node = self.paxos.leader_node()
        if node is None:
            return
        self.trace.append(f"{self.now:.2f} isolate node {node.node_id}")
        self.paxos.disconnect(node.node_id)
        nid = node.node_id
        self.at(self.rng.uniform(0.3, 1.5), lambda: self.paxos.connect(nid))

    def tick(self) -> None:
        self.feed(Tick(self.now))
        if not self.done():
            self.at(0.1, self.tick)

    def done(self) -> bool:
        jobs = self.view.state.jobs
        return len(jobs) == len(self.plans) and all(j.status != "running" for j in jobs.values())

    def run(self, horizon_s: float = 120.0) -> None:
        for _ in range(self.rng.randint(1, 3)):
            fault = self.rng.choice([self.crash_leader, self.partition_leader])
            self.at(self.rng.uniform(0.15, 1.5), fault)
        self.at(0.0, self.pump)
        self.at(0.1, self.tick)
        while self.queue and not self.done():
            t, _, fn = heapq.heappop(self.queue)
            if t > horizon_s:
                break
            self.now = t
            fn()

    def explain(self) -> str:
        return f"seed={self.seed} (replay: LEPTON_SIM_SEED={self.seed}) trace={self.trace}"


def _normalise(value: Any) -> Any:
    return sorted(value) if isinstance(value, list) else value


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", seeds_from_env(range(24)))
def test_jobs_on_paxos_survive_leader_crashes_and_partitions(seed: int) -> None:
    world = HaWorld(seed, _plans())
    world.run()
    assert world.done(), f"jobs did not finish; {world.explain()}"
    for name, plan in world.plans.items():
        record = world.view.job(name)
        assert record is not None and record.status == "finished", world.explain()
        assert _normalise(record.result()) == _normalise(run_local(plan)), world.explain()
        for s, stage in enumerate(plan.stages):
            for p in range(stage.num_partitions):
                assert world.accepted.get((name, s, p)) == 1, world.explain()
    assert world.leaderships >= 1


def test_the_simulation_changes_leaders() -> None:
    """Across the seeds, leadership moves mid-job (the faults are not no-ops)."""
    changed = 0
    for seed in seeds_from_env(range(24))[:12]:
        world = HaWorld(seed, _plans())
        world.run()
        changed += world.leaderships > 1
    assert changed >= 3
