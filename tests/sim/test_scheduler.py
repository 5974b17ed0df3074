"""Seeded simulation of the scheduler core with the job state machine and real task code.

A discrete-event world drives ``Scheduler`` exactly as the coordinator does:
proposals go through a "log" (applied to a ``JobStateMachine`` after a random
delay, fed back as ``Applied``), dispatched attempts run the real ``run_task``
on simulated workers with block stores, and faults are injected from the seed:
executor deaths, worker-node deaths (detected later, replaced by a new worker),
lost or corrupt shuffle blocks, duplicated reports, stragglers, and coordinator
failovers (the scheduler is thrown away and rebuilt with ``Scheduler.from_state``;
in-flight proposals may be lost). As on a real node, a worker advertises
``executors x depth`` scheduler slots and each executor runs its attempts one at
a time, in order; the scheduler's work stealing (``Cancel(queued_only=True)``)
takes back only attempts that have not started.

Checked for every seed: each job's result equals the serial reference
(``run_local``), no task result is accepted twice (per output generation), a
slot never runs two attempts, and a user exception fails the job with the
right stage and partition. ``LEPTON_SIM_SEEDS=200`` (or ``=5000-5100``) runs more.
"""

from __future__ import annotations

import heapq
import itertools
import operator
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from lepton_ai.compute.api import DistributedTask
from lepton_ai.compute.job_state import (
    JobCommand,
    JobStateMachine,
    JobSubmitted,
    OutputLost,
    OutputRef,
    TaskFinished,
)
from lepton_ai.compute.plan import JobOptions, decode_plan
from lepton_ai.compute.run_task import CorruptInput, UserCodeError, run_local, run_task
from lepton_ai.compute.scheduler import Scheduler
from lepton_ai.compute.scheduler_events import (
    Applied,
    Cancel,
    Dispatch,
    FetchFailed,
    Propose,
    RunningReport,
    SchedulerConfig,
    SchedulerEvent,
    TaskAttempt,
    TaskFailed,
    TaskStarted,
    TaskSucceeded,
    Tick,
    WorkerJoined,
    WorkerLost,
)
from lepton_ai.monitor.phi import PhiAccrualDetector
from lepton_ai.sim.fuzz import seeds_from_env


class _NoRunner:
    def submit_plan(self, plan: bytes, options: JobOptions) -> str:
        raise AssertionError("the simulation submits plans itself")


def _explode_on_partition_3(x: int) -> int:
    if 3000 <= x < 3010:
        raise ZeroDivisionError("boom in user code")
    return x


def _plans() -> dict[str, bytes]:
    task = DistributedTask(_NoRunner())
    words = [f"w{(i * 7919) % 53}" for i in range(600)]
    src = task.parallelize(words, partitions=6)
    wordcount = src.map(lambda w: (w, 1)).reduce_by_key(operator.add, partitions=4)
    two_shuffles = (
        task.parallelize(range(500), partitions=5)
        .map(lambda x: (x % 17, x))
        .reduce_by_key(operator.add, partitions=3)
        .map(lambda kv: (kv[1] % 4, kv[0]))
        .group_by_key(partitions=3)
        .map(lambda kv: (kv[0], sorted(kv[1])))
    )
    return {
        "wordcount": wordcount.plan_bytes("collect"),
        "two_shuffles": two_shuffles.plan_bytes("collect"),
        "sum": task.parallelize(range(1000), partitions=8)
        .map(lambda x: x * x)
        .plan_bytes("reduce", None),
        "count": src.filter(lambda w: w.endswith("1")).plan_bytes("count"),
    }


def _user_error_plan() -> bytes:
    task = DistributedTask(_NoRunner())
    ds = task.parallelize(range(8000), partitions=8).map(_explode_on_partition_3)
    return ds.map(lambda x: (x % 3, 1)).reduce_by_key(operator.add).plan_bytes("collect")


