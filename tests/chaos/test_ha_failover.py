"""The leading coordinator dies or hangs mid-job on a 3-coordinator LocalCluster.

Real processes: the Multi-Paxos log replicates the job state, a new leader
rebuilds the scheduler from it and from the workers' reports, and the shuffle
job's answer stays exact. Every process is cleaned up by PID.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

import cloudpickle
import pytest

import lepton_ai as lep
from helpers import assert_mid_job, pids_left, wait_until
from lepton_ai.node.local_cluster import LocalCluster
from lepton_ai.node.messages import ClientReply, ErrorReply, GetStatus, WaitJob
from lepton_ai.node.process import pid_alive
from lepton_ai.wire import Codec, connect

cloudpickle.register_pickle_by_value(sys.modules[__name__])

MAPS, REDUCERS, ITEMS = 12, 3, 12_000


def expected() -> dict[int, int]:
    out: dict[int, int] = {}
    for x in range(ITEMS):
        out[x % 97] = out.get(x % 97, 0) + x
    return out


def slow_pairs(chunk: range) -> Any:
    time.sleep(0.1)
    return ((x % 97, x) for x in chunk)


def shuffle_job(cluster: LocalCluster) -> lep.Job:
    task = lep.DistributedTask(cluster)
    ds = task.parallelize(range(ITEMS), partitions=MAPS)
    pairs = ds.map_partitions(slow_pairs)
    return pairs.reduce_by_key(lambda a, b: a + b, partitions=REDUCERS).submit()


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    c = LocalCluster(workers=2, coordinators=3, spares_per_worker=0)
    seen = set(c.pids())
    try:
        yield c
    finally:
        for pid in c.pids():  # a paused process must not outlive the test
            if pid_alive(pid):
                os.kill(pid, signal.SIGCONT)
        seen |= set(c.pids())
        c.close()
        assert not pids_left(seen, 5.0), "processes left running"


@pytest.mark.timeout(90)
def test_leader_sigkilled_at_random_points_of_a_shuffle_job(cluster: LocalCluster) -> None:
    rng = random.Random(int(os.environ.get("LEPTON_HA_SEED", "4")))
    for trial in range(3):
        job = shuffle_job(cluster)
        time.sleep(rng.uniform(0.05, 0.6))
        old = cluster.leader_id()
        assert_mid_job(cluster, job.id)
        cluster.kill("leader")
        assert dict(job.result(timeout=40)) == expected(), f"trial {trial}"
        assert cluster.leader_id() != old
        cluster.restart("coordinator", old)  # back to 3 for the next trial
    kinds = [e["kind"] for e in cluster.events()]
    assert kinds.count("leader_elected") >= 3


@pytest.mark.timeout(60)
def test_follower_sigkilled_mid_job(cluster: LocalCluster) -> None:
    leader = cluster.leader_id()
    follower = next(i for i in ("0", "1", "2") if i != leader)
    job = shuffle_job(cluster)
    time.sleep(0.2)
    assert_mid_job(cluster, job.id)
    cluster.kill("coordinator", follower)
    assert dict(job.result(timeout=40)) == expected()
    assert cluster.leader_id() == leader  # a follower's death changes no leadership


@pytest.mark.timeout(60)
def test_leader_sigstopped_steps_down_and_its_stale_scheduling_loses(
    cluster: LocalCluster,
) -> None:
    job = shuffle_job(cluster)
    time.sleep(0.3)
    old = cluster.leader_id()
    assert_mid_job(cluster, job.id)
    pid = cluster.pause("leader")
    assert dict(job.result(timeout=40)) == expected()
    new = cluster.leader_id()
    assert new != old
    os.kill(pid, signal.SIGCONT)
    # The old leader wakes up with a stale ballot: it must not lead again by itself,
    # and a second job still comes out exact under the new leadership.
    assert dict(shuffle_job(cluster).result(timeout=40)) == expected()
    assert cluster.status()["leader"] == cluster.coordinator_addresses[int(cluster.leader_id())]
    assert pid_alive(pid)

    # The woken replica knows it lost: it reports a follower role, never a second leader.
    def old_follows() -> dict[str, str] | None:
        members = cluster.status()["members"]
        roles = {m["id"]: m["health"] for m in members if m["role"] == "coordinator"}
        return roles if roles.get(old) == "follower" else None

    roles = wait_until(old_follows, 10.0, f"coordinator {old} reporting itself a follower")
    assert list(roles.values()).count("leader") == 1, roles
    # And asked directly, the old leader sends clients to the new one.
    reply = asyncio.run(ask(cluster, cluster.coordinator_addresses[int(old)], GetStatus()))
    assert isinstance(reply, ErrorReply) and reply.kind == "redirect", reply
    assert reply.message == cluster.coordinator_addresses[int(new)]


async def ask(cluster: LocalCluster, address: str, msg: Any) -> Any:
    host, _, port = address.rpartition(":")
    conn = await connect(
        host, int(port), token=cluster.token, codec=Codec[ClientReply](ClientReply)
    )
    try:
        await conn.send(msg)
        return await asyncio.wait_for(conn.recv(), 5.0)
    finally:
        await conn.close()


@pytest.mark.timeout(60)
def test_quorum_loss_gives_unavailable_then_one_back_resumes(cluster: LocalCluster) -> None:
    job = shuffle_job(cluster)
    time.sleep(0.2)
    leader = cluster.leader_id()
    followers = [i for i in ("0", "1", "2") if i != leader]
    assert_mid_job(cluster, job.id)
    # 2 of 3 unreachable: the leader alone has no quorum. Paused, not killed: the
    # cluster's supervisor would start killed ones again at once.
    for follower in followers:
        os.kill(cluster.procs[("coordinator", follower)].pid, signal.SIGSTOP)
    t0 = time.monotonic()
    with pytest.raises(lep.Unavailable):
        cluster.client.request(WaitJob(job.id, 0.0), 3.0)
    assert time.monotonic() - t0 < 8.0
    with pytest.raises(lep.Unavailable):  # the public API says so too
        job.status()
    os.kill(cluster.procs[("coordinator", followers[0])].pid, signal.SIGCONT)
    assert dict(job.result(timeout=40)) == expected()
