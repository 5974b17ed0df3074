"""Detached jobs on a 3-coordinator cluster: the driver dies, another process gets the result.

Also: ``lep.connect`` with every coordinator's address, ``cluster.kv`` on the same
replicated log as the jobs, ``lepton job rm`` and the replicated event log.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest

import lepton_ai as lep
from helpers import lepton, wait_until
from lepton_ai.node.local_cluster import LocalCluster
from lepton_ai.node.process import pid_alive

DRIVER = textwrap.dedent(
    """
    import sys, time
    import lepton_ai as lep

    def slow(x):
        time.sleep(0.002)  # ~2 s of work in all: the job outlives its driver
        return (x % 10, x)

    cluster = lep.connect(sys.argv[1], token=sys.argv[2])
    task = lep.DistributedTask(cluster)
    job = task.parallelize(range(2000), partitions=8).map(slow).reduce_by_key(
        lambda a, b: a + b, partitions=2
    ).submit()
    print(job.id, flush=True)
    time.sleep(600)  # killed by the test long before
    """
)


def expected() -> dict[int, int]:
    out: dict[int, int] = {}
    for x in range(2000):
        out[x % 10] = out.get(x % 10, 0) + x
    return out


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    c = LocalCluster(workers=2, coordinators=3, spares_per_worker=0)
    seen = set(c.pids())
    try:
        yield c
    finally:
        seen |= set(c.pids())
        c.close()
        assert not [p for p in seen if pid_alive(p)], "processes left running"


@pytest.mark.timeout(90)
def test_driver_sigkilled_after_submit_result_fetched_by_a_new_process(
    cluster: LocalCluster, tmp_path: object
) -> None:
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, cluster.address, cluster.token],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert driver.stdout is not None
        job_id = driver.stdout.readline().strip()
        assert job_id, "the driver printed no job id"
    finally:
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(10)
    auth = ["--address", cluster.address, "--token", cluster.token]
    out = lepton("job", "result", job_id, "--timeout", "40", "--json", *auth)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)["result"]
    assert {int(k): v for k, v in result} == expected()
    # In this process too, through another handle that knows all coordinators.
    other = lep.connect(cluster.address, token=cluster.token)
    try:
        assert dict(lep.Job(other, job_id).result(timeout=10)) == expected()
        other.kv.put("last-job", job_id)  # the KV of lep.connect rides the same log
        assert cluster.kv.get("last-job") == job_id
        coordinators = [m for m in other.status()["members"] if m["role"] == "coordinator"]
        assert len(coordinators) == 3
        assert sorted(m["health"] for m in coordinators) == ["follower", "follower", "leader"]
        # Real pids for every replica, not only the one that answered (each reports its own).
        started = {cluster.procs[("coordinator", str(i))].pid for i in range(3)}
        wait_until(
            lambda: (
                {m["pid"] for m in other.status()["members"] if m["role"] == "coordinator"}
                == started
            ),
            10.0,
            "every coordinator's real pid in the status",
        )
        status = lepton("job", "status", job_id, "--json", *auth)
        assert json.loads(status.stdout)["status"] == "finished"
        rm = lepton("job", "rm", job_id, "--json", *auth)
        assert rm.returncode == 0, rm.stderr
        with pytest.raises(KeyError):
            other.job_info(job_id)
        gone = lepton("job", "status", job_id, *auth)
        assert gone.returncode != 0
    finally:
        other.close()


@pytest.mark.timeout(60)
def test_kv_and_jobs_share_the_replicated_log_across_a_failover(cluster: LocalCluster) -> None:
    cluster.kv.put("model", "v1")
    assert cluster.kv.cas("model", "v1", "v2")
    task = lep.DistributedTask(cluster)
    assert task.parallelize(range(100), partitions=4).map(lambda x: x + 1).reduce(
        lambda a, b: a + b
    ) == sum(range(1, 101))
    failing = task.parallelize(range(20), partitions=2).map(lambda x: 1 // (x - 7)).submit()
    with pytest.raises(lep.TaskError):
        failing.result(timeout=30)
    old = cluster.leader_id()
    cluster.kill("leader")
    assert cluster.kv.get("model") == "v2"
    assert task.parallelize(range(100), partitions=4).count() == 100
    assert cluster.leader_id() != old
    events = cluster.events()
    kinds = {e["kind"] for e in events}
    assert {"leader_elected", "job_finished", "job_failed"} <= kinds
    # The failed task is on the new leader's timeline too: the event log is replicated.
    failed = [e for e in events if e["kind"] == "task_failed" and e["job_id"] == failing.id]
    assert failed and "ZeroDivisionError" in failed[0]["detail"], events
    cluster.restart("coordinator", old)
    time.sleep(0.2)


@pytest.mark.timeout(60)
def test_finished_jobs_expire_after_the_retention() -> None:
    with LocalCluster(workers=1, spares_per_worker=0, job_retention_s=0.5) as c:
        task = lep.DistributedTask(c)
        job = task.parallelize(range(10), partitions=2).map(lambda x: x + 1).submit()
        assert sorted(job.result(timeout=30)) == list(range(1, 11))

        def expired() -> bool:
            try:
                c.job_info(job.id)
            except KeyError:
                return True
            return False

        wait_until(expired, 10.0, "the finished job expired", interval_s=0.2)
        assert "job_expired" in {e["kind"] for e in c.events()}
