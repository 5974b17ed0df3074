"""Simulated scale: how the scheduler core and the Paxos core scale (issue 13, item 6).

    .venv/bin/python benchmarks/sim_scale_bench.py           # full: sweeps, medians of 3
    .venv/bin/python benchmarks/sim_scale_bench.py --quick   # small sizes, one run each

No processes and no network: the sans-I/O cores are driven by seeded discrete-event
worlds, the way their real drivers drive them, and only the time spent inside the
cores' own calls is counted.

* Scheduler: ``Scheduler.step`` fed as the coordinator feeds it. Simulated worker
  nodes (``executors`` x ``pipeline_depth`` slots each, attempts waiting in line per
  executor, ``Cancel`` honoured), task durations drawn per attempt with a straggler
  fraction (so speculation runs), a log that applies each ``Propose`` to a
  ``JobStateMachine`` a few ms later and feeds ``Applied`` back, ``Tick`` every 100 ms,
  and nodes killed mid-run (``WorkerLost`` after a detection delay, a replacement
  joining under a new id), so retries and rescheduling run. Time: CPU time
  (``time.process_time``) around each ``step`` call only, minus the clock's own cost.
  Checked per run: every job finished, every result task accepted exactly once and no
  task accepted twice per output generation, no scheduler slot given twice.
* Paxos: ``sim.SimCluster`` (real ``Replica`` cores, simulated network delays and
  fdatasync) with a closed-loop client keeping ``concurrency`` commands outstanding,
  with batching (the default core: commands proposed in the same loop pass share a
  slot, as the driver proposes its queue) and without (``batch_commands_max=1``: a
  slot per command), optionally with followers crashed. Time: wall time
  (``perf_counter``, ~0.1 us per call, where ``process_time`` costs ~1 us) around every
  call into each replica's core (step, tick, propose, has_ready, ready, advance,
  compaction), minus the calibrated cost of the timing wrapper. The simulator's safety
  checker runs at every step; afterwards every replica must hold the same log (same
  hash chain at the same slot) and every command must be chosen exactly once.

Results: a table on stdout and ``benchmarks/results/sim_scale.json``
(``--out`` to write elsewhere); docs/benchmarks-scale.md discusses them.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import heapq
import io
import itertools
import json
import platform
import pstats
import random
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from lepton_ai.compute.job_state import (
    JobCommand,
    JobStateConfig,
    JobStateMachine,
    JobSubmitted,
    OutputLost,
    OutputRef,
    TaskFinished,
)
from lepton_ai.compute.plan import (
    JobOptions,
    JobPlan,
    ResultSpec,
    ShuffleRead,
    ShuffleWrite,
    StageSpec,
    encode_plan,
)
from lepton_ai.compute.scheduler import Scheduler
from lepton_ai.compute.scheduler_events import (
    Applied,
    Cancel,
    Dispatch,
    FetchFailed,
    Propose,
    SchedulerAction,
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
from lepton_ai.consensus.core import Replica
from lepton_ai.data.sources import RangeSource
from lepton_ai.sim.cluster import UNIT, SimCluster

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "sim_scale.json"

TICK_S = 0.1  # the coordinator's scheduler Tick period
COMMIT_S = (0.001, 0.004)  # a Propose is applied this long after (a LAN Paxos round)
REPORT_S = 0.001  # worker -> coordinator report latency
TASK_S = (0.05, 0.15)  # an attempt's running time (uniform), before straggling
STRAGGLER_X = 8.0  # a straggling attempt runs this many times longer
DUPLICATE_P = 0.01  # the network delivers a success report twice
DETECT_S = 1.0  # a killed node is declared lost this long after (phi accrual)
REPLACE_S = 1.5  # ...and a new node (a new worker id) joins this long after
REDUCERS = 100  # reduce partitions of the single-job sweeps: maps x 100 shuffle blocks
HORIZON_X = 20.0  # give up at this many times the ideal simulated makespan


# ====================================================================== scheduler world


@dataclass(frozen=True)
class JobShape:
    """One job: ``maps`` map tasks, then ``reducers`` reduce tasks (0: map-only job)."""

    maps: int
    reducers: int

    @property
    def tasks(self) -> int:
        return self.maps + self.reducers


@dataclass(frozen=True)
class SchedSpec:
    name: str
    nodes: int
    jobs: tuple[JobShape, ...]
    executors: int = 4  # executor processes per node
    depth: int = 2  # scheduler slots per executor (the agent's pipeline_depth)
    straggler_frac: float = 0.05
    node_failures: int = 2
    arrivals_s: float = 0.0  # jobs are submitted evenly over this long
    seed: int = 1

    @property
    def tasks(self) -> int:
        return sum(j.tasks for j in self.jobs)

    def ideal_makespan_s(self) -> float:
        """Simulated seconds if every executor were busy all the time."""
        mean = (TASK_S[0] + TASK_S[1]) / 2 * (1 + self.straggler_frac * (STRAGGLER_X - 1))
        return self.tasks * mean / (self.nodes * self.executors) + self.arrivals_s


def single_job(name: str, nodes: int, tasks: int, seed: int = 1) -> SchedSpec:
    """One map stage plus a shuffle into ``REDUCERS`` reducers, ``tasks`` tasks in all."""
    reducers = min(REDUCERS, tasks // 10)
    return SchedSpec(name, nodes, (JobShape(tasks - reducers, reducers),), seed=seed)


def trivial_tasks(name: str, tasks: int, seed: int = 1) -> SchedSpec:
    """The README's "10,000 trivial tasks" shape: one map-only job on
    ``LocalCluster(workers=2)`` (one executor per node, pipeline_depth 8), no faults."""
    return SchedSpec(
        name, 2, (JobShape(tasks, 0),), executors=1, depth=8, node_failures=0, seed=seed
    )


def job_mix(name: str, nodes: int, tasks: int, seed: int = 1) -> SchedSpec:
    """Jobs of mixed shapes (a third map-only) arriving over the run, ``tasks`` in all."""
    rng = random.Random(seed * 31 + 7)
    shapes: list[JobShape] = []
    left = tasks
    while left > 0:
        maps = min(left, int(rng.uniform(10, 1_000)))
        reducers = (
            0 if rng.random() < 1 / 3 or maps == left else min(left - maps, rng.randint(2, 64))
        )
        shapes.append(JobShape(maps, reducers))
        left -= maps + reducers
    spec = SchedSpec(name, nodes, tuple(shapes), seed=seed)
    # Arrivals over half the ideal makespan: several jobs overlap, the queue never drains.
    return SchedSpec(name, nodes, spec.jobs, seed=seed, arrivals_s=spec.ideal_makespan_s() / 2)


_plans: dict[JobShape, bytes] = {}


def plan_bytes(shape: JobShape) -> bytes:
    """A plan of ``shape`` (the scheduler never runs its functions, so they are empty)."""
    if shape not in _plans:
        sources: list[Any] = [RangeSource(p, p + 1) for p in range(shape.maps)]
        if shape.reducers == 0:
            only = StageSpec(
                0, shape.maps, b"", ["map"], sources=sources, result=ResultSpec("count")
            )
            _plans[shape] = encode_plan(JobPlan([only]))
        else:
            write = ShuffleWrite(shape.reducers, "reduce")
            maps = StageSpec(0, shape.maps, b"", ["map"], sources=sources, shuffle_write=write)
            read = ShuffleRead(0, shape.maps, "reduce")
            reduce = StageSpec(
                1, shape.reducers, b"", ["reduce"], shuffle_read=read, result=ResultSpec("collect")
            )
            _plans[shape] = encode_plan(JobPlan([maps, reduce]))
    return _plans[shape]


@dataclass(eq=False)
class SimAttempt:
    dispatch: Dispatch
    started: bool = False
    killed: bool = False


@dataclass(eq=False)
class SimNode:
    wid: str
    executors: int
    depth: int
    alive: bool = True
    running: dict[TaskAttempt, SimAttempt] = field(default_factory=dict)
    lanes: list[deque[SimAttempt]] = field(default_factory=list)
    outputs: dict[int, list[OutputRef]] = field(default_factory=dict)  # buckets -> refs

    def __post_init__(self) -> None:
        self.lanes = [deque() for _ in range(self.executors)]

    @property
    def slots(self) -> int:
        return self.executors * self.depth


@dataclass
class Meter:
    """CPU time inside ``Scheduler.step``, per event type, minus the clock's own cost."""

    clock_cost_s: float
    steps: int = 0
    cpu_s: float = 0.0
    dispatches: int = 0
    max_step_s: float = 0.0  # the longest single step: how long the coordinator's loop stalls
    by_event: dict[str, list[float]] = field(default_factory=dict)  # name -> [count, cpu_s]

    def add(self, kind: str, dt: float) -> None:
        dt = max(0.0, dt - self.clock_cost_s)
        self.steps += 1
        self.cpu_s += dt
        self.max_step_s = max(self.max_step_s, dt)
        entry = self.by_event.setdefault(kind, [0, 0.0])
        entry[0] += 1
        entry[1] += dt


