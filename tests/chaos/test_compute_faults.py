"""Faults mid-job on a real LocalCluster: the answer stays exact and the timeline shows why.

Each test starts its own two-worker cluster, submits a shuffle job whose map
tasks take long enough to be interrupted, injects one fault through the
cluster's own fault-injection API, and checks the result against a serial
computation, the detection time and that no process is left running.
"""

from __future__ import annotations

import functools
import operator
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

import lepton_ai as lep
from helpers import assert_mid_job, pids_left, wait_until
from lepton_ai.node.local_cluster import LocalCluster
from lepton_ai.node.process import pid_alive

cloudpickle.register_pickle_by_value(sys.modules[__name__])

MAPS, REDUCERS, ITEMS = 16, 4, 16_000
DETECT_LIMIT_S = 2.5  # the target is 2 s; dev machines shared by many runs need a margin


def expected() -> dict[int, int]:
    out: dict[int, int] = {}
    for x in range(ITEMS):
        out[x % 97] = out.get(x % 97, 0) + x
    return out


def slow_pairs(chunk: range) -> Any:
    time.sleep(0.15)  # long enough that the fault lands while maps run
    return ((x % 97, x) for x in chunk)


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    c = LocalCluster(workers=2)
    pids = set(c.pids()) | {m["pid"] for m in c.status()["members"]}
    try:
        yield c
    finally:
        for pid in c.pids():  # a paused process must not outlive the test
            if pid_alive(pid):
                os.kill(pid, signal.SIGCONT)
        with_new = pids | set(c.pids())
        try:
            with_new |= {m["pid"] for m in c.status()["members"]}
        except lep.LeptonError:
            pass
        c.close()
        left = pids_left(with_new, 5.0)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"processes left running: {left}"


def submit(cluster: LocalCluster) -> lep.Job:
    task = lep.DistributedTask(cluster, progress=False)
    ds = task.parallelize(range(ITEMS), partitions=MAPS).map_partitions(slow_pairs)
    return ds.reduce_by_key(operator.add, partitions=REDUCERS).submit()


def wait_busy(cluster: LocalCluster, role: str, timeout_s: float = 10.0) -> str:
    """Id of a member of ``role`` that is running a task right now."""

    def busy() -> list[dict[str, Any]]:
        members = cluster.status()["members"]
        return [m for m in members if m["role"] == "executor" and m["health"] == "busy"]

    found = wait_until(busy, timeout_s, "an executor busy", interval_s=0.02)
    if role == "executor":
        return str(found[0]["id"])
    return str(found[-1]["id"]).split(".")[0]


def first(events: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [e for e in events if e["kind"] == kind]
    assert found, f"no {kind} event in {[e['kind'] for e in events]}"
    return found[0]


@pytest.mark.timeout(90)
def test_sigkill_executor_mid_job(cluster: LocalCluster) -> None:
    job = submit(cluster)
    time.sleep(0.3)
    target = wait_busy(cluster, "executor")
    assert_mid_job(cluster, job.id)
    pid = cluster.kill("executor", target)
    assert dict(job.result(timeout=60)) == expected()
    assert not pid_alive(pid)
    events = cluster.events()
    fault = first(events, "fault_injected")
    failed = first(events, "task_failed")
    assert "SIGKILL" in failed["detail"]
    assert failed["t"] - fault["t"] < 1.0  # seen by the agent at once, not by a timeout
    workers = [m for m in cluster.status()["members"] if m["role"] == "worker"]
    assert len(workers) == 2  # the agent survived and replaced its executor


@pytest.mark.timeout(90)
def test_sigkill_worker_mid_job(cluster: LocalCluster) -> None:
    job = submit(cluster)
    time.sleep(0.5)
    worker = wait_busy(cluster, "worker")
    assert_mid_job(cluster, job.id)
    cluster.kill("worker", worker)
    assert dict(job.result(timeout=60)) == expected()
    events = cluster.events()
    fault = first(events, "fault_injected")
    lost = first(events, "worker_lost")
    assert lost["t"] - fault["t"] < DETECT_LIMIT_S
    # It was running a task (busy just before the kill): that partition ran again
    # elsewhere. (Its finished outputs have copies on the other node: shuffle_replicas=2.)
    assert "task_rescheduled" in [e["kind"] for e in events], events
    assert first(events, "job_finished")["t"] > lost["t"]


@pytest.mark.timeout(90)
def test_sigstop_worker_mid_job_is_detected_as_a_hang(cluster: LocalCluster) -> None:
    job = submit(cluster)
    time.sleep(0.5)
    worker = wait_busy(cluster, "worker")
    assert_mid_job(cluster, job.id)
    cluster.pause("worker", worker)
    try:
        assert dict(job.result(timeout=60)) == expected()
    finally:
        cluster.resume("worker", worker)
    events = cluster.events()
    fault = first(events, "fault_injected")
    lost = first(events, "worker_lost")
    assert "phi" in lost["detail"]  # the connection stayed open: heartbeats told
    assert lost["t"] - fault["t"] < DETECT_LIMIT_S
    # Resumed, the agent rejoins under a new incarnation id and takes work again.
    wait_until(
        lambda: len([e for e in cluster.events() if e["kind"] == "worker_joined"]) >= 3,
        10.0,
        "a third worker_joined (the resumed agent, re-incarnated)",
    )


def pairs_gated(gate: str, chunk: range) -> Any:
    """The first partition waits for ``gate`` to exist, holding the reduce stage
    back until the test has damaged the other outputs (a fixed sleep raced a slow
    machine: the job could finish before six outputs were seen at once)."""
    if chunk[0] == 0:
        # Runs in an executor, where the tests' helpers cannot be imported; and on a
        # timeout it must go on, not fail (the test then fails on its own check).
        deadline = time.monotonic() + 30
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.02)
    return ((x % 13, x) for x in chunk)