def _normalise(value: Any) -> Any:
    return sorted(value) if isinstance(value, list) else value


@dataclass
class _Attempt:
    attempt: TaskAttempt
    slot: int
    dispatch: Dispatch
    killed: bool = False
    started: bool = False


@dataclass
class _Worker:
    wid: str
    executors: int
    depth: int  # scheduler slots per executor: attempts wait in the executor's lane
    alive: bool = True
    paused_until: float = 0.0  # SIGSTOPped (whole node) until then
    declared_lost: bool = False  # by the phi detector; a paused one may still report
    store: dict[str, bytes] = field(default_factory=dict)
    running: dict[TaskAttempt, _Attempt] = field(default_factory=dict)  # queued or started
    lanes: list[deque[_Attempt]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.lanes = [deque() for _ in range(self.executors)]

    @property
    def slots(self) -> int:
        return self.executors * self.depth


class World:
    """The simulated cluster around one scheduler; everything random comes from ``rng``."""

    def __init__(
        self,
        seed: int,
        plans: dict[str, bytes],
        options: JobOptions,
        config: SchedulerConfig | None = None,
        depth: int | None = None,
        *,
        hangs: dict[tuple[str, int, int], int] | None = None,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.now = 0.0
        self.queue: list[tuple[float, int, Callable[[], None]]] = []
        self.counter = itertools.count()
        self.machine = JobStateMachine()
        self.epoch = 1
        self.sched = Scheduler(config or SchedulerConfig(failover_grace_s=0.3), epoch=self.epoch)
        self.workers: dict[str, _Worker] = {}
        self.worker_seq = itertools.count()
        self.plans = {name: decode_plan(p) for name, p in plans.items()}
        self.accepted: dict[tuple[str, int, int], int] = {}
        self.trace: list[str] = []
        self.phi = PhiAccrualDetector()
        self.killed_at: dict[str, float] = {}
        self.detection_s: list[float] = []
        self.depth = self.rng.choice([1, 2, 8]) if depth is None else depth
        # (job, stage, partition) -> how many of its next attempts to start hang for ever
        self.hangs = dict(hangs or {})
        self.stats = {
            "stolen": 0,
            "steal_refused": 0,
            "speculative": 0,
            "fetch_failed": 0,
            "output_lost": 0,
            "infra": 0,
            "paused_node_declared_lost": 0,
        }
        for _ in range(3):
            self.add_worker()
        for i, (name, plan) in enumerate(plans.items()):
            cmd = JobSubmitted(name, plan, options, submitted_at=0.0)
            self.at(0.01 * i, lambda c=cmd: self.propose(c))
        self.at(0.1, self.tick)

    # -- plumbing
    def at(self, delay: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self.queue, (self.now + delay, next(self.counter), fn))

    def feed(self, event: SchedulerEvent) -> None:
        for action in self.sched.step(event):
            if isinstance(action, Dispatch):
                self.dispatch(action)
            elif isinstance(action, Propose):
                self.propose(action.command)
            elif isinstance(action, Cancel):
                self.cancel(action.attempt, action.worker, action.queued_only)

    def propose(self, cmd: JobCommand) -> None:
        epoch = self.epoch

        def commit() -> None:
            deposed = epoch != self.epoch and not isinstance(cmd, JobSubmitted)
            if deposed and self.rng.random() < 0.5:
                return  # proposal of a deposed leader lost (a client re-submits its own)
            result = self.machine.apply_command(cmd)
            self.audit(cmd, result.accepted)
            self.feed(Applied(cmd, result, self.now))

        slow = self.rng.random() < 0.05  # a slow quorum round now and then
        self.at(self.rng.uniform(0.001, 0.03) + (0.3 if slow else 0.0), commit)

    def audit(self, cmd: JobCommand, accepted: bool) -> None:
        if not accepted:
            return
        if isinstance(cmd, TaskFinished):
            key = (cmd.job_id, cmd.stage, cmd.partition)
            self.accepted[key] = self.accepted.get(key, 0) + 1
            if self.accepted[key] != 1:
                raise AssertionError(f"result of {key} accepted twice")
        elif isinstance(cmd, OutputLost):
            self.stats["output_lost"] += 1
            key = (cmd.job_id, cmd.stage, cmd.partition)
            self.accepted[key] -= 1  # the next accepted result is a new generation

    # -- workers
    def add_worker(self) -> None:
        w = _Worker(f"w{next(self.worker_seq)}", self.rng.choice([1, 2, 3]), self.depth)
        self.workers[w.wid] = w
        self.feed(WorkerJoined(w.wid, f"addr-{w.wid}", w.slots, self.now, [], w.executors))
        self.beat(w)

    def beat(self, w: _Worker) -> None:
        """The agent's heartbeat every ~100 ms; none while paused, dead or declared lost."""
        if not w.alive or w.declared_lost:
            return
        if self.now >= w.paused_until:
            self.phi.heartbeat(w.wid, self.now)
        self.at(0.1 + self.rng.uniform(-0.02, 0.02), lambda: self.beat(w))

    def detect(self) -> None:
        """The coordinator's failure detector, as on every tick."""
        for wid in self.phi.suspects(self.now):
            w = self.workers[wid]
            self.phi.remove(wid)
            w.declared_lost = True
            if wid in self.killed_at:
                self.detection_s.append(self.now - self.killed_at[wid])
            self.trace.append(f"{self.now:.2f} detect {wid}")
            self.feed(WorkerLost(wid, self.now))
            if w.alive:  # a paused node: replaced; its late reports still arrive
                self.stats["paused_node_declared_lost"] += 1
                self.at(0.1, self.add_worker)

    def dispatch(self, d: Dispatch) -> None:
        w = self.workers[d.worker]
        if not w.alive:
            return  # sent to a dead node: the failure detector will report it
        if any(a.slot == d.slot for a in w.running.values()) or not 0 <= d.slot < w.slots:
            raise AssertionError(f"slot {d.slot} of {w.wid} given twice or out of range")
        self.stats["speculative"] += d.speculative
        run = _Attempt(d.attempt, d.slot, d)
        w.running[d.attempt] = run
        lane = w.lanes[d.slot % w.executors]
        lane.append(run)
        if len(lane) == 1:
            self.start(w, run)

    def start(self, w: _Worker, run: _Attempt, queued: bool = False) -> None:
        """``run`` reached the head of its executor's lane: it runs now."""
        run.started = True
        a = run.attempt
        if queued:  # as the real agent does: queueing must not look like running
            self.at(0.002, lambda: self.report(w, TaskStarted(a, w.wid, self.now)))
        key = (a.job_id, a.stage, a.partition)
        if self.hangs.get(key, 0) > 0:
            self.hangs[key] -= 1
            self.stats["hung"] = self.stats.get("hung", 0) + 1
            self.trace.append(f"{self.now:.2f} hang {key}")
            return  # sleeps for ever: only a Cancel (the executor killed) ends it
        r = self.rng.random()
        duration = self.rng.uniform(0.02, 0.2) * (10 if r < 0.06 else 1)
        if r > 0.94:  # the executor process dies mid-task
            self.at(duration / 2, lambda: self.finish(w, run, run.dispatch, crash=True))
        else:
            self.at(duration, lambda: self.finish(w, run, run.dispatch, crash=False))

    def leave_lane(self, w: _Worker, run: _Attempt) -> None:
        lane = w.lanes[run.slot % w.executors]
        was_head = bool(lane) and lane[0] is run
        lane.remove(run)
        if was_head and lane and w.alive:
            self.start(w, lane[0], queued=True)

    def cancel(self, attempt: TaskAttempt, worker: str, queued_only: bool) -> None:
        w = self.workers[worker]
        run = w.running.get(attempt)
        if run is None or not w.alive:
            return
        if queued_only:
            if run.started:
                self.stats["steal_refused"] += 1
                return  # already running: the agent lets it finish
            self.stats["stolen"] += 1
        run.killed = True
        del w.running[attempt]
        self.leave_lane(w, run)
        self.at(0.005, lambda: self.report(w, TaskFailed(attempt, w.wid, "cancelled", self.now)))

    def report(self, w: _Worker, event: SchedulerEvent) -> None:
        if not w.alive:
            return
        if self.now < w.paused_until:  # frozen: the report leaves when the node resumes
            self.at(w.paused_until - self.now, lambda: self.report(w, event))
            return
        self.feed(event)

    def finish(self, w: _Worker, run: _Attempt, d: Dispatch, crash: bool) -> None:
        if not w.alive or run.killed:
            return
        if self.now < w.paused_until:
            self.at(w.paused_until - self.now, lambda: self.finish(w, run, d, crash))
            return
        del w.running[run.attempt]
        self.leave_lane(w, run)
        a = run.attempt
        if crash:
            self.stats["infra"] += 1
            self.report(w, TaskFailed(a, w.wid, "infra", self.now, "executor died"))
            return
        inputs: list[bytes] = []
        for m, ref in enumerate(d.inputs):
            src = self.workers.get(ref.worker)
            if ref.size_bytes == 0:
                inputs.append(b"")
            elif src is None or not src.alive or ref.block not in src.store:
                self.stats["fetch_failed"] += 1
                self.report(w, FetchFailed(a, w.wid, a.stage - 1, m, ref.worker, self.now))
                return
            else:
                inputs.append(src.store[ref.block])
        report = self.execute(w, a, inputs, d.inputs)
        self.report(w, report)
        if self.rng.random() < 0.05:  # the network delivers the report twice
            self.at(self.rng.uniform(0.0, 0.3), lambda: self.report(w, report))

    def execute(
        self, w: _Worker, a: TaskAttempt, inputs: list[bytes], refs: list[OutputRef]
    ) -> SchedulerEvent:
        try:
            out = run_task(self.plans[a.job_id], a.stage, a.partition, inputs)
        except UserCodeError as exc:
            return TaskFailed(a, w.wid, "user", self.now, exc.message, exc.exc_type, exc.traceback)
        except CorruptInput as exc:
            src = refs[exc.map_partition].worker
            return FetchFailed(a, w.wid, a.stage - 1, exc.map_partition, src, self.now)
        if out.result is not None:
            return TaskSucceeded(
                a, w.wid, [OutputRef(w.wid, "", len(out.result), out.result)], self.now
            )
        refs = []
        for i, bucket in enumerate(out.buckets or []):
            block = f"{a.job_id}/{a.stage}/{a.partition}/{a.epoch}.{a.attempt}/{i}"
            if bucket:
                w.store[block] = bucket
            refs.append(OutputRef(w.wid, block if bucket else "", len(bucket)))
        return TaskSucceeded(a, w.wid, refs, self.now)

    # -- faults
    def kill_worker(self) -> None:
        alive = [w for w in self.workers.values() if w.alive]
        if len(alive) < 2:
            return
        w = self.rng.choice(alive)
        w.alive = False
        w.running.clear()
        for lane in w.lanes:
            lane.clear()
        self.killed_at[w.wid] = self.now
        self.trace.append(f"{self.now:.2f} kill {w.wid}")
        self.at(self.rng.uniform(0.2, 2.0), self.add_worker)

    def pause_worker(self) -> None:
        """SIGSTOP a whole node for a while: a hang, not a crash."""
        alive = [w for w in self.workers.values() if w.alive and not w.declared_lost]
        if len(alive) < 2:
            return
        w = self.rng.choice(alive)
        w.paused_until = self.now + self.rng.uniform(0.3, 4.0)
        self.trace.append(f"{self.now:.2f} pause {w.wid} until {w.paused_until:.2f}")

    def lose_block(self) -> None:
        stores = [w for w in self.workers.values() if w.alive and w.store]
        if stores:
            w = self.rng.choice(stores)
            block = self.rng.choice(sorted(w.store))
            if self.rng.random() < 0.5:
                del w.store[block]
                self.trace.append(f"{self.now:.2f} lose {block}")
            else:  # bit rot that got past the checksum: the reader cannot decode it
                w.store[block] = b"M\xc1garbage"
                self.trace.append(f"{self.now:.2f} corrupt {block}")

    def failover(self) -> None:
        self.epoch += 1
        self.trace.append(f"{self.now:.2f} failover to epoch {self.epoch}")
        state = self.machine.state
        self.sched = Scheduler.from_state(
            state, self.now, epoch=self.epoch, config=self.sched.config
        )
        for w in self.workers.values():
            if w.alive:
                self.at(self.rng.uniform(0.0, 0.2), lambda ww=w: self.rejoin(ww))

    def rejoin(self, w: _Worker) -> None:
        """A worker re-registers with the new leader, listing what it runs right now."""
        if w.declared_lost:
            return  # the real coordinator refuses a lost incarnation
        if self.now < w.paused_until:
            self.at(w.paused_until - self.now, lambda: self.rejoin(w))
            return
        running = [RunningReport(r.attempt, r.slot) for r in w.running.values()]
        joined = WorkerJoined(w.wid, f"addr-{w.wid}", w.slots, self.now, running, w.executors)
        self.report(w, joined)

    def tick(self) -> None:
        self.detect()
        self.feed(Tick(self.now))
        if not self.done():
            self.at(0.1, self.tick)

    def done(self) -> bool:
        jobs = self.machine.state.jobs
        return len(jobs) == len(self.plans) and all(j.status != "running" for j in jobs.values())

    def run(self, faults: bool, horizon_s: float = 600.0) -> None:
        if faults:
            for _ in range(self.rng.randint(0, 2)):
                self.at(self.rng.uniform(0.1, 3.0), self.kill_worker)
            for _ in range(self.rng.randint(0, 3)):
                self.at(self.rng.uniform(0.1, 3.0), self.lose_block)
            for _ in range(self.rng.choice([0, 0, 1])):
                self.at(self.rng.uniform(0.1, 3.0), self.pause_worker)
            for _ in range(self.rng.choice([0, 0, 1, 2])):
                self.at(self.rng.uniform(0.1, 3.0), self.failover)
        while self.queue and not self.done():
            t, _, fn = heapq.heappop(self.queue)
            if t > horizon_s:
                break
            self.now = t
            fn()


def _explain(world: World) -> str:
    return f"seed={world.seed} (replay: LEPTON_SIM_SEED={world.seed}) trace={world.trace}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", seeds_from_env(range(64)))
def test_jobs_survive_faults_with_exact_results(seed: int) -> None:
    plans = _plans()
    world = World(seed, plans, JobOptions(max_retries=8))
    world.run(faults=True)
    assert world.done(), f"jobs did not finish; {_explain(world)}"
    for name, plan in world.plans.items():
        record = world.machine.job(name)
        assert record is not None and record.status == "finished", (
            f"{name}: {record.status if record else None} {record.error if record else ''}; "
            f"{_explain(world)}"
        )
        got = _normalise(record.result())
        want = _normalise(run_local(plan))
        assert got == want, f"{name}: wrong result; {_explain(world)}"
        for p in range(plan.result_stage.num_partitions):
            assert world.accepted[(name, len(plan.stages) - 1, p)] == 1
    # phi accrual with default settings at a 100 ms heartbeat: a dead node within 2 s
    assert all(d <= 2.0 for d in world.detection_s), (world.detection_s, _explain(world))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", seeds_from_env(range(64))[:8])
def test_user_exception_fails_job_with_stage_and_partition(seed: int) -> None:
    world = World(seed, {"bad": _user_error_plan()}, JobOptions())
    world.run(faults=True)
    record = world.machine.job("bad")
    assert record is not None and record.status == "failed", _explain(world)
    err = record.error
    assert err is not None and err.kind == "user", _explain(world)
    assert (err.stage, err.partition) == (0, 3)
    assert "ZeroDivisionError" in err.traceback and "boom in user code" in err.message
    exc = err.to_exception()
    assert "partition 3" in str(exc) and "boom in user code" in str(exc)


def test_retry_exceptions_exhausts_retries_then_fails() -> None:
    world = World(7, {"bad": _user_error_plan()}, JobOptions(max_retries=2, retry_exceptions=True))
    world.run(faults=False)
    record = world.machine.job("bad")
    assert record is not None and record.status == "failed"
    assert record.error is not None and "max_retries=2" in record.error.message


def test_fault_free_run_finishes_and_plans_are_deterministic() -> None:
    plans = _plans()
    a = World(1, plans, JobOptions())
    a.run(faults=False)
    b = World(1, plans, JobOptions())
    b.run(faults=False)
    assert a.done() and b.done() and a.now == b.now
    for name in plans:
        ra, rb = a.machine.job(name), b.machine.job(name)
        assert ra is not None and rb is not None
        assert ra.result() == rb.result()


def test_the_simulation_exercises_every_fault() -> None:
    totals: dict[str, int] = {}
    failovers = 0
    for seed in range(24):
        world = World(seed, _plans(), JobOptions(max_retries=8))
        world.run(faults=True)
        assert world.done(), _explain(world)
        failovers += any("failover" in t for t in world.trace)
        for k, v in world.stats.items():
            totals[k] = totals.get(k, 0) + v
    assert failovers > 0 and all(v > 0 for v in totals.values()), (failovers, totals)


def _one_task_plan() -> bytes:
    """A job whose middle stage is a single task: no stage median, so no speculation."""
    task = DistributedTask(_NoRunner())
    ds = task.parallelize(range(300), partitions=4).map(lambda x: (x % 7, x))
    return ds.reduce_by_key(operator.add, partitions=1).map(lambda kv: kv).plan_bytes("collect")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", seeds_from_env(range(64))[:16])
def test_a_hung_single_task_is_timed_out_and_retried_under_faults(seed: int) -> None:
    plans = {"one": _one_task_plan(), **_plans()}
    hangs = {("one", 1, 0): 1, ("wordcount", 0, 2): 1}
    world = World(seed, plans, JobOptions(max_retries=8, task_timeout_s=5.0), hangs=hangs)
    world.run(faults=True)
    assert world.done(), f"jobs did not finish; {_explain(world)}"
    for name, plan in world.plans.items():
        record = world.machine.job(name)
        assert record is not None and record.status == "finished", (
            f"{name}: {record.error if record else None}; {_explain(world)}"
        )
        assert _normalise(record.result()) == _normalise(run_local(plan)), _explain(world)
    assert world.hangs == {("one", 1, 0): 0, ("wordcount", 0, 2): 0}, _explain(world)


@pytest.mark.parametrize("seed", seeds_from_env(range(64))[:4])
def test_a_task_that_always_hangs_fails_its_job_naming_the_timeout(seed: int) -> None:
    plans = {"one": _one_task_plan()}
    options = JobOptions(max_retries=2, task_timeout_s=1.0)
    world = World(seed, plans, options, hangs={("one", 1, 0): 10**6})
    world.run(faults=False)
    record = world.machine.job("one")
    assert record is not None and record.status == "failed", _explain(world)
    assert record.error is not None and (record.error.stage, record.error.partition) == (1, 0)
    assert "task_timeout_s=1" in record.error.message, record.error
    assert world.now < 10.0, _explain(world)  # three ~1 s attempts, not the 600 s horizon
