"""A lepton cluster on a ``NetBed``: the real ``lepton coordinator`` and ``lepton worker``
programs, one host each, started with ``ip netns exec``.

    bed = NetBed(5)
    cluster = BedCluster(bed, coordinators=3, workers=2, data_dir=tmp)
    lc = cluster.connect()                  # lep.connect("10.77.K.1:7100,...", token=...)
    cluster.leader_host()                   # which host leads (from the Paxos status)
    cluster.kill_host(0); cluster.start_host(0)

Hosts 0..coordinators-1 run one coordinator each (``--host`` its own address, fixed
ports, so a restarted one comes back where its peers and the workers expect it);
the next ``workers`` hosts run one worker agent each, joined to every coordinator.
Each program writes to ``<data_dir>/h<i>.log``; its data lives in ``<data_dir>/h<i>``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from lepton_ai.errors import LeptonError
from lepton_ai.node.process import Lifeline
from lepton_ai.wire import generate_token

from .netbed import NetBed

CLIENT_PORT = 7100  # every coordinator's client port (each host has its own address)
PAXOS_PORT = 7200
HTTP_PORT = 7300
READY_TIMEOUT_S = 60.0  # the whole cluster registered, executors started
STATUS_TIMEOUT_S = 1.5  # one replica's Paxos status query


@dataclass(frozen=True)
class BedConfig:
    coordinators: int = 3
    workers: int = 2
    slots: int = 1  # executors per worker
    spares: int = 0  # warm spares cost ~20 MB and a start each: none on 2 cores
    fsync: bool = False  # SIGKILL (not power loss) keeps the page cache: fsync buys nothing


class BedCluster:
    def __init__(self, bed: NetBed, data_dir: str | Path, config: BedConfig | None = None) -> None:
        self.bed = bed
        self.config = config or BedConfig()
        if self.config.coordinators + self.config.workers > len(bed.hosts):
            raise ValueError("more programs than hosts")
        self.data_dir = Path(data_dir)
        self.token = generate_token()
        n = self.config.coordinators
        self.coordinator_hosts = list(range(n))
        self.worker_hosts = list(range(n, n + self.config.workers))
        addr = [bed.hosts[i].address for i in self.coordinator_hosts]
        self.client_addresses = [f"{a}:{CLIENT_PORT}" for a in addr]
        self.paxos_addresses = [f"{a}:{PAXOS_PORT}" for a in addr]
        self._logs: dict[int, IO[bytes]] = {}
        self._lines: dict[int, Lifeline] = {}
        self.starts: dict[int, int] = {}  # host -> how many times its program was started
        for i in self.coordinator_hosts + self.worker_hosts:
            self.start_host(i)

    @property
    def address(self) -> str:
        """What ``lep.connect`` takes: every coordinator's client address."""
        return ",".join(self.client_addresses)

    def _argv(self, i: int) -> list[str]:
        data = str(self.data_dir / f"h{i}")
        host = self.bed.hosts[i]
        if i in self.coordinator_hosts:
            peers = ",".join(f"{j}={a}" for j, a in enumerate(self.paxos_addresses))
            argv = ["lepton_ai.node.coordinator", "--host", host.address]
            argv += ["--port", str(CLIENT_PORT), "--http-port", str(HTTP_PORT)]
            argv += ["--id", str(i), "--peers", peers, "--data-dir", data, "--quiet"]
        else:
            argv = ["lepton_ai.node.worker", "--join", self.address, "--name", f"h{i}"]
            argv += ["--slots", str(self.config.slots), "--spares", str(self.config.spares)]
            argv += ["--serve-slots", "0", "--data-dir", data, "--quiet"]
        if not self.config.fsync:
            argv.append("--no-fsync")
        return [sys.executable, "-m", *argv]

    def start_host(self, i: int) -> int:
        """Start host ``i``'s program (again); its pid. Tied to this process by a
        lifeline pipe and PDEATHSIG, so nothing outlives a crashed test run."""
        env = dict(os.environ)
        env["LEPTON_TOKEN"] = self.token
        env.setdefault("LEPTON_LOG_LEVEL", "WARNING")
        old = self._lines.pop(i, None)
        if old is not None:
            old.cut()
        line = Lifeline()
        env.update(line.child_env())
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if i not in self._logs:
            self._logs[i] = open(self.data_dir / f"h{i}.log", "ab")  # noqa: SIM115
        try:
            proc = self.bed.spawn(i, self._argv(i), env, self._logs[i], (line.read_fd,))
        finally:
            line.after_spawn()
        self._lines[i] = line
        self.starts[i] = self.starts.get(i, 0) + 1
        return proc.pid

    def kill_host(self, i: int) -> list[int]:
        return self.bed.kill_host(i)

    def restart_host(self, i: int) -> int:
        self.bed.kill_host(i)
        return self.start_host(i)

    # -- observation ---------------------------------------------------------------
    def connect(self, addresses: list[str] | None = None) -> Any:
        """A cluster handle (``lep.connect``) on ``addresses`` (default: every coordinator)."""
        import lepton_ai as lep

        return lep.connect(",".join(addresses or self.client_addresses), token=self.token)

    def paxos_status(self, i: int) -> Any:
        """Host ``i``'s coordinator's Paxos status (role, leader, commit/applied index),
        None when it does not answer in time (paused, cut off, dead)."""
        from lepton_ai.consensus.client_sync import KV

        with (
            KV(self.paxos_addresses[i], token=self.token) as kv,
            contextlib.suppress(LeptonError, OSError, TimeoutError),
        ):
            return kv.status(self.paxos_addresses[i], STATUS_TIMEOUT_S)
        return None

    def leader_host(self, among: list[int] | None = None) -> int | None:
        """The host whose coordinator says it leads (asked each of ``among``)."""
        for i in among if among is not None else self.coordinator_hosts:
            status = self.paxos_status(i)
            if status is not None and status.role == "leader":
                return i
        return None

    def wait_leader(self, among: list[int], timeout_s: float, exclude: int | None = None) -> int:
        """The first host of ``among`` (not ``exclude``) to lead within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            leader = self.leader_host([i for i in among if i != exclude])
            if leader is not None:
                return leader
            time.sleep(0.05)
        raise TimeoutError(f"no leader among hosts {among} within {timeout_s} s")

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Until every worker is registered with its executors started."""
        from lepton_ai.node.member_status import ready_workers

        deadline = time.monotonic() + timeout_s
        ready = 0
        while time.monotonic() < deadline:
            with contextlib.suppress(LeptonError, OSError), self.connect() as lc:
                info = lc._cluster_info(self.config.workers, 5.0)
                ready = ready_workers(info.members)
                if ready >= self.config.workers:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"only {ready} of {self.config.workers} workers ready")

    def close(self) -> None:
        for line in self._lines.values():
            line.cut()
        for i in list(self._logs):
            self._logs.pop(i).close()