@pytest.mark.timeout(90)
def test_corrupt_and_missing_shuffle_files_rerun_their_map_tasks(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    task = lep.DistributedTask(cluster, progress=False)
    ds = task.parallelize(range(2000), partitions=8).map_partitions(
        functools.partial(pairs_gated, str(gate))
    )
    # One copy of each map output: the damage below must be what readers find.
    job = ds.reduce_by_key(operator.add, partitions=3).submit(shuffle_replicas=1)
    root = Path(cluster.data_dir) / "workers"
    deadline = time.monotonic() + 10
    damaged = 0
    # A loaded machine can make the coordinator declare a worker lost, and the
    # worker then drops its whole store: damage what still exists, retrying
    # until at least the deleted file and one corrupt file were hit.
    while time.monotonic() < deadline and damaged < 2:
        files = sorted(root.glob(f"*/shuffle/*/{job.id}/*.shf"))  # node/shuffle/incarnation
        if len(files) < 6:
            time.sleep(0.02)
            continue
        damaged = _damage(files[0], files[1:4])
    gate.touch()  # release the held map task whatever happened
    assert damaged >= 2, "map outputs did not appear"
    want: dict[int, int] = {}
    for x in range(2000):
        want[x % 13] = want.get(x % 13, 0) + x
    assert dict(job.result(timeout=60)) == want
    kinds = [e["kind"] for e in cluster.events(job.id)]
    assert "fetch_failed" in kinds and "output_lost" in kinds


def _damage(lost: Path, rotten: list[Path]) -> int:
    """Delete ``lost`` and flip a bit in the middle of each of ``rotten``.

    Every reader trips over each damaged output in turn; only the first report
    per output may count as a failure. Returns how many files were damaged.
    """
    done = 0
    try:
        lost.unlink()
        done += 1
    except FileNotFoundError:
        pass
    for f in rotten:
        try:
            raw = bytearray(f.read_bytes())
            raw[len(raw) // 2] ^= 0xFF
            f.write_bytes(bytes(raw))
            done += 1
        except FileNotFoundError:
            pass
    return done


@pytest.mark.timeout(90)
def test_coordinator_sigkill_and_restart_resumes_the_job_from_its_log(
    cluster: LocalCluster,
) -> None:
    job = submit(cluster)
    time.sleep(0.5)
    assert_mid_job(cluster, job.id)
    old = cluster.kill("coordinator", 0)
    new = cluster.restart("coordinator", 0)
    assert new != old and not pid_alive(old)
    # The job lives in the coordinator's log: the new process replays it and the
    # workers, reconnecting, finish it. A fresh handle finds it by id.
    assert dict(lep.Job(cluster, job.id).result(timeout=60)) == expected()
    kinds = [e["kind"] for e in cluster.events()]
    assert "coordinator_started" in kinds and "job_finished" in kinds
