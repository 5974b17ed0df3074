"""Storage under faults on real processes (3 coordinators, the default).

An output written while the driver, the leading coordinator and a worker node are
SIGKILLed comes out complete and without a duplicate line; a job reading stored
inputs survives the loss of a node holding them; a put and a get go on through a
leader failover.
"""

from __future__ import annotations

import json
import operator
import os
import subprocess
import sys
import textwrap
import time

import cloudpickle
import pytest

import lepton_ai as lep
from helpers import assert_mid_job, wait_until
from lepton_ai.node.local_cluster import LocalCluster

cloudpickle.register_pickle_by_value(sys.modules[__name__])

ITEMS, PARTS = 24_000, 12


DRIVER = textwrap.dedent(
    """
    import sys, time
    import lepton_ai as lep

    def slow(chunk):
        time.sleep(0.4)
        return (dict(x=x, sq=x * x) for x in chunk)

    cluster = lep.connect(sys.argv[1], token=sys.argv[2])
    ds = lep.DistributedTask(cluster).parallelize(range({items}), partitions={parts})
    ds.map_partitions(slow).write_jsonl("lep://out/squares")
    """
).format(items=ITEMS, parts=PARTS)


def submitted_job(cluster: LocalCluster) -> str:
    jobs = [e["job_id"] for e in cluster.events() if e["kind"] == "job_submitted"]
    return jobs[-1] if jobs else ""


@pytest.mark.timeout(120)
def test_output_is_whole_and_once_through_driver_leader_and_node_kills() -> None:
    with LocalCluster(workers=3) as cluster:
        driver = subprocess.Popen(
            [sys.executable, "-c", DRIVER, cluster.address, cluster.token],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            wait_until(lambda: bool(submitted_job(cluster)), 30, "the driver submitted its job")
            job = lep.Job(cluster, submitted_job(cluster))
            wait_until(lambda: job.progress()[0] >= 2, 30, "the job started")
            driver.kill()  # the driver is gone: the job lives in the log
            cluster.kill("leader")
            time.sleep(0.3)
            assert job.status() == "running", "the kills must land mid-job"
            cluster.kill("worker", 1)
            urls = job.result(timeout=90)
        finally:
            driver.kill()
            driver.wait(10)
        assert urls == [f"lep://out/squares/part-{p:05d}.jsonl" for p in range(PARTS)]
        keys = [s.key for s in cluster.storage.list("out/")]
        assert keys == [u.removeprefix("lep://") for u in urls]
        rows = [
            json.loads(line)
            for key in keys
            for line in cluster.storage.get(key).decode().splitlines()
        ]
        assert [r["x"] for r in rows] == list(range(ITEMS))  # all, once, in order
        assert all(r["sq"] == r["x"] ** 2 for r in rows)
        # Nothing of the job's temporaries is left under the output or the job's name.
        assert not [
            s for s in cluster.storage.list("_jobs/") if s.key.startswith("_jobs/" + job.id)
        ]


def slow_len(line: str) -> int:
    time.sleep(0.0005)
    return len(line)


@pytest.mark.timeout(120)
def test_a_job_on_stored_inputs_survives_a_node_that_held_them() -> None:
    with LocalCluster(workers=3) as cluster:
        lines = [f"{i:08d}-" + "z" * 200 for i in range(120_000)]  # ~25 MB: stored inputs
        task = lep.DistributedTask(cluster)
        job = task.parallelize(lines, partitions=12).map(slow_len).submit("reduce")
        wait_until(lambda: job.progress()[0] >= 1, 30, "the job started")
        assert_mid_job(cluster, job.id)
        cluster.kill("worker", 0)
        assert job.result(timeout=90) == sum(map(len, lines))


@pytest.mark.timeout(120)
def test_put_and_get_go_on_through_a_leader_failover() -> None:
    with LocalCluster(workers=2) as cluster:
        old_leader = cluster.leader_id()
        data = {f"k{i}": os.urandom(256 * 1024) for i in range(20)}
        for i, (k, v) in enumerate(data.items()):
            if i == 8:
                cluster.kill("leader")
            cluster.storage.put(k, v)
        cluster.restart("coordinator", old_leader)  # a quorum for the second failover
        cluster.kill("leader")  # and reads at once after another failover
        for k, v in data.items():
            assert cluster.storage.get(k) == v
        assert sorted(s.key for s in cluster.storage.list("k")) == sorted(data)


def slow_pairs(chunk: range) -> object:
    time.sleep(0.3)
    return ((x % 97, x) for x in chunk)


@pytest.mark.timeout(150)
def test_replicated_shuffle_loses_no_finished_map_output_with_its_node() -> None:
    want: dict[int, int] = {}
    for x in range(24_000):
        want[x % 97] = want.get(x % 97, 0) + x
    with LocalCluster(workers=3) as cluster:
        task = lep.DistributedTask(cluster)
        lost_outputs = {}
        for replicas in (1, 2):
            ds = task.parallelize(range(24_000), partitions=12).map_partitions(slow_pairs)
            job = ds.reduce_by_key(operator.add, 3).submit(shuffle_replicas=replicas)
            wait_until(lambda j=job: j.progress()[0] >= 4, 30, "a third of the maps done")
            assert_mid_job(cluster, job.id)
            cluster.kill("worker", 0)
            assert dict(job.result(timeout=90)) == want
            kinds = [e["kind"] for e in cluster.events(job.id)]
            lost_outputs[replicas] = kinds.count("output_lost")
            cluster.restart("worker", 0)
            cluster.wait_ready(3)
        # Without copies the dead node's finished map outputs are re-made; with a
        # copy on another node none is: only the attempts it was running re-run.
        assert lost_outputs[1] > 0
        assert lost_outputs[2] == 0


@pytest.mark.timeout(120)
def test_reads_pass_over_a_paused_node() -> None:
    with LocalCluster(workers=3) as cluster:
        data = {f"k{i}": os.urandom(1 << 20) for i in range(6)}
        for k, v in data.items():
            cluster.storage.put(k, v)
        cluster.pause("worker", 0)  # a hang: its kernel still accepts connections
        try:
            started = time.monotonic()
            for k, v in data.items():
                assert cluster.storage.get(k) == v
            # Not 30 s per read (the reply timeout): a silent node is passed over.
            assert time.monotonic() - started < 20.0
        finally:
            cluster.resume("worker", 0)