def clock_cost(clock: Callable[[], float], n: int = 20_000) -> float:
    """What one ``t0 = clock(); clock() - t0`` costs, so it is not billed to the core."""
    start = time.perf_counter()
    for _ in range(n):
        t0 = clock()
        _ = clock() - t0
    return (time.perf_counter() - start) / n


class SchedWorld:
    """The simulated cluster around one ``Scheduler``; everything random comes from the seed."""

    def __init__(self, spec: SchedSpec, profiler: cProfile.Profile | None = None) -> None:
        self.spec = spec
        self.rng = random.Random(spec.seed)
        self.now = 0.0
        self.queue: list[tuple[float, int, Callable[[], None]]] = []
        self.counter = itertools.count()
        jobs_max = len(spec.jobs) + 1
        self.sched = Scheduler(SchedulerConfig(jobs_max=jobs_max), epoch=1)
        self.machine = JobStateMachine(
            JobStateConfig(finished_jobs_max=jobs_max, jobs_max=jobs_max)
        )
        self.meter = Meter(clock_cost(time.process_time))
        self.apply_cpu_s = 0.0
        self.profiler = profiler
        self.nodes: dict[str, SimNode] = {}
        self.node_seq = itertools.count()
        self.accepted: dict[tuple[str, int, int], int] = {}
        self.lost: set[str] = set()  # declared lost by the failure detector
        self.bad_outputs: set[tuple[str, str, int]] = set()  # (job, worker, map) failed once
        self.stats = dict.fromkeys(
            ("speculative", "lost_with_node", "cancelled", "fetch_failed", "output_lost", "stolen"),
            0,
        )
        for _ in range(spec.nodes):
            self.add_node()
        gap = spec.arrivals_s / max(1, len(spec.jobs) - 1)
        for i, shape in enumerate(spec.jobs):
            cmd = JobSubmitted(f"j{i}", plan_bytes(shape), JobOptions(), submitted_at=i * gap)
            self.at(i * gap, functools.partial(self.propose, cmd))
        for k in range(spec.node_failures):
            self.at(spec.ideal_makespan_s() * (k + 1) / (spec.node_failures + 1), self.kill_node)
        self.at(TICK_S, self.tick)

    # -- plumbing -------------------------------------------------------------------

    def at(self, delay: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self.queue, (self.now + delay, next(self.counter), fn))

    def feed(self, event: SchedulerEvent) -> None:
        prof = self.profiler
        if prof is not None:
            prof.enable()
        t0 = time.process_time()
        actions = self.sched.step(event)
        dt = time.process_time() - t0
        if prof is not None:
            prof.disable()
        self.meter.add(type(event).__name__, dt)
        for action in actions:
            self.act(action)

    def act(self, action: SchedulerAction) -> None:
        if isinstance(action, Dispatch):
            self.meter.dispatches += 1
            self.dispatch(action)
        elif isinstance(action, Propose):
            self.propose(action.command)
        else:
            self.cancel(action)

    def propose(self, cmd: JobCommand) -> None:
        def commit() -> None:
            t0 = time.process_time()
            result = self.machine.apply_command(cmd)
            self.apply_cpu_s += time.process_time() - t0
            if result.accepted:
                self.audit(cmd)
            self.feed(Applied(cmd, result, self.now))

        self.at(self.rng.uniform(*COMMIT_S), commit)

    def audit(self, cmd: JobCommand) -> None:
        """No task result accepted twice per output generation (an accepted OutputLost
        starts a new generation of that map task)."""
        if isinstance(cmd, TaskFinished):
            key = (cmd.job_id, cmd.stage, cmd.partition)
            self.accepted[key] = self.accepted.get(key, 0) + 1
            if self.accepted[key] != 1:
                raise AssertionError(f"result of {key} accepted twice (seed {self.spec.seed})")
        elif isinstance(cmd, OutputLost):
            self.stats["output_lost"] += 1
            self.accepted[(cmd.job_id, cmd.stage, cmd.partition)] -= 1

    def tick(self) -> None:
        self.feed(Tick(self.now))
        if not self.done():
            self.at(TICK_S, self.tick)

    def done(self) -> bool:
        jobs = self.machine.state.jobs
        return len(jobs) == len(self.spec.jobs) and all(
            j.status != "running" for j in jobs.values()
        )

    def run(self) -> None:
        horizon = self.spec.ideal_makespan_s() * HORIZON_X + 10.0
        while self.queue and not self.done():
            t, _, fn = heapq.heappop(self.queue)
            if t > horizon:
                break
            self.now = t
            fn()

    # -- nodes ----------------------------------------------------------------------

    def add_node(self) -> None:
        node = SimNode(f"w{next(self.node_seq)}", self.spec.executors, self.spec.depth)
        self.nodes[node.wid] = node
        joined = WorkerJoined(
            node.wid, f"addr-{node.wid}", node.slots, self.now, [], node.executors
        )
        self.feed(joined)

    def kill_node(self) -> None:
        alive = [n for n in self.nodes.values() if n.alive]
        if len(alive) < 2:
            return
        node = self.rng.choice(alive)
        node.alive = False
        self.stats["lost_with_node"] += len(node.running)  # queued or running there
        node.running.clear()
        for lane in node.lanes:
            lane.clear()
        for other in self.nodes.values():  # new map outputs get their copy elsewhere
            other.outputs = {
                b: r for b, r in other.outputs.items() if node.wid not in r[0].replicas
            }
        self.at(DETECT_S, lambda: self.declare_lost(node.wid))
        self.at(REPLACE_S, self.add_node)

    def declare_lost(self, wid: str) -> None:
        self.lost.add(wid)
        self.feed(WorkerLost(wid, self.now))

    def map_outputs(self, node: SimNode, buckets: int) -> list[OutputRef]:
        """A map task's refs: one per bucket, a copy on one other node (shuffle_replicas=2).
        Cached per node: the scheduler reads only worker, replicas and size."""
        refs = node.outputs.get(buckets)
        if refs is None:
            others = [w for w, n in self.nodes.items() if n.alive and w != node.wid]
            replicas = [self.rng.choice(others)] if others else []
            refs = [OutputRef(node.wid, f"b{i}", 1_000, replicas=replicas) for i in range(buckets)]
            node.outputs[buckets] = refs
        return list(refs)

    # -- attempts -------------------------------------------------------------------

    def dispatch(self, d: Dispatch) -> None:
        node = self.nodes[d.worker]
        if not node.alive:
            return  # sent to a dead node: the failure detector reports it
        if not 0 <= d.slot < node.slots or any(
            a.dispatch.slot == d.slot for a in node.running.values()
        ):
            raise AssertionError(f"slot {d.slot} of {node.wid} given twice or out of range")
        self.stats["speculative"] += d.speculative
        attempt = SimAttempt(d)
        node.running[d.attempt] = attempt
        lane = node.lanes[d.slot % node.executors]
        lane.append(attempt)
        if len(lane) == 1:
            self.start(node, attempt, queued=False)

    def start(self, node: SimNode, run: SimAttempt, queued: bool) -> None:
        """``run`` reached the head of its executor's line: it runs now."""
        run.started = True
        a = run.dispatch.attempt
        if queued:  # the agent reports the start of an attempt that waited in line
            self.at(REPORT_S, lambda: self.report(node, TaskStarted(a, node.wid, self.now)))
        duration = self.rng.uniform(*TASK_S)
        if self.rng.random() < self.spec.straggler_frac:
            duration *= STRAGGLER_X
        self.at(duration, lambda: self.finish(node, run))

    def leave_lane(self, node: SimNode, run: SimAttempt) -> None:
        lane = node.lanes[run.dispatch.slot % node.executors]
        was_head = bool(lane) and lane[0] is run
        lane.remove(run)
        if was_head and lane:
            self.start(node, lane[0], queued=True)

    def cancel(self, c: Cancel) -> None:
        node = self.nodes[c.worker]
        run = node.running.get(c.attempt)
        if run is None or not node.alive or (c.queued_only and run.started):
            return  # a started attempt is left to finish when only its queued copy is asked
        self.stats["stolen" if c.queued_only else "cancelled"] += 1
        run.killed = True
        del node.running[c.attempt]
        self.leave_lane(node, run)
        failed = TaskFailed(c.attempt, node.wid, "cancelled", self.now)
        self.at(REPORT_S, lambda: self.report(node, failed))

    def report(self, node: SimNode, event: SchedulerEvent) -> None:
        if node.alive:
            self.feed(event)

    def finish(self, node: SimNode, run: SimAttempt) -> None:
        if not node.alive or run.killed:
            return
        del node.running[run.dispatch.attempt]
        self.leave_lane(node, run)
        event = self.outcome(node, run.dispatch)
        self.at(REPORT_S, lambda: self.report(node, event))
        if isinstance(event, TaskSucceeded) and self.rng.random() < DUPLICATE_P:
            self.at(self.rng.uniform(0.0, 0.3), lambda: self.report(node, event))

    def outcome(self, node: SimNode, d: Dispatch) -> SchedulerEvent:
        a = d.attempt
        dead = next((m for m, r in enumerate(d.inputs) if not self.nodes[r.worker].alive), None)
        if dead is not None:  # a reducer could not fetch a map output
            self.stats["fetch_failed"] += 1
            source = d.inputs[dead].worker
            # As the coordinator's control core does: a failure on a worker already
            # declared lost, or a second one on the same output, is marked stale.
            key = (a.job_id, source, dead)
            stale = source in self.lost or key in self.bad_outputs
            self.bad_outputs.add(key)
            return FetchFailed(a, node.wid, a.stage - 1, dead, source, self.now, stale)
        plan_shape = self.spec.jobs[int(a.job_id[1:])]
        last = a.stage == (0 if plan_shape.reducers == 0 else 1)
        if last:
            return TaskSucceeded(a, node.wid, [OutputRef(node.wid, "", 8, b"result")], self.now)
        return TaskSucceeded(a, node.wid, self.map_outputs(node, plan_shape.reducers), self.now)

    # -- checks ---------------------------------------------------------------------

    def check(self) -> None:
        """Every job finished and every result task was accepted exactly once."""
        hint = f"{self.spec.name} seed {self.spec.seed}"
        if not self.done():
            raise AssertionError(f"jobs did not finish by t={self.now:.1f}s ({hint})")
        for i, shape in enumerate(self.spec.jobs):
            record = self.machine.job(f"j{i}")
            if record is None or record.status != "finished":
                raise AssertionError(f"job j{i}: {record.status if record else None} ({hint})")
            last = 0 if shape.reducers == 0 else 1
            count = shape.maps if shape.reducers == 0 else shape.reducers
            for p in range(count):
                if self.accepted.get((f"j{i}", last, p)) != 1:
                    raise AssertionError(f"job j{i} result {p} not accepted exactly once ({hint})")


