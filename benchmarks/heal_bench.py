"""Self-healing: how fast a LocalCluster is back at full strength after a SIGKILL.

    .venv/bin/python benchmarks/heal_bench.py [--trials 10] [--soak-s 60] [--seed 1] [--json]

``LocalCluster(workers=2)``, 3 coordinators; ``--trials`` rounds of: SIGKILL worker
agent 0, a follower coordinator, the leader; milestones polled every 10 ms (see
docs/benchmarks-heal.md). Full strength: every process runs, each coordinator answers
its Paxos status with the pid started here, one leads and the others applied its
commits, ``status()`` lists them and both workers (pids started here, executors up),
a KV write succeeds. A target first runs ``--settle-s`` (default stable_after_s +
0.5 s): each kill is a first death, restarted at once. ``--soak-s N``: SIGKILL or
SIGSTOP (SIGCONT 1-3 s later) a random worker agent or coordinator every 2-4 s while
MapReduce jobs and KV writes run. Results: benchmarks/results/heal.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import signal
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc
import cloudpickle

import lepton_ai as lep
from lepton_ai.node.supervise import member_key

cloudpickle.register_pickle_by_value(sys.modules[__name__])
cloudpickle.register_pickle_by_value(bc)

RESULTS = Path(__file__).resolve().parent / "results" / "heal.json"
POLL_S = 0.01
ERRORS_DISTINCT_MAX = 1_000
WAIT_S = 120.0  # any milestone: longer is a failure
TARGET_S = 2.0  # issue 10: a worker back within 2 s; a coordinator within 2 s (median)
GOALS = [("worker", "median"), ("worker", "max"), ("follower", "median"), ("leader", "median")]
SOAK_N = 2000
SOAK_SUM = sum(x * x for x in range(SOAK_N))
Key = tuple[str, str]
TIMELINE = ("fault_injected", "member_restarted", "crash_loop", "worker_lost", "leader_elected")


def agent_pid(_x: int) -> int:
    time.sleep(0.02)
    return os.getppid()  # an executor is a child of its worker agent


def square(x: int) -> int:
    return x * x


def _until(cond: Callable[[], Any], what: str, timeout_s: float = WAIT_S) -> float:
    """``time.monotonic()`` when ``cond()`` first holds (its exceptions count as no)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if cond():
                return time.monotonic()
        except Exception:  # a member is down: that is what is measured
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s} s")
        time.sleep(POLL_S)


def _paxos(cluster: Any, id: str, timeout_s: float = 0.5) -> Any:
    address = cluster.paxos_addresses[cluster.coordinator_ids.index(id)]
    return cluster.kv.status(address, timeout_s)


def _respawned(cluster: Any, key: Key, old: int) -> bool:
    proc = cluster.procs[key]
    return bool(proc.pid != old and proc.alive())


def _coordinators_ok(cluster: Any) -> bool:
    views = {id: _paxos(cluster, id) for id in cluster.coordinator_ids}
    if any(v.pid != cluster.procs[("coordinator", id)].pid for id, v in views.items()):
        return False
    leaders = [v for v in views.values() if v.role == "leader"]
    if len(leaders) != 1:
        return False
    top = leaders[0].commit_index
    return all(
        v.role == "follower" and v.applied_index >= top
        for v in views.values()
        if v.role != "leader"
    )


def _listed_ok(cluster: Any) -> bool:
    """``status()``: coordinators and ready workers, each with the pid started here."""
    members = cluster.status()["members"]
    starting = {m["node"] for m in members if m["role"] == "executor" and m["health"] == "starting"}
    executing = {m["node"] for m in members if m["role"] == "executor"} - starting
    got = sorted(
        (m["role"], m["id"], m["pid"])
        for m in members
        if (m["role"] == "worker" and m["node"] in executing)
        or (m["role"] == "coordinator" and m["health"] in ("leader", "follower"))
    )
    return got == sorted((role, id, p.pid) for (role, id), p in cluster.procs.items())


