"""Chaos soak: random SIGKILL or SIGSTOP of any member while jobs and KV writes run.

``LEPTON_SOAK_S`` (60 by default) seconds of faults every 2-4 s against the
default cluster (3 coordinators, 2 worker agents, the supervisor restarting what
dies): every job's answer exact, every acknowledged write present with its
value, and the cluster back to full strength at the end. ``LEPTON_SOAK_SEED``
replays a run; a failure prints the seed and the faults it injected.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import cloudpickle
import pytest

import lepton_ai as lep
from helpers import pids_left, wait_full_strength
from lepton_ai.node.local_cluster import LocalCluster
from lepton_ai.node.process import pid_alive

cloudpickle.register_pickle_by_value(sys.modules[__name__])

SOAK_S = float(os.environ.get("LEPTON_SOAK_S", "60"))
SEED = int(os.environ.get("LEPTON_SOAK_SEED", str(random.randrange(1 << 30))))
MEMBERS = [("coordinator", "0"), ("coordinator", "1"), ("coordinator", "2")]
MEMBERS += [("worker", "0"), ("worker", "1")]
ITEMS = 3_000
JOB_TIMEOUT_S = 90.0  # a job may sit out a leader change and a node restart


def squares(part: list[int]) -> list[tuple[int, int]]:
    time.sleep(0.05)
    return [(x % 31, x * x) for x in part]


def _add(a: int, b: int) -> int:
    return a + b


EXPECTED = {k: sum(x * x for x in range(ITEMS) if x % 31 == k) for k in range(31)}


@dataclass
class Tally:
    faults: list[str] = field(default_factory=list)
    jobs: int = 0
    wrong: list[str] = field(default_factory=list)
    job_errors: list[str] = field(default_factory=list)
    acked: dict[str, int] = field(default_factory=dict)
    write_errors: int = 0


def inject(cluster: LocalCluster, rng: random.Random, stop: threading.Event, tally: Tally) -> None:
    """One fault at a time: SIGKILL (the supervisor restarts it) or SIGSTOP for 1-3 s."""
    while not stop.wait(rng.uniform(2.0, 4.0)):
        role, id = rng.choice(MEMBERS)
        proc = cluster.procs.get((role, id))
        if proc is None or not proc.alive():
            continue
        t = round(time.monotonic(), 1)
        if rng.random() < 0.6:
            tally.faults.append(f"{t} kill {role} {id}")
            os.kill(proc.pid, signal.SIGKILL)
        else:
            tally.faults.append(f"{t} pause {role} {id}")
            os.kill(proc.pid, signal.SIGSTOP)
            stop.wait(rng.uniform(1.0, 3.0))
            os.kill(proc.pid, signal.SIGCONT)


def write(cluster: LocalCluster, stop: threading.Event, tally: Tally) -> None:
    """Writes k0, k1, ...: a write that returned is acknowledged and must survive."""
    i = 0
    while not stop.is_set():
        key = f"soak-{i}"
        try:
            cluster.kv.put(key, i)
        except lep.LeptonError:
            tally.write_errors += 1  # unacknowledged: may or may not have landed
            time.sleep(0.1)
        else:
            tally.acked[key] = i
        i += 1
        time.sleep(0.02)


def run_jobs(cluster: LocalCluster, stop: threading.Event, tally: Tally) -> None:
    task = lep.DistributedTask(cluster)
    while not stop.is_set():
        ds = task.parallelize(range(ITEMS), partitions=6).map_partitions(squares)
        try:
            got = dict(ds.reduce_by_key(_add, partitions=3).collect(timeout=JOB_TIMEOUT_S))
        except lep.LeptonError as exc:
            tally.job_errors.append(f"{round(time.monotonic(), 1)} {type(exc).__name__}: {exc}")
            continue
        tally.jobs += 1
        if got != EXPECTED:
            tally.wrong.append(f"job {tally.jobs}: {sorted(got.items())[:3]}...")


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    c = LocalCluster(workers=2)
    seen: set[int] = set()
    try:
        yield c
    finally:
        for pid in c.pids():
            if pid_alive(pid):
                os.kill(pid, signal.SIGCONT)
        seen |= set(c.pids())
        c.close()
        assert not pids_left(seen, 5.0), "processes left running"


@pytest.mark.timeout(SOAK_S + 240)
def test_soak(cluster: LocalCluster) -> None:
    print(f"LEPTON_SOAK_SEED={SEED} LEPTON_SOAK_S={SOAK_S}")
    rng = random.Random(SEED)
    tally = Tally()
    stop_faults, stop_load = threading.Event(), threading.Event()
    threads = [
        threading.Thread(target=inject, args=(cluster, rng, stop_faults, tally)),
        threading.Thread(target=write, args=(cluster, stop_load, tally)),
        threading.Thread(target=run_jobs, args=(cluster, stop_load, tally)),
    ]
    for t in threads:
        t.start()
    try:
        time.sleep(SOAK_S)
    finally:
        stop_faults.set()
        threads[0].join(10)
        stop_load.set()
        for t in threads[1:]:
            t.join(JOB_TIMEOUT_S + 10)
    context = f"seed {SEED}; faults: {tally.faults}"
    assert not any(t.is_alive() for t in threads), context
    assert not tally.wrong, f"wrong results: {tally.wrong}; {context}"
    assert not tally.job_errors, f"jobs failed: {tally.job_errors}; {context}"
    assert tally.jobs >= 3 and len(tally.faults) >= SOAK_S / 5, (tally.jobs, context)

    wait_full_strength(cluster, 45.0)  # after the last fault (a looping member: 30 s cap)
    lost = {k: v for k, v in tally.acked.items() if cluster.kv.get(k) != v}
    assert not lost, f"{len(lost)} acknowledged writes lost: {sorted(lost)[:5]}; {context}"
    print(
        f"soak {SOAK_S:.0f} s: {tally.jobs} jobs exact, {len(tally.faults)} faults, "
        f"{len(tally.acked)} writes acknowledged ({tally.write_errors} refused), none lost"
    )
