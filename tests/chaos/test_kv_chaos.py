"""Real replica processes under faults: every recorded client history must be linearizable.

Several concurrent clients (each its own session and connections) run random
put/get/cas/delete operations on a few keys while replicas are SIGKILLed and
restarted, SIGSTOPped and resumed, or all killed at once. An operation that raises
(timeout, Unavailable) is recorded with an unknown outcome. At the end a fresh
client reads every key; those reads are part of the history, so an acknowledged
write that was lost makes the history non-linearizable.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Awaitable, Callable

import pytest

from lepton_ai.consensus.client import KvClient, KvClientConfig
from lepton_ai.consensus.cluster import KvCluster, LauncherConfig
from lepton_ai.errors import LeptonError
from lepton_ai.sim.linearizability import Operation, check_history

KEYS = ("a", "b", "c")
_values = itertools.count(1)


async def _client_loop(
    cluster: KvCluster, client_id: int, stop: asyncio.Event, history: list[Operation], seed: int
) -> None:
    rng = random.Random(seed)
    config = KvClientConfig(deadline_s=6.0, attempt_timeout_s=1.0)
    async with KvClient(cluster.addresses, token=cluster.token, config=config) as client:
        while not stop.is_set():
            key = rng.choice(KEYS)
            kind = rng.choices(["put", "get", "cas", "delete"], weights=[4, 4, 2, 1])[0]
            value = next(_values)
            call = time.monotonic()
            try:
                if kind == "put":
                    await client.put(key, value)
                    op = Operation(client_id, "put", key, call, time.monotonic(), value=value)
                elif kind == "get":
                    got = await client.get(key)
                    op = Operation(client_id, "get", key, call, time.monotonic(), output=got)
                elif kind == "delete":
                    await client.delete(key)
                    op = Operation(client_id, "delete", key, call, time.monotonic())
                else:
                    expected = await _guess(client, key, rng)
                    call = time.monotonic()
                    try:
                        ok = await client.cas(key, expected, value)
                    except (LeptonError, OSError, TimeoutError):
                        history.append(
                            Operation(
                                client_id, "cas", key, call, None, value=value, expected=expected
                            )
                        )
                        continue
                    op = Operation(
                        client_id, "cas", key, call, time.monotonic(), value=value,
                        expected=expected, output=ok,
                    )  # fmt: skip
            except (LeptonError, OSError, TimeoutError):
                op = Operation(client_id, kind, key, call, None, value=value)
            history.append(op)
            await asyncio.sleep(rng.uniform(0, 0.004))


async def _guess(client: KvClient, key: str, rng: random.Random) -> object:
    """A cas expectation that is right often enough to make successful swaps likely."""
    if rng.random() < 0.2:
        return None
    try:
        return await client.get(key)
    except (LeptonError, OSError, TimeoutError):
        return None


async def _final_reads(cluster: KvCluster, history: list[Operation]) -> None:
    config = KvClientConfig(deadline_s=20.0)
    async with KvClient(cluster.addresses, token=cluster.token, config=config) as client:
        for key in KEYS:
            call = time.monotonic()
            got = await client.get(key)
            history.append(Operation(999, "get", key, call, time.monotonic(), output=got))


async def _run_with_faults(
    cluster: KvCluster,
    faults: Callable[[], Awaitable[None]],
    clients: int = 4,
) -> list[Operation]:
    history: list[Operation] = []
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        for i in range(clients):
            tg.create_task(_client_loop(cluster, i, stop, history, seed=1000 + i))
        try:
            await faults()
        finally:
            stop.set()
    await _final_reads(cluster, history)
    return history


def _assert_linearizable(history: list[Operation], min_acked: int) -> None:
    acked = [op for op in history if op.ret is not None and op.kind != "get"]
    assert len(acked) >= min_acked, f"only {len(acked)} acknowledged writes"
    result = check_history(history)
    unknown = sum(1 for op in history if op.ret is None)
    print(f"{len(history)} ops, {len(acked)} acked writes, {unknown} unknown, {result.steps} steps")
    assert result.ok is True, f"{result.reason} ({len(history)} operations)"


def _cluster(n: int, tmp_path: object) -> KvCluster:
    return KvCluster(n, data_dir=str(tmp_path), config=LauncherConfig(fsync=True, tick_s=0.02))


@pytest.mark.timeout(120)
def test_leader_sigkilled_and_restarted_repeatedly_3(tmp_path: object) -> None:
    with _cluster(3, tmp_path) as cluster:
        cluster.leader()

        async def faults() -> None:
            await asyncio.sleep(0.8)
            for _ in range(3):
                leader = await asyncio.to_thread(cluster.leader)
                await asyncio.to_thread(cluster.kill, leader)
                await asyncio.sleep(0.8)
                await asyncio.to_thread(cluster.restart, leader)
                await asyncio.sleep(0.6)

        history = asyncio.run(_run_with_faults(cluster, faults))
        _assert_linearizable(history, min_acked=50)


@pytest.mark.timeout(120)
def test_leader_sigstopped_and_resumed_5(tmp_path: object) -> None:
    """A paused leader is deposed; when it wakes up its stale leadership must not win."""
    with _cluster(5, tmp_path) as cluster:
        cluster.leader()

        async def faults() -> None:
            await asyncio.sleep(0.8)
            leader = await asyncio.to_thread(cluster.leader)
            cluster.pause(leader)
            await asyncio.sleep(1.5)
            cluster.resume(leader)
            await asyncio.sleep(0.8)
            # and a follower, then two replicas killed at once (a 5-group tolerates 2)
            follower = next(n for n in cluster.replicas if n != leader)
            cluster.pause(follower)
            await asyncio.sleep(0.8)
            cluster.resume(follower)
            leader = await asyncio.to_thread(cluster.leader)
            other = next(n for n in cluster.replicas if n != leader)
            await asyncio.to_thread(cluster.kill, leader)
            await asyncio.to_thread(cluster.kill, other)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(cluster.restart, leader)
            await asyncio.to_thread(cluster.restart, other)
            await asyncio.sleep(0.5)

        history = asyncio.run(_run_with_faults(cluster, faults))
        _assert_linearizable(history, min_acked=50)


@pytest.mark.timeout(120)
def test_whole_cluster_killed_and_restarted_keeps_acknowledged_writes(tmp_path: object) -> None:
    with _cluster(3, tmp_path) as cluster:
        cluster.leader()

        async def faults() -> None:
            await asyncio.sleep(1.0)
            for node in cluster.replicas:
                await asyncio.to_thread(cluster.kill, node)
            await asyncio.sleep(0.3)
            for node in cluster.replicas:
                await asyncio.to_thread(cluster.restart, node, wait=False)
            for node in cluster.replicas:
                await asyncio.to_thread(cluster.wait_ready, node)
            await asyncio.sleep(1.0)

        history = asyncio.run(_run_with_faults(cluster, faults))
        _assert_linearizable(history, min_acked=30)
        # Every value acknowledged before the crash is still readable after it.
        kv = cluster.kv
        kv.put("after-restart", 1)
        assert kv.get("after-restart") == 1