def full_strength(cluster: Any) -> bool:
    if not all(p.alive() for p in cluster.procs.values()):
        return False
    if not (_coordinators_ok(cluster) and _listed_ok(cluster)):
        return False
    cluster.kv.put("heal-probe", time.time())
    return True


def _trivial_job(cluster: Any) -> bool:
    task = lep.DistributedTask(cluster, progress=False)
    return bool(task.parallelize(range(2), partitions=2).map(bc.noop).collect(timeout=30) == [0, 1])


def _agent_pids(cluster: Any) -> set[int]:
    task = lep.DistributedTask(cluster, progress=False)
    return set(task.parallelize(range(8), partitions=8).map(agent_pid).collect(timeout=30))


def _kill(cluster: Any, key: Key, settle_s: float) -> tuple[int, float]:
    """SIGKILL ``key`` once it has run ``settle_s`` and the cluster is at full strength."""
    rec = cluster.supervisor.record(member_key(*key))
    time.sleep(max(0.0, rec.started_at + settle_s - time.monotonic()))
    _until(partial(full_strength, cluster), "full strength before the kill")
    old = cluster.kill(*key)  # the SIGKILL is its last step
    return old, time.monotonic()


def _registered(cluster: Any, key: Key, new: int) -> bool:
    # health "unregistered": a process LocalCluster started that the leader does not list
    members = cluster.status()["members"]
    return any(
        (m["role"], m["id"], m["pid"]) == (*key, new) and m["health"] != "unregistered"
        for m in members
    )


def _caught_up(cluster: Any, key: Key, new: int) -> bool:
    me = _paxos(cluster, key[1])
    if me.pid != new or me.role != "follower" or me.leader is None:
        return False
    return bool(me.applied_index >= _paxos(cluster, str(me.leader)).commit_index)


def _staged(cluster: Any, key: Key, settle_s: float, stage: str, check: Any) -> dict[str, float]:
    """Kill ``key``; times of its new process, of ``check``, of full strength, in turn;
    for a worker also of a task run on its new process (jobs started after full strength)."""
    old, t0 = _kill(cluster, key, settle_s)
    out = {"process_s": _until(partial(_respawned, cluster, key, old), "new process") - t0}
    new = cluster.procs[key].pid
    out[stage] = _until(partial(check, cluster, key, new), stage) - t0
    out["full_s"] = _until(partial(full_strength, cluster), "full strength") - t0
    if key[0] == "worker":
        out["task_s"] = _until(lambda: new in _agent_pids(cluster), "a task on it") - t0
    return out


def worker_trial(cluster: Any, settle_s: float) -> dict[str, float]:
    return _staged(cluster, ("worker", "0"), settle_s, "registered_s", _registered)


def follower_trial(cluster: Any, settle_s: float) -> dict[str, float]:
    leader = cluster.leader_id()
    ids = [id for id in cluster.coordinator_ids if id != leader]
    oldest = min(
        ids, key=lambda id: cluster.supervisor.record(member_key("coordinator", id)).started_at
    )
    return _staged(cluster, ("coordinator", oldest), settle_s, "caught_up_s", _caught_up)


def leader_trial(cluster: Any, settle_s: float) -> dict[str, float]:
    key = ("coordinator", cluster.leader_id())
    old, t0 = _kill(cluster, key, settle_s)
    with ThreadPoolExecutor(3) as pool:  # each from the kill on, side by side
        proc = pool.submit(_until, partial(_respawned, cluster, key, old), "new process")
        kv = pool.submit(_until, lambda: cluster.kv.put("heal-failover", 1) or True, "a KV write")
        job = pool.submit(_until, partial(_trivial_job, cluster), "a job")
        full = _until(partial(full_strength, cluster), "full strength")
        return {
            "failover_kv_s": kv.result() - t0,
            "failover_job_s": job.result() - t0,
            "process_s": proc.result() - t0,
            "full_s": full - t0,
        }


