"""Real replica processes on loopback: KV API, CLI, bad input, disk corruption, quorum loss."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from helpers import wait_until
from lepton_ai.consensus import cli as kv_cli
from lepton_ai.consensus.client import KvClientConfig
from lepton_ai.consensus.client_sync import KV
from lepton_ai.consensus.cluster import KvCluster, LauncherConfig
from lepton_ai.consensus.kv import KvConfig
from lepton_ai.consensus.peer_messages import Accept, Prepare
from lepton_ai.consensus.replica_disk import WAL_NAME
from lepton_ai.consensus.server import SERVER_CODEC
from lepton_ai.consensus.transport import PeerHello
from lepton_ai.errors import AuthError, Unavailable
from lepton_ai.wire import connect


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KvCluster]:
    root = tmp_path_factory.mktemp("kv")
    with KvCluster(3, data_dir=str(root), config=LauncherConfig(tick_s=0.02)) as c:
        c.leader()
        yield c


@pytest.mark.timeout(60)
def test_put_get_delete_cas_and_types(cluster: KvCluster) -> None:
    kv = cluster.kv
    kv.put("greeting", "hello")
    assert kv.get("greeting") == "hello"
    assert kv.cas("greeting", "hello", "bye")
    assert not kv.cas("greeting", "hello", "again")
    assert kv.get("greeting") == "bye"
    assert kv.delete("greeting")
    assert not kv.delete("greeting")
    assert kv.get("greeting", "absent") == "absent"
    assert kv.cas("fresh", None, {"n": [1, 2.5, b"\x00"]})
    assert kv.get("fresh") == {"n": [1, 2.5, b"\x00"]}
    with pytest.raises(TypeError):
        kv.put(1, "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        kv.put("k", None)
    with pytest.raises(TypeError):
        kv.put("k", object())


@pytest.mark.timeout(60)
def test_every_replica_redirects_to_the_leader(cluster: KvCluster) -> None:
    cluster.kv.put("redirect", 0)
    for address in cluster.addresses:  # a client that knows only one replica still works
        with KV([address], token=cluster.token) as kv:
            kv.put("redirect", address)
            assert kv.get("redirect") == address


@pytest.mark.timeout(60)
def test_cli_kv_and_cluster_status(cluster: KvCluster) -> None:
    env = {**os.environ, "LEPTON_TOKEN": cluster.token}
    base = [sys.executable, "-m", "lepton_ai.cli", "kv"]
    peers = ["--peers", cluster.peers]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*base, *args, *peers], check=False, env=env, capture_output=True, text=True, timeout=30
        )

    assert run("put", "cli-key", "v1").returncode == 0
    got = run("get", "cli-key")
    assert (got.returncode, got.stdout.strip()) == (0, "v1")
    assert run("cas", "cli-key", "wrong", "v2").returncode == 1
    assert run("cas", "cli-key", "v1", "v2").returncode == 0
    out = run("get", "cli-key", "--json")
    assert json.loads(out.stdout) == {"key": "cli-key", "found": True, "value": "v2"}
    assert run("delete", "cli-key").returncode == 0
    missing = run("get", "cli-key")
    assert missing.returncode == 1 and "not found" in missing.stderr
    bad = subprocess.run(
        [*base, "get", "k", "--peers", cluster.peers, "--token", "wrong-token"],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode != 0 and "token" in bad.stderr.lower()

    # `lepton cluster status` is mounted by the node layer; test our part of it directly.
    parser = argparse.ArgumentParser()
    register = parser.add_subparsers(dest="command")
    cluster_parser = register.add_parser("cluster").add_subparsers(dest="cluster_command")
    kv_cli.register_cluster_commands(cluster_parser)
    status = asyncio.run(kv_cli.collect_status(cluster.addresses, cluster.token))
    assert status["leader"] in cluster.replicas
    assert [r["health"] for r in status["replicas"]] == ["up"] * 3
    # Lag: how far each one's applied index is behind the highest commit index seen.
    top = max(r["commit_index"] for r in status["replicas"])
    assert [r["lag"] for r in status["replicas"]] == [
        top - r["applied_index"] for r in status["replicas"]
    ]
    args = parser.parse_args(["cluster", "status", "--peers", cluster.address, "--json"])
    args.token = cluster.token
    assert args.func(args) == 0


def _raw(address: str) -> socket.socket:
    host, _, port = address.rpartition(":")
    return socket.create_connection((host, int(port)), timeout=5)


def _closes(sock: socket.socket) -> bool:
    """True once the server has closed the connection (reads EOF or reset)."""
    sock.settimeout(5)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


@pytest.mark.timeout(90)
def test_garbage_oversized_and_wrong_token_leave_replica_unharmed(cluster: KvCluster) -> None:
    kv = cluster.kv
    kv.put("guarded", "original")
    leader = cluster.leader()
    target = cluster.replicas[leader]
    before = cluster.status()[leader]
    assert before is not None

    s = _raw(target.address)  # garbage before the handshake
    s.sendall(os.urandom(64))
    assert _closes(s)
    s = _raw(target.address)  # a 4 GiB frame announced before the handshake
    s.sendall(struct.pack(">I", 0xFFFFFFFF) + b"x" * 100)
    assert _closes(s)

    async def authenticated_abuse() -> None:
        with pytest.raises(AuthError):
            await connect("127.0.0.1", target.port, token="wrong", codec=SERVER_CODEC)
        conn = await connect("127.0.0.1", target.port, token=cluster.token, codec=SERVER_CODEC)
        conn.writer.write(struct.pack(">I", 12) + b"\xc1" * 12)  # undecodable frame
        assert await conn.reader.read() == b""
        conn = await connect("127.0.0.1", target.port, token=cluster.token, codec=SERVER_CODEC)
        conn.writer.write(struct.pack(">I", 2**31))  # oversized frame after the handshake
        assert await conn.reader.read() == b""
        # A peer claiming to be node 2 but signing as node 3: disconnected.
        conn = await connect("127.0.0.1", target.port, token=cluster.token, codec=SERVER_CODEC)
        await conn.send(PeerHello(2))
        await conn.send(Prepare(src=3, ballot=(1, 3), commit=0))
        assert await conn.reader.read() == b""
        # A confused peer with a stale ballot: refused by the core, nothing changes.
        other = next(n for n in cluster.replicas if n != leader)
        conn = await connect("127.0.0.1", target.port, token=cluster.token, codec=SERVER_CODEC)
        await conn.send(PeerHello(other))
        await conn.send(Accept(src=other, ballot=(0, other), first_slot=1, values=[], commit=0))
        await conn.send(Prepare(src=other, ballot=(0, other), commit=0))
        await asyncio.sleep(0.3)
        await conn.close()

    asyncio.run(authenticated_abuse())
    assert target.alive
    after = cluster.status()[leader]
    assert after is not None and after.role == "leader" and after.ballot == before.ballot
    assert kv.get("guarded") == "original"


@pytest.mark.timeout(90)
def test_corrupt_wal_record_mid_file_refuses_to_start(tmp_path: Path) -> None:
    with KvCluster(3, data_dir=str(tmp_path), config=LauncherConfig(tick_s=0.02)) as c:
        c.leader()
        for i in range(50):
            c.kv.put(f"k{i}", i)
        victim = next(n for n in c.replicas if n != c.leader())
        c.kill(victim)
        wal = c.replicas[victim].data_dir / WAL_NAME
        data = bytearray(wal.read_bytes())
        # The middle of the records, not of the file: with fsync on, the WAL keeps a
        # preallocated run of zero bytes after its last record.
        middle = len(bytes(data).rstrip(b"\0")) // 2
        data[middle] ^= 0xFF
        wal.write_bytes(bytes(data))
        with pytest.raises(Exception, match="exited with code 2"):
            c.restart(victim)
        log = c.log_tail(victim)
        assert "refusing to start" in log and str(wal) in log and "offset" in log
        assert wal.read_bytes() == bytes(data)  # refusing to start repairs nothing
        # The other two replicas are a quorum: the group keeps serving.
        c.kv.put("still", "serving")
        assert c.kv.get("k49") == 49


@pytest.mark.timeout(90)
def test_no_quorum_raises_unavailable_then_recovers(tmp_path: Path) -> None:
    config = KvClientConfig(deadline_s=2.0, attempt_timeout_s=0.5)
    with KvCluster(
        3, data_dir=str(tmp_path), config=LauncherConfig(tick_s=0.02), client_config=config
    ) as c:
        c.leader()
        c.kv.put("q", "before")
        leader = c.leader()
        followers = [n for n in c.replicas if n != leader]
        c.kill(followers[0])
        c.kill(followers[1])
        start = time.monotonic()
        with pytest.raises(Unavailable, match="no leader answered"):
            c.kv.put("q", "during")
        assert time.monotonic() - start < 6
        c.restart(followers[0])
        c.kv.put("q", "after")
        assert c.kv.get("q") == "after"


@pytest.mark.timeout(120)
def test_add_and_remove_a_replica(tmp_path: Path) -> None:
    """Replace a dead replica: add a fresh one, remove the dead one, keep every value."""
    with KvCluster(3, data_dir=str(tmp_path), config=LauncherConfig(tick_s=0.02)) as c:
        c.leader()
        for i in range(20):
            c.kv.put(f"m{i}", i)
        dead = next(n for n in c.replicas if n != c.leader())
        c.kill(dead)
        new = c.add_replica()
        c.remove_replica(dead)

        def caught_up() -> bool:
            st = c.status().get(new)
            return (
                st is not None
                and st.applied_index >= 20
                and sorted(st.members) == sorted(c.replicas)
            )

        wait_until(caught_up, 20.0, f"new replica {new} caught up and a member")
        # The group is now {others, new}: it survives losing one more original replica.
        c.kill(next(n for n in c.replicas if n not in (new, c.leader())))
        c.kv.put("after", "change")
        assert c.kv.get("after") == "change"
        assert c.kv.get("m19") == 19


@pytest.mark.timeout(60)
def test_concurrent_first_use_opens_one_connection_per_replica(
    cluster: KvCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """100 requests at once on a fresh client: one connection per replica, not one per
    request, and nothing left running after close (no "Task was destroyed")."""
    from lepton_ai.consensus import client as client_mod
    from lepton_ai.consensus import client_conns

    opened: list[tuple[str, int]] = []
    real_connect = client_conns.connect

    async def counting_connect(host: str, port: int, **kw: object) -> object:
        opened.append((host, port))
        return await real_connect(host, port, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(client_conns, "connect", counting_connect)

    async def run() -> None:
        kv = client_mod.KvClient(cluster.addresses, token=cluster.token)
        got = await asyncio.gather(*(kv.get("absent-key", i) for i in range(100)))
        assert got == list(range(100))
        await kv.close()
        others = asyncio.all_tasks() - {asyncio.current_task()}
        assert not others, others

    asyncio.run(run())
    assert len(opened) == len(set(opened)) <= len(cluster.addresses), opened


@pytest.mark.timeout(60)
def test_key_and_value_limits_are_the_replicas_and_fail_at_once(cluster: KvCluster) -> None:
    """A value of exactly ``value_bytes_max`` (MessagePack) is stored; one byte more, an
    empty key, a lone surrogate or a key past ``key_bytes_max`` fail at once naming why,
    and nothing is written."""
    kv = cluster.kv
    limit = KvConfig().value_bytes_max
    header = len(msgspec.msgpack.encode(b"\x00" * limit)) - limit  # bin 32: 5 bytes
    exact = b"\x01" * (limit - header)
    assert len(msgspec.msgpack.encode(exact)) == limit
    kv.put("big", exact)
    assert kv.get("big") == exact
    with pytest.raises(ValueError, match="value_bytes_max"):
        kv.put("big2", exact + b"\x01")
    with pytest.raises(ValueError, match="empty"):
        kv.put("", 1)
    with pytest.raises(ValueError, match="not valid Unicode"):
        kv.put("bad\ud800", 1)
    with pytest.raises(ValueError, match="key_bytes_max"):
        kv.put("k" * (KvConfig().key_bytes_max + 1), 1)
    with pytest.raises(ValueError, match="not valid Unicode"):
        kv.put("fine", "text\udfff")
    assert kv.get("big2") is None and kv.get("fine") is None