CONVERGE_TIMEOUT_S = 30.0


def converged(cluster: BedCluster, timeout_s: float = CONVERGE_TIMEOUT_S) -> dict[str, Any]:
    """Wait until every coordinator answers, names the same leader under the same ballot
    and has applied the log up to where the most advanced one had committed when we
    started waiting (so each caught up past everything of the partition); a summary.
    TimeoutError, with the last statuses, if that does not happen in ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    target: int | None = None
    statuses: list[Any] = []
    while time.monotonic() < deadline:
        statuses = [cluster.paxos_status(i) for i in cluster.coordinator_hosts]
        live = [s for s in statuses if s is not None]
        if target is None and len(live) == len(statuses):
            target = max(s.commit_index for s in live)
        views = {(s.leader, s.ballot) for s in live}
        if (
            target is not None
            and len(live) == len(statuses)
            and len(views) == 1
            and None not in {s.leader for s in live}
            and min(s.applied_index for s in live) >= target
        ):
            leader, ballot = views.pop()
            return {"leader": leader, "ballot": ballot, "applied_at_least": target}
        time.sleep(0.1)
    seen = [None if s is None else (s.role, s.leader, s.ballot, s.applied_index) for s in statuses]
    raise TimeoutError(f"coordinators did not converge in {timeout_s} s: {seen}")
