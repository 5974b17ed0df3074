"""Clients writing in a loop through a leader SIGKILL on a 3-coordinator LocalCluster.

The KV client and the coordinator client lose their leader mid-loop and must find
the new one on their own: every acknowledged write is there, applied once (a write
retried on the new leader carries the same session sequence number or job id), the
KV history is linearizable, and the clients write again soon after the kill (a
generous bound: the time itself is measured by benchmarks/failover_bench.py).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import socket
import threading
import time
from collections.abc import Iterator

import pytest

import lepton_ai as lep
from lepton_ai.compute.plan import JobOptions
from lepton_ai.consensus.client import KvClient, KvClientConfig
from lepton_ai.errors import LeptonError, Unavailable
from lepton_ai.node.local_cluster import LocalCluster
from lepton_ai.node.process import pid_alive
from lepton_ai.sim.linearizability import Operation, check_history

KEYS = ("a", "b", "c")
RECOVERED_WITHIN_S = 5.0  # kill -> a client's next acknowledged write (generous: CI load)
_values = itertools.count(1)


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    c = LocalCluster(workers=1, coordinators=3, spares_per_worker=0, restart=False)
    seen = set(c.pids())
    try:
        yield c
    finally:
        seen |= set(c.pids())
        c.close()
        deadline = time.monotonic() + 5
        while any(pid_alive(p) for p in seen) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in seen if pid_alive(p)], "processes left running"


async def _kv_loop(
    cluster: LocalCluster, client_id: int, stop: asyncio.Event, history: list[Operation]
) -> None:
    """Random puts, gets and swaps on a few shared keys; a failed call is an unknown outcome."""
    rng = random.Random(client_id)
    async with KvClient(cluster.paxos_addresses, token=cluster.token) as client:
        while not stop.is_set():
            key, value = rng.choice(KEYS), next(_values)
            kind = rng.choice(["put", "put", "get", "cas"])
            call = time.monotonic()
            try:
                if kind == "put":
                    await client.put(key, value)
                    op = Operation(client_id, "put", key, call, time.monotonic(), value=value)
                elif kind == "get":
                    got = await client.get(key)
                    op = Operation(client_id, "get", key, call, time.monotonic(), output=got)
                else:
                    expected = rng.choice([None, value - 1, value - 2])
                    ok = await client.cas(key, expected, value)
                    op = Operation(
                        client_id, "cas", key, call, time.monotonic(), value=value,
                        expected=expected, output=ok,
                    )  # fmt: skip
            except (LeptonError, OSError, TimeoutError):
                op = Operation(client_id, kind, key, call, None, value=value)
            history.append(op)
            await asyncio.sleep(rng.uniform(0, 0.003))


async def _kv_run(cluster: LocalCluster, clients: int) -> tuple[list[Operation], float]:
    history: list[Operation] = []
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        for i in range(clients):
            tg.create_task(_kv_loop(cluster, i, stop, history))
        try:
            await asyncio.sleep(0.5)
            killed_at = time.monotonic()
            await asyncio.to_thread(cluster.kill, "leader")
            await asyncio.sleep(RECOVERED_WITHIN_S + 1.0)
        finally:
            stop.set()
    async with KvClient(cluster.paxos_addresses, token=cluster.token) as reader:
        for key in KEYS:
            call = time.monotonic()
            got = await reader.get(key)
            history.append(Operation(99, "get", key, call, time.monotonic(), output=got))
    return history, killed_at


@pytest.mark.timeout(120)
def test_kv_clients_write_through_a_leader_kill_linearizably(cluster: LocalCluster) -> None:
    old = cluster.leader_id()
    clients = 3
    history, killed_at = asyncio.run(_kv_run(cluster, clients))
    assert cluster.leader_id() != old
    writes = [op for op in history if op.kind != "get" and op.ret is not None]
    assert sum(1 for op in writes if op.call < killed_at) >= 20, "too few writes before the kill"
    for client_id in range(clients):
        after = [
            op.ret for op in writes if op.client == client_id and op.ret and op.ret > killed_at
        ]
        assert after, f"client {client_id} acknowledged no write after the kill"
        assert min(after) - killed_at < RECOVERED_WITHIN_S
    # A write re-applied by the new leader after a later one (a retry not deduplicated)
    # or an acknowledged write lost would make the history non-linearizable.
    result = check_history(history)
    assert result.ok is True, f"{result.reason} ({len(history)} operations)"


@pytest.mark.timeout(120)
def test_kv_writer_loses_nothing_and_sees_no_error_through_a_leader_kill(
    cluster: LocalCluster,
) -> None:
    """``cluster.kv`` (the synchronous client) writing in a loop: the write in flight at
    the kill is retried on the new leader within the call, so the caller sees no error,
    every acknowledged write is there, and the newest value of a rewritten key wins."""
    acked: dict[str, int] = {}
    failed: list[str] = []
    stop = threading.Event()

    def writer() -> None:
        for i in itertools.count():
            if stop.is_set():
                return
            key = f"seq-{i}"
            try:
                cluster.kv.put(key, i)
                cluster.kv.put("last", i)  # the next put of "last" overwrites it
            except LeptonError:
                failed.append(key)
                continue
            acked[key] = i

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.5)
        before = len(acked)
        cluster.kill("leader")
        time.sleep(RECOVERED_WITHIN_S)
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
    assert len(acked) > before + 10, "the writer did not recover after the kill"
    assert not failed, f"writes failed instead of failing over: {failed}"
    for key, value in acked.items():
        assert cluster.kv.get(key) == value, key
    assert cluster.kv.get("last") == max(acked.values())  # no stale retry re-applied


@pytest.mark.timeout(120)
def test_job_submits_through_a_leader_kill_are_accepted_once(cluster: LocalCluster) -> None:
    task = lep.DistributedTask(cluster, progress=False)
    plan = task.parallelize([1], partitions=1).plan_bytes("count")
    options = JobOptions(name="failover-test")
    acked: list[tuple[str, float]] = []
    for _ in range(3):
        acked.append((cluster.submit_plan(plan, options), time.monotonic()))
    old = cluster.leader_id()
    killed_at = time.monotonic()
    cluster.kill("leader")
    # The client's pooled connection to the dead leader is the first thing it tries.
    for _ in range(3):
        acked.append((cluster.submit_plan(plan, options), time.monotonic()))
    assert acked[3][1] - killed_at < RECOVERED_WITHIN_S
    assert cluster.status()["leader"] != old
    assert cluster.leader_id() != old
    ids = [j["job_id"] for j in cluster.jobs() if j["name"] == "failover-test"]
    assert sorted(ids) == sorted(job_id for job_id, _ in acked)  # each there, once


def test_kv_client_fails_fast_when_nothing_listens_at_any_address() -> None:
    """Before any replica answered, every address refusing connections is a wrong address
    or a group not started: Unavailable at once, not after the whole deadline."""
    ports = []
    for _ in range(3):
        with socket.socket() as s:  # a port nothing listens on once closed
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    config = KvClientConfig(deadline_s=30.0)

    async def put() -> None:
        addresses = [f"127.0.0.1:{p}" for p in ports]
        async with KvClient(addresses, token="t" * 32, config=config) as client:
            await client.put("k", 1)

    start = time.monotonic()
    with pytest.raises(Unavailable, match="connection refused"):
        asyncio.run(put())
    assert time.monotonic() - start < 5.0