def sched_result(world: SchedWorld, wall_s: float) -> dict[str, Any]:
    spec, m = world.spec, world.meter
    by_event = {
        k: {"count": int(v[0]), "cpu_s": v[1], "us_each": 1e6 * v[1] / v[0]}
        for k, v in sorted(m.by_event.items())
    }
    return {
        "name": spec.name,
        "nodes": spec.nodes,
        "slots": spec.nodes * spec.executors * spec.depth,
        "jobs": len(spec.jobs),
        "tasks": spec.tasks,
        "seed": spec.seed,
        "steps": m.steps,
        "dispatches": m.dispatches,
        "core_cpu_s": m.cpu_s,
        "steps_per_s": m.steps / m.cpu_s,
        "dispatches_per_s": m.dispatches / m.cpu_s,
        "tasks_per_s": spec.tasks / m.cpu_s,
        "us_per_step": 1e6 * m.cpu_s / m.steps,
        "us_per_task": 1e6 * m.cpu_s / spec.tasks,
        "max_step_ms": 1e3 * m.max_step_s,
        # Without the longest step (the one dispatching every reducer of a big shuffle).
        "us_per_other_step": 1e6 * (m.cpu_s - m.max_step_s) / max(1, m.steps - 1),
        "state_apply_cpu_s": world.apply_cpu_s,
        "simulated_s": world.now,
        "wall_s": wall_s,
        "by_event": by_event,
        **world.stats,
    }