SCENARIOS = {"worker": worker_trial, "follower": follower_trial, "leader": leader_trial}


def summarize(trials: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    return {
        k: {"median": statistics.median(t[k] for t in trials), "max": max(t[k] for t in trials)}
        for k in trials[0]
    }


def run_trials(cluster: Any, trials: int, settle_s: float) -> dict[str, Any]:
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in SCENARIOS}
    for i in range(trials):
        for name, trial in SCENARIOS.items():  # interleaved: one's settle is the others' time
            samples[name].append(trial(cluster, settle_s))
            print(f"round {i + 1} {name}: {_rounded(samples[name][-1])}", file=sys.stderr)
    return {
        name: {"summary": summarize(s), "trials": [_rounded(t) for t in s]}
        for name, s in samples.items()
    }


def _rounded(d: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 3) for k, v in d.items()}


# -- soak ------------------------------------------------------------------------------
@dataclass
class Soak:
    cluster: Any
    stop: threading.Event = field(default_factory=threading.Event)
    stats: Counter[str] = field(default_factory=Counter)
    # Distinct messages, counted (a cluster down for long fails every call at once:
    # a list of them grew by gigabytes in one broken run).
    errors: Counter[str] = field(default_factory=Counter)
    acked: dict[str, int] = field(default_factory=dict)  # KV writes acknowledged

    def _error(self, what: str, exc: BaseException) -> None:
        self.stats[f"{what}_errors"] += 1
        self._note(f"{what}: {type(exc).__name__}: {exc}"[:160])

    def _note(self, message: str) -> None:
        if message in self.errors or len(self.errors) < ERRORS_DISTINCT_MAX:
            self.errors[message] += 1

    def jobs(self) -> None:
        task = lep.DistributedTask(self.cluster, progress=False)
        while not self.stop.is_set():
            try:
                ds = task.parallelize(range(SOAK_N), partitions=4).map(square)
                got = ds.reduce(bc.add, timeout=60)
            except Exception as exc:  # an error under faults, not a wrong result: retried
                self._error("job", exc)
                continue
            self.stats["jobs_done" if got == SOAK_SUM else "wrong_results"] += 1

    def writes(self) -> None:
        for i in itertools.count():
            if self.stop.wait(0.01):
                return
            try:
                self.cluster.kv.put(f"k{i}", i)
            except Exception as exc:  # not acknowledged: may or may not be applied
                self._error("kv", exc)
                continue
            self.acked[f"k{i}"] = i

    def fault(self, rng: random.Random, timers: list[threading.Timer]) -> None:
        """SIGKILL, or SIGSTOP and SIGCONT 1-3 s later, a random running member."""
        key = rng.choice(sorted(k for k, p in self.cluster.procs.items() if p.alive()))
        kill = rng.random() < 0.5
        (self.cluster.kill if kill else self.cluster.pause)(*key)
        self.stats[f"{'sigkill' if kill else 'sigstop'}_{key[0]}"] += 1
        if not kill:  # a member killed meanwhile: its new process gets a harmless SIGCONT
            timers.append(threading.Timer(rng.uniform(1.0, 3.0), self._resume, key))
            timers[-1].start()

    def _resume(self, role: str, id: str) -> None:
        try:
            self.cluster.resume(role, id)
        except LookupError:
            pass  # killed while paused, and not back yet: nothing left to resume

    def lost_writes(self) -> int:
        return sum(1 for k, v in self.acked.items() if self.cluster.kv.get(k) != v)


def _restarts(cluster: Any) -> Counter[str]:
    members = cluster.status()["members"]
    return Counter({f"{m['role']} {m['id']}": m["restarts"] for m in members if m["restarts"]})


