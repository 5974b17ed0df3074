"""A standby coordinator replaces a hung voter; the removed one exits with EXIT_REMOVED.

Real processes, started with the ``lepton coordinator`` command: three voters and one
standby (``--standby``, id 100). A SIGSTOPped voter is removed after
``--replace-after-s`` and the standby promoted; a second voter is then SIGKILLed and the
group (two of three) still commits KV writes; the stopped voter, resumed, learns it was
removed, exits with code 3 and does not depose the leader.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from helpers import lepton, wait_until
from lepton_ai.consensus.client_sync import KV
from lepton_ai.heal.membership import EXIT_REMOVED
from lepton_ai.node.process import pid_alive

TOKEN = "standby-test-token"
STANDBY = 100
REPLACE_AFTER_S = 2.0


@dataclass
class Coord:
    node: int
    proc: subprocess.Popen[str]
    paxos: str
    client: str
    log: Path


def _listener() -> socket.socket:
    sock = socket.create_server(("127.0.0.1", 0), backlog=512)
    sock.set_inheritable(True)
    return sock


def _addr(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def _start(node: int, sock: socket.socket, peers: str, data: Path, *extra: str) -> Coord:
    cmd = [
        sys.executable,
        "-m",
        "lepton_ai.cli",
        "coordinator",
        *("--id", str(node), "--peers", peers, "--paxos-fd", str(sock.fileno())),
        *("--data-dir", str(data / f"c{node}"), "--token", TOKEN, "--no-fsync"),
        *("--replace-after-s", str(REPLACE_AFTER_S), *extra),
    ]
    log = data / f"c{node}.log"  # a file, not a pipe nobody drains
    with open(log, "w") as err:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=err, text=True, pass_fds=[sock.fileno()]
        )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # {"address": ..., "pid": ...} once bound
    assert line, log.read_text()
    return Coord(node, proc, _addr(sock), json.loads(line)["address"], log)


@contextlib.contextmanager
def _group(data: Path, standby: bool, *extra: str) -> Iterator[dict[int, Coord]]:
    """Three voters (0, 1, 2) and, with ``standby``, a standby (``STANDBY``)."""
    nodes = (0, 1, 2, STANDBY) if standby else (0, 1, 2)
    socks = {n: _listener() for n in nodes}
    voters = ",".join(f"{n}={_addr(socks[n])}" for n in (0, 1, 2))
    coords: dict[int, Coord] = {}
    try:
        for n in (0, 1, 2):
            coords[n] = _start(n, socks[n], voters, data, *extra)
        if standby:
            # As LocalCluster spawns it: --peers names the voters only; the standby's
            # own Paxos address is that of the socket it inherits (--paxos-fd).
            coords[STANDBY] = _start(STANDBY, socks[STANDBY], voters, data, "--standby")
        for sock in socks.values():
            sock.close()  # the children hold their own copies
        yield coords
    finally:
        for sock in socks.values():
            sock.close()
        for c in coords.values():
            if c.proc.poll() is None:
                os.kill(c.proc.pid, signal.SIGCONT)
                os.kill(c.proc.pid, signal.SIGKILL)
            c.proc.wait(10)
            if c.proc.stdout is not None:
                c.proc.stdout.close()
        assert not [c.proc.pid for c in coords.values() if pid_alive(c.proc.pid)]


@pytest.fixture
def group(tmp_path: Path) -> Iterator[dict[int, Coord]]:
    with _group(tmp_path, True) as coords:
        yield coords


# Coordinators start, hang and die under these tests: while waiting, any client or
# status error only means "not yet" (the last one is in the failure message).
NOT_YET = (Exception,)


def _leader(kv: KV, coords: dict[int, Coord], skip: set[int]) -> Any:
    """The Status of the replica that leads, as the live replicas report it."""
    for c in coords.values():
        if c.node in skip or c.proc.poll() is not None:
            continue
        st = kv.status(c.paxos, 1.0)
        if st.role == "leader":
            return st
    return None


def _events(coords: dict[int, Coord], leader: int) -> list[str]:
    out = lepton(
        "cluster", "events", "--json", "--address", coords[leader].client, "--token", TOKEN
    )
    assert out.returncode == 0, out.stderr
    return [f"{e['kind']}: {e.get('detail', '')}" for e in json.loads(out.stdout)["events"]]


def _status_members(coords: dict[int, Coord], leader: int) -> list[dict[str, Any]]:
    out = lepton(
        "cluster", "status", "--json", "--address", coords[leader].client, "--token", TOKEN
    )
    assert out.returncode == 0, out.stderr
    return [m for m in json.loads(out.stdout)["members"] if m["role"] == "coordinator"]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_standby_replaces_a_hung_voter_and_the_removed_one_exits(
    group: dict[int, Coord],
) -> None:
    paxos = [c.paxos for c in group.values()]
    with KV(",".join(paxos), token=TOKEN) as kv:

        def first_write() -> bool:
            kv.put("k0", 0)
            return True

        wait_until(first_write, 30, "a first write", ignore=NOT_YET)
        leader = wait_until(lambda: _leader(kv, group, set()), 20, "a leader", ignore=NOT_YET)
        # The standby shows up in the status, as a coordinator with health "standby".
        wait_until(
            lambda: any(
                m["id"] == str(STANDBY) and m["health"] == "standby"
                for m in _status_members(group, leader.node)
            ),
            20,
            "the standby in cluster status",
            ignore=NOT_YET,
        )
        hung = next(n for n in (0, 1, 2) if n != leader.node)
        os.kill(group[hung].proc.pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        want = sorted({0, 1, 2, STANDBY} - {hung})

        def replaced() -> bool:
            st = _leader(kv, group, {hung})
            return st is not None and sorted(st.members) == want

        wait_until(replaced, 25, "the standby promoted in place of the hung voter", ignore=NOT_YET)
        assert time.monotonic() - stopped_at >= REPLACE_AFTER_S
        leader = _leader(kv, group, {hung})
        events = _events(group, leader.node)
        assert any(e.startswith(f"coordinator_removed: coordinator {hung}") for e in events), events
        assert any(e.startswith(f"standby_promoted: standby {STANDBY}") for e in events), events

        # Another voter dies for good: the two that remain (one the promoted standby)
        # are a majority of three and still commit.
        killed = next(n for n in (0, 1, 2) if n not in (hung, leader.node))
        os.kill(group[killed].proc.pid, signal.SIGKILL)
        group[killed].proc.wait(10)
        for i in range(1, 6):
            kv.put(f"k{i}", i)
        assert kv.get("k5") == 5
        ballot = _leader(kv, group, {hung, killed}).ballot

        # The removed voter resumes: it learns it was removed and exits with code 3.
        os.kill(group[hung].proc.pid, signal.SIGCONT)
        code = group[hung].proc.wait(20)
        log = group[hung].log.read_text()
        assert code == EXIT_REMOVED, (code, log)
        assert "removed" in log and f"code {EXIT_REMOVED}" in log, log
        kv.put("after", 1)
        now = _leader(kv, group, {hung, killed})
        assert now is not None and now.ballot == ballot and now.node == leader.node


@pytest.mark.timeout(120)
def test_workers_and_clients_follow_the_advertised_leader_address(tmp_path: Path) -> None:
    """``--advertise`` is the address a leader sends workers and clients to (here
    ``localhost``, where the coordinators bind 127.0.0.1): a worker that joins one
    coordinator is redirected there and runs a job."""
    import lepton_ai as lep

    with _group(tmp_path, False, "--advertise", "localhost") as coords:
        for c in coords.values():
            assert c.client.startswith("localhost:"), c.client  # what each announced
        ports = [c.client.rpartition(":")[2] for c in coords.values()]
        joins = ",".join(f"127.0.0.1:{p}" for p in ports)
        worker = subprocess.Popen(
            [
                *(sys.executable, "-m", "lepton_ai.cli", "worker"),
                *("--join", f"127.0.0.1:{ports[0]}", "--slots", "1", "--token", TOKEN),
                *("--data-dir", str(tmp_path / "w")),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            with lep.connect(joins, token=TOKEN) as cluster:

                def addresses() -> list[str]:
                    st = cluster.status()
                    got = [m["address"] for m in st["members"] if m["role"] == "coordinator"]
                    return [st["leader"], *got] if all(got) and st["leader"] else []

                # Every coordinator's client address, the followers' too, as advertised.
                shown = wait_until(
                    addresses, 30, "a leader and every coordinator's address", ignore=NOT_YET
                )
                assert len(shown) == 4 and all(a.startswith("localhost:") for a in shown), shown
                wait_until(
                    lambda: any(m["role"] == "worker" for m in cluster.status()["members"]),
                    30,
                    "the worker, redirected to the leader",
                    ignore=NOT_YET,
                )
                task = lep.DistributedTask(cluster)
                assert task.parallelize(range(100), partitions=4).count() == 100
        finally:
            worker.kill()
            worker.wait(10)