def run_sched(spec: SchedSpec, profiler: cProfile.Profile | None = None) -> dict[str, Any]:
    """One checked run of ``spec``; raises AssertionError if it was not correct."""
    start = time.perf_counter()
    world = SchedWorld(spec, profiler)
    world.run()
    world.check()
    return sched_result(world, time.perf_counter() - start)


def profile_sched(spec: SchedSpec, top: int = 15) -> list[dict[str, Any]]:
    """cProfile of ``Scheduler.step`` calls only: the functions with most own time."""
    prof = cProfile.Profile()
    run_sched(spec, prof)
    stats = pstats.Stats(prof, stream=io.StringIO())
    rows: list[dict[str, Any]] = []
    for (path, line, fn), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append(
            {
                "function": f"{Path(path).name}:{line}({fn})",
                "calls": ncalls,
                "tottime_s": tottime,
                "cumtime_s": cumtime,
            }
        )
    rows.sort(key=lambda r: -float(r["tottime_s"]))
    return rows[:top]


# ====================================================================== Paxos


CORE_METHODS = (
    "step",
    "tick",
    "propose",
    "read_index",
    "has_ready",
    "ready",
    "advance",
    "compaction_due",
    "compact",
)


@dataclass
class CoreTimer:
    """Wall time spent inside one replica's core calls."""

    seconds: float = 0.0
    calls: int = 0