def soak(cluster: Any, seconds: float, seed: int) -> dict[str, Any]:
    rng, run = random.Random(seed), Soak(cluster)
    timers: list[threading.Timer] = []
    restarts, wall0 = _restarts(cluster), time.time()
    threads = [threading.Thread(target=run.jobs), threading.Thread(target=run.writes)]
    for t in threads:
        t.start()
    end = time.monotonic() + seconds
    while time.monotonic() + 2.0 < end:
        time.sleep(rng.uniform(2.0, 4.0))
        try:
            run.fault(rng, timers)
        except (LookupError, OSError) as exc:  # it died between the choice and the signal
            run._note(f"inject: {exc}"[:160])
    for timer in timers:
        timer.join()  # every paused member runs again
    t0 = time.monotonic()
    run.stop.set()
    for t in threads:
        t.join()
    records = cluster.supervisor.core.members.values()
    full_s = None  # never, with a member left down (a crash loop): only an operator helps
    if all(r.state not in ("crashloop", "gone") for r in records):  # killed ones loop back
        full_s = _until(partial(full_strength, cluster), "full strength") - t0
    stats, members = run.stats, cluster.status()["members"]
    events = [e for e in cluster.events() if e["t"] >= wall0]
    down = [
        f"{m['role']} {m['id']}: {m['health']}, {m['restarts']} restarts, {m['last_exit']}"
        for m in members
        if m["health"] in ("crashloop", "gone", "down", "unregistered")
    ]
    return {
        "seconds": seconds,
        "seed": seed,
        "faults": dict(sorted((k, v) for k, v in stats.items() if k.startswith("sig"))),
        **{k: stats[k] for k in ("jobs_done", "wrong_results", "job_errors", "kv_errors")},
        "kv_acked": len(run.acked),
        "lost_writes": run.lost_writes(),
        "full_strength_s": None if full_s is None else round(full_s, 3),
        "restarts": dict(_restarts(cluster) - restarts),
        "left_down": down,
        "errors_sample": run.errors.most_common(8),
        # what led there: the faults and the supervisor's actions, in order
        "timeline": [
            f"{e['t'] - wall0:.2f} {e['kind']} {e['detail']}"
            for e in events
            if down and e["kind"] in TIMELINE
        ],
    }


# -- report ----------------------------------------------------------------------------
def targets(res: dict[str, Any]) -> list[str]:
    out = []
    for name, stat in GOALS:
        v = res[name]["summary"]["full_s"][stat]
        verdict = "met" if v <= TARGET_S else f"MISSED by {v - TARGET_S:.2f} s"
        out.append(f"{name} full_s {stat} {v:.2f} s <= {TARGET_S:.0f} s: {verdict}")
    return out


def print_table(doc: dict[str, Any]) -> None:
    if "scenarios" in doc:
        print(f"{'scenario':<10}{'metric':<16}{'median s':>10}{'max s':>9}")
    for name, res in doc.get("scenarios", {}).items():
        for metric, v in res["summary"].items():
            print(f"{name:<10}{metric:<16}{v['median']:>10.3f}{v['max']:>9.3f}")
    for line in doc.get("targets", []):
        print(line)
    if "soak" in doc:
        print("soak", json.dumps(doc["soak"], indent=1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=10, help="rounds (0: none)")
    ap.add_argument("--settle-s", type=float, default=None, help="a target's run before its kill")
    ap.add_argument("--soak-s", type=float, default=0.0, help="soak seconds (0: none)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    doc: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "load_avg_1m": [round(os.getloadavg()[0], 2)],
        "trials": args.trials,
    }
    with lep.LocalCluster(workers=2) as cluster:
        stable_s = cluster.supervisor.core.config.stable_after_s
        doc["settle_s"] = settle_s = stable_s + 0.5 if args.settle_s is None else args.settle_s
        if args.trials > 0:
            doc["scenarios"] = run_trials(cluster, args.trials, settle_s)
            doc["targets"] = targets(doc["scenarios"])
        if args.soak_s > 0:
            doc["soak"] = soak(cluster, args.soak_s, args.seed)
    doc["load_avg_1m"].append(round(os.getloadavg()[0], 2))
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print_table(doc)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # close the cluster on kill
    sys.exit(main())
