"""ReplicaHost as a LogHost with a custom state machine (what the coordinator will run on).

Three replicas in one event loop on loopback TCP: submit orders commands, only the
leader accepts them (NotLeader elsewhere, naming the leader), read_barrier makes a
local read linearizable, on_leadership reports changes, and a restarted replica
recovers its state from its WAL.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from helpers import wait_until_async
from lepton_ai.consensus.log_host import LogHost, NotLeader
from lepton_ai.consensus.server import ReplicaHost, ReplicaOptions


class Counter:
    """A tiny deterministic state machine: each command adds its integer value."""

    def __init__(self) -> None:
        self.total = 0
        self.applied = 0

    def apply(self, command: bytes) -> bytes:
        self.total += int(command)
        self.applied += 1
        return str(self.total).encode()

    def snapshot(self) -> bytes:
        return f"{self.total},{self.applied}".encode()

    def restore(self, data: bytes) -> None:
        total, applied = data.decode().split(",")
        self.total, self.applied = int(total), int(applied)


def _ports(n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        socks.append(s)
    return socks


async def _leader(hosts: dict[int, ReplicaHost], timeout_s: float = 10.0) -> ReplicaHost:
    def single() -> list[ReplicaHost] | None:
        leaders = [h for h in hosts.values() if h.log.is_leader]
        return leaders if len(leaders) == 1 else None

    return (await wait_until_async(single, timeout_s, "a single leader", interval_s=0.02))[0]


@pytest.mark.timeout(60)
def test_replica_host_is_a_log_host(tmp_path: Path) -> None:
    async def scenario() -> None:
        socks = _ports(3)
        peers = {i + 1: f"127.0.0.1:{s.getsockname()[1]}" for i, s in enumerate(socks)}
        machines = {n: Counter() for n in peers}
        options = ReplicaOptions(fsync=False, tick_s=0.01, snapshot_entries=50)

        def make_host(n: int, machine: Counter, sock: socket.socket) -> ReplicaHost:
            return ReplicaHost(
                n,
                peers,
                tmp_path / f"r{n}",
                token="t",
                state_machine=machine,
                options=options,
                listen_sock=sock,
            )

        hosts = {n: make_host(n, machines[n], socks[n - 1]) for n in peers}
        changes: list[tuple[int, bool]] = []
        try:
            for n, host in hosts.items():
                await host.start()
                host.log.on_leadership(lambda leading, n=n: changes.append((n, leading)))
            leader = await _leader(hosts)
            log: LogHost = leader.log  # the protocol the coordinator programs against
            assert log.leader_address == leader.address
            results = [await log.submit(b"1") for _ in range(120)]  # crosses 2 snapshots
            assert results[-1] == b"120"
            await log.read_barrier()
            assert machines[leader.node_id].total == 120
            follower = next(h for h in hosts.values() if h is not leader)
            with pytest.raises(NotLeader) as info:
                await follower.log.submit(b"5")
            assert info.value.leader == leader.address
            assert (leader.node_id, True) in changes
            # Concurrent submits are all applied exactly once, in one order everywhere.
            await asyncio.gather(*(log.submit(b"2") for _ in range(200)))
            await log.read_barrier()
            assert machines[leader.node_id].total == 520
            # Restart a follower from its WAL + snapshot: it recovers the same state.
            await follower.close()
            fresh = Counter()
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", int(follower.address.rpartition(":")[2])))
            sock.listen(64)
            hosts[follower.node_id] = make_host(follower.node_id, fresh, sock)
            await hosts[follower.node_id].start()
            await log.submit(b"3")
            await wait_until_async(
                lambda: fresh.total == 523, 10.0, "the restarted follower at 523"
            )
            assert fresh.applied == machines[leader.node_id].applied
        finally:
            for host in hosts.values():
                await host.close()

    asyncio.run(scenario())


@pytest.mark.timeout(60)
def test_lagging_replica_catches_up_by_snapshot_install(tmp_path: Path) -> None:
    """A replica down while the others compact past it receives InstallSnapshot."""

    async def scenario() -> None:
        socks = _ports(3)
        peers = {i + 1: f"127.0.0.1:{s.getsockname()[1]}" for i, s in enumerate(socks)}
        machines = {n: Counter() for n in peers}
        options = ReplicaOptions(
            fsync=False, tick_s=0.01, snapshot_entries=20, log_retain_entries=5
        )
        hosts = {
            n: ReplicaHost(
                n,
                peers,
                tmp_path / f"r{n}",
                token="t",
                state_machine=machines[n],
                options=options,
                listen_sock=socks[n - 1],
            )
            for n in peers
        }
        try:
            for host in hosts.values():
                await host.start()
            leader = await _leader(hosts)
            lagging = next(h for h in hosts.values() if h is not leader)
            await lagging.close()
            for _ in range(100):
                await leader.log.submit(b"1")
            assert leader.log.core.log.snapshot.slot >= 60  # compacted well past the gap
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", int(lagging.address.rpartition(":")[2])))
            sock.listen(64)
            fresh = Counter()
            hosts[lagging.node_id] = ReplicaHost(
                lagging.node_id,
                peers,
                tmp_path / f"r{lagging.node_id}",
                token="t",
                state_machine=fresh,
                options=options,
                listen_sock=sock,
            )
            await hosts[lagging.node_id].start()
            await leader.log.submit(b"1")
            await wait_until_async(lambda: fresh.total == 101, 10.0, "the lagging one at 101")
            assert hosts[lagging.node_id].log.storage.snapshot_slot >= 60
        finally:
            for host in hosts.values():
                await host.close()

    asyncio.run(scenario())