def _timed(fn: Callable[..., Any], timer: CoreTimer) -> Callable[..., Any]:
    def wrapper(*args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            timer.seconds += time.perf_counter() - t0
            timer.calls += 1

    return wrapper


def instrument(replica: Replica) -> CoreTimer:
    """Time every call the runtime makes into ``replica`` (instance attributes shadow
    the class's methods; properties such as ``is_leader`` are not counted)."""
    timer = CoreTimer()
    for name in CORE_METHODS:
        setattr(replica, name, _timed(getattr(replica, name), timer))
    return timer


def wrapper_cost(n: int = 50_000, batches: int = 5) -> float:
    """Seconds one timed call of a no-op adds to its timer beyond the no-op itself: the
    lowest of a few batches, since a preempted batch on a shared machine only overstates
    it (and overstating it would bill the core less than it cost)."""
    costs = []
    for _ in range(batches):
        timer = CoreTimer()
        noop = _timed(lambda: None, timer)
        for _ in range(n // batches):
            noop()
        costs.append(timer.seconds / (n // batches))
    return min(costs)


PaxosMode = Literal["batched", "slot_per_command", "one_at_a_time"]
CONCURRENCY: dict[str, int] = {"batched": 256, "slot_per_command": 256, "one_at_a_time": 1}


@dataclass(frozen=True)
class PaxosSpec:
    """``batched``: the default core, a closed-loop client keeping 256 commands
    outstanding, each simulated unit's arrivals proposed in one loop pass (the driver
    proposes its whole queue per pass, so they share a slot). ``slot_per_command``: the
    same load with ``batch_commands_max=1`` and a loop pass per command (a slot each;
    slots readied together still share an Accept message). ``one_at_a_time``: one
    command outstanding, so every decision is a full round of messages."""

    replicas: int
    mode: PaxosMode
    crashed: int  # followers crashed (for good) before the measurement
    commands: int
    seed: int = 1

    @property
    def name(self) -> str:
        down = f", {self.crashed} down" if self.crashed else ""
        return f"{self.replicas} replicas, {self.mode.replace('_', ' ')}{down}"


def _drive(c: SimCluster, spec: PaxosSpec) -> list[bytes]:
    """The closed-loop client: top up to the mode's outstanding commands every unit."""
    submitted: list[bytes] = []
    concurrency = CONCURRENCY[spec.mode]
    deadline = c.now + UNIT * max(10_000, 10 * spec.commands)
    while len(c.committed) < spec.commands:
        if c.now > deadline:
            raise AssertionError(f"{spec.name}: stuck at {len(c.committed)} commits ({c.hint()})")
        outstanding = len(submitted) - len(c.committed)
        room = min(concurrency - outstanding, spec.commands - len(submitted))
        for _ in range(room):
            submitted.append(c.submit())
            if spec.mode == "slot_per_command":
                c.run(0)  # a loop pass per command: its own Ready, its own slot
        c.run(1 / UNIT)  # batched: what arrived in this unit shares the leader's next pass
    return submitted


def check_paxos(c: SimCluster, submitted: Sequence[bytes]) -> None:
    """After settling: one log everywhere, every command chosen exactly once."""
    c.settle()
    nodes = list(c.nodes.values())
    heads = {(n.sm.slot, n.sm.digest) for n in nodes}
    if len(heads) != 1:
        raise AssertionError(f"replicas disagree on the log: {sorted(heads)} ({c.hint()})")
    chosen = c.checker.command_slot  # the checker raised already if one was chosen twice
    missing = [cmd for cmd in submitted if cmd not in chosen]
    if missing:
        raise AssertionError(f"{len(missing)} commands never chosen ({c.hint()})")


def run_paxos(spec: PaxosSpec, cost: float) -> dict[str, Any]:
    """One checked run; ``cost``: the timing wrapper's own cost per call."""
    start = time.perf_counter()
    paxos: dict[str, object] = {"batch_commands_max": 1} if spec.mode == "slot_per_command" else {}
    c = SimCluster(spec.replicas, spec.seed, name="benchmarks/sim_scale_bench.py", paxos=paxos)
    leader = c.wait_leader()
    for node_id in [n for n in c.nodes if n != leader][: spec.crashed]:
        c.crash(node_id, torn=False)
    timers = {nid: instrument(n.replica) for nid, n in c.nodes.items() if n.alive}
    slot0, sent0, t0 = c.checker.max_chosen(), c.net.sent, c.now
    submitted = _drive(c, spec)
    seconds = {nid: max(0.0, t.seconds - cost * t.calls) for nid, t in timers.items()}
    slots = c.checker.max_chosen() - slot0
    messages = c.net.sent - sent0
    ticks = (c.now - t0) / UNIT
    check_paxos(c, submitted)
    leader_s = max(seconds[leader], 1e-9)  # a tiny smoke run may round to nothing
    followers = [s for nid, s in seconds.items() if nid != leader]
    total_s = sum(seconds.values())
    n = spec.commands
    return {
        "name": spec.name,
        "replicas": spec.replicas,
        "mode": spec.mode,
        "crashed": spec.crashed,
        "commands": n,
        "slots": slots,
        "commands_per_slot": n / slots,
        "simulated_ticks": ticks,
        "messages_per_command": messages / n,
        "leader_cpu_s": leader_s,
        "follower_cpu_s_mean": statistics.fmean(followers) if followers else 0.0,
        "total_cpu_s": total_s,
        "leader_commands_per_s": n / leader_s,
        "leader_us_per_command": 1e6 * leader_s / n,
        "leader_us_per_slot": 1e6 * leader_s / slots,
        "follower_us_per_command": 1e6 * statistics.fmean(followers) / n if followers else 0.0,
        "total_us_per_command": 1e6 * total_s / n,
        "core_calls": sum(t.calls for t in timers.values()),
        "leader_calls_per_command": timers[leader].calls / n,  # deterministic, unlike time
        "wall_s": time.perf_counter() - start,
    }


# ====================================================================== sweeps and output


@dataclass(frozen=True)
class Plan:
    runs: int
    node_sweep: tuple[int, ...]
    node_sweep_tasks: int
    task_sweep: tuple[int, ...]
    task_sweep_nodes: int
    mix_tasks: int
    profile_tasks: int
    paxos_commands: int
    paxos_replicas: tuple[int, ...] = (3, 5, 7)
    paxos_runs: int = 5  # short runs of wall-clock timing: more of them for the median


FULL = Plan(3, (10, 30, 100, 300), 10_000, (1_000, 10_000, 100_000), 100, 100_000, 100_000, 100_000)
QUICK = Plan(1, (10, 30), 1_000, (300, 1_000), 10, 1_000, 2_000, 1_000, paxos_runs=1)

MEDIAN_KEYS = (
    "core_cpu_s",
    "steps_per_s",
    "dispatches_per_s",
    "tasks_per_s",
    "us_per_step",
    "us_per_task",
    "max_step_ms",
    "us_per_other_step",
    "state_apply_cpu_s",
    "leader_cpu_s",
    "total_cpu_s",
    "leader_commands_per_s",
    "leader_us_per_command",
    "leader_us_per_slot",
    "follower_us_per_command",
    "total_us_per_command",
    "wall_s",
)


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The first run's counts, the median of each timing over the runs."""
    out = dict(runs[0])
    for key in MEDIAN_KEYS:
        if key in out:
            out[key] = statistics.median(r[key] for r in runs)
    out["runs"] = len(runs)
    return out


def repeat(fn: Callable[[int], dict[str, Any]], runs: int, label: str) -> dict[str, Any]:
    results = []
    for i in range(runs):
        results.append(fn(i + 1))
        print(f"  {label} run {i + 1}/{runs}: {results[-1]['wall_s']:.1f}s wall", file=sys.stderr)
    return median_of(results)


def sched_cases(plan: Plan) -> dict[str, list[Callable[[int], SchedSpec]]]:
    """The sweeps: each case builds its spec from a seed (one seed per run)."""
    p = functools.partial
    return {
        "by_nodes": [
            p(single_job, f"{n} nodes", n, plan.node_sweep_tasks) for n in plan.node_sweep
        ],
        "by_tasks": [
            p(single_job, f"{t} tasks", plan.task_sweep_nodes, t) for t in plan.task_sweep
        ],
        "job_mix": [p(job_mix, "job mix", plan.task_sweep_nodes, plan.mix_tasks)],
        "trivial": [p(trivial_tasks, "trivial tasks, 2 nodes", plan.node_sweep_tasks)],
    }


def _sched_seeded(make: Callable[[int], SchedSpec], seed: int) -> dict[str, Any]:
    return run_sched(make(seed))


def sched_sweeps(plan: Plan) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for group, cases in sched_cases(plan).items():
        out[group] = []
        for make in cases:
            label = make(0).name
            run = functools.partial(_sched_seeded, make)
            out[group].append(repeat(run, plan.runs, label))
    return out


def paxos_sweep(plan: Plan) -> list[dict[str, Any]]:
    cost = wrapper_cost()
    out = []
    modes: tuple[PaxosMode, ...] = ("batched", "slot_per_command", "one_at_a_time")
    for n in plan.paxos_replicas:
        for mode in modes:
            # One at a time is a round of messages per command: a twentieth of the commands.
            commands = plan.paxos_commands // (20 if mode == "one_at_a_time" else 1)
            for crashed in (0, 1):
                spec = PaxosSpec(n, mode, crashed, commands)
                run = functools.partial(_run_seeded, spec, cost)
                out.append(repeat(run, plan.paxos_runs, spec.name))
    return out


def _run_seeded(spec: PaxosSpec, cost: float, seed: int) -> dict[str, Any]:
    return run_paxos(PaxosSpec(spec.replicas, spec.mode, spec.crashed, spec.commands, seed), cost)


def sched_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| case | nodes | slots | tasks | jobs | steps | dispatches | core CPU s | steps/s "
        "| dispatches/s | us/step | us/other step | us/task | longest step ms | spec. "
        "| lost outputs |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['name']} | {r['nodes']} | {r['slots']} | {r['tasks']:,} | {r['jobs']} "
        f"| {r['steps']:,} | {r['dispatches']:,} | {r['core_cpu_s']:.2f} "
        f"| {r['steps_per_s']:,.0f} | {r['dispatches_per_s']:,.0f} | {r['us_per_step']:.1f} "
        f"| {r['us_per_other_step']:.1f} "
        f"| {r['us_per_task']:.1f} | {r['max_step_ms']:.1f} | {r['speculative']} "
        f"| {r['output_lost']} |"
        for r in rows
    ]
    return head + "\n".join(lines)


def paxos_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| case | cmds/slot | msgs/cmd | leader calls/cmd | leader us/cmd | follower us/cmd "
        "| all replicas us/cmd | leader us/slot | leader cmds/s |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['name']} | {r['commands_per_slot']:.1f} | {r['messages_per_command']:.2f} "
        f"| {r['leader_calls_per_command']:.2f} "
        f"| {r['leader_us_per_command']:.1f} | {r['follower_us_per_command']:.1f} "
        f"| {r['total_us_per_command']:.1f} | {r['leader_us_per_slot']:.1f} "
        f"| {r['leader_commands_per_s']:,.0f} |"
        for r in rows
    ]
    return head + "\n".join(lines)


def event_table(row: dict[str, Any]) -> str:
    head = "| event | count | core CPU s | us each |\n|---|---|---|---|\n"
    lines = [
        f"| {k} | {v['count']:,} | {v['cpu_s']:.2f} | {v['us_each']:.1f} |"
        for k, v in row["by_event"].items()
    ]
    return head + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, one run each")
    ap.add_argument("--runs", type=int, help="runs per case (median); default 3 (Paxos 5), quick 1")
    ap.add_argument("--no-profile", action="store_true", help="skip the cProfile run")
    ap.add_argument("--only", choices=("sched", "paxos"), help="run one half")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.runs:
        plan = Plan(**{**asdict(plan), "runs": args.runs, "paxos_runs": args.runs})
    result: dict[str, Any] = {
        "plan": asdict(plan),
        "quick": args.quick,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    if args.only != "paxos":
        result["scheduler"] = sched_sweeps(plan)
        if not args.no_profile:
            spec = single_job("profile", plan.task_sweep_nodes, plan.profile_tasks)
            result["scheduler_profile"] = profile_sched(spec)
            most = plan.node_sweep[-1]
            spec = single_job("profile nodes", most, plan.node_sweep_tasks)
            result["scheduler_profile_nodes"] = profile_sched(spec)
    if args.only != "sched":
        result["paxos"] = paxos_sweep(plan)
    print_report(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.out}")
    return 0


def print_report(result: dict[str, Any]) -> None:
    sched = result.get("scheduler")
    if sched is not None:
        print("\n## Scheduler core, by nodes\n")
        print(sched_table(sched["by_nodes"]))
        print("\n## Scheduler core, by tasks\n")
        print(sched_table(sched["by_tasks"] + sched["job_mix"] + sched["trivial"]))
        print(f"\n## Scheduler core CPU per event, {sched['by_tasks'][-1]['name']}\n")
        print(event_table(sched["by_tasks"][-1]))
    plan = result["plan"]
    titles = {
        "scheduler_profile": f"{plan['profile_tasks']:,} tasks, {plan['task_sweep_nodes']} nodes",
        "scheduler_profile_nodes": f"{plan['node_sweep_tasks']:,} tasks, "
        f"{plan['node_sweep'][-1]} nodes",
    }
    for key, title in titles.items():
        if key in result:
            print(f"\n## cProfile of Scheduler.step, {title} (own s, cumulative s, calls)\n")
            for row in result[key]:
                own, cum = row["tottime_s"], row["cumtime_s"]
                print(f"{own:8.3f} {cum:8.3f} {row['calls']:>10} {row['function']}")
    if "paxos" in result:
        print("\n## Paxos core\n")
        print(paxos_table(result["paxos"]))


if __name__ == "__main__":
    sys.exit(main())
