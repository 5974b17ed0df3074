"""Launch a group of KV replica processes on 127.0.0.1 (tests, benchmarks, ``LocalCluster``).

Ports: the launcher binds each replica's listening socket itself (port 0, so the
kernel picks a free one) and hands the open socket to the child (``--listen-fd``).
Every replica's address is therefore known before any child starts - each needs
all of them in ``--peers`` - and no port is ever guessed. On ``restart`` the same
port is bound again (SO_REUSEADDR) so the peers' address lists stay valid.

A child signals readiness by creating its ``--ready-file`` once it has recovered
its data directory and is serving. Every child is stopped by PID on ``stop``, on
``with``-exit and (as a last resort) at interpreter exit.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lepton_ai.consensus.client import KvClient, KvClientConfig
from lepton_ai.consensus.client_messages import Status
from lepton_ai.consensus.client_sync import KV
from lepton_ai.errors import LeptonError
from lepton_ai.wire import generate_token
from lepton_ai.wire.handshake import TOKEN_ENV

_LIVE: dict[int, subprocess.Popen[bytes]] = {}


def _kill_leftovers() -> None:
    for proc in list(_LIVE.values()):
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=2)


atexit.register(_kill_leftovers)


@dataclass(frozen=True)
class LauncherConfig:
    start_timeout_s: float = 30.0
    stop_timeout_s: float = 5.0
    poll_interval_s: float = 0.02
    fsync: bool = True
    tick_s: float = 0.02  # the replica's tick: elections time out after 10-20 ticks


class ReplicaProcess:
    """One replica child process and its fixed identity (id, port, data directory)."""

    def __init__(self, node: int, port: int, data_dir: Path) -> None:
        self.node = node
        self.port = port
        self.data_dir = data_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def ready_file(self) -> Path:
        return self.data_dir / "ready"

    @property
    def log_file(self) -> Path:
        return self.data_dir.parent / f"replica-{self.node}.log"


def _bind(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(512)
    return sock


class KvCluster:
    """N replica processes of ``python -m lepton_ai.consensus.server`` on loopback.

    ``with KvCluster(3) as c: c.kv.put("k", 1); c.kill(c.leader())`` - ids are 1..N.
    """

    def __init__(
        self,
        replicas: int = 3,
        *,
        data_dir: str | Path | None = None,
        token: str | None = None,
        config: LauncherConfig | None = None,
        client_config: KvClientConfig | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        self.config = config or LauncherConfig()
        self.token = token or generate_token()
        self._own_dir = data_dir is None
        self.root = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="lepton-kv-"))
        self._client_config = client_config
        self._extra_args = list(extra_args)
        self._kv: KV | None = None
        self._joining: set[int] = set()
        self.replicas: dict[int, ReplicaProcess] = {}
        sockets: dict[int, socket.socket] = {}
        try:
            for node in range(1, replicas + 1):
                sockets[node] = _bind(0)
                port = sockets[node].getsockname()[1]
                self.replicas[node] = ReplicaProcess(node, port, self.root / f"replica-{node}")
        finally:
            for sock in sockets.values():
                sock.close()

    # -- lifecycle ------------------------------------------------------------------
    def __enter__(self) -> KvCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> KvCluster:
        try:
            for node in self.replicas:
                self._spawn(node)
            for node in self.replicas:
                self.wait_ready(node)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self._kv is not None:
            self._kv.close()
            self._kv = None
        for node in self.replicas:
            self._terminate(node)
        if self._own_dir:
            shutil.rmtree(self.root, ignore_errors=True)

    @property
    def addresses(self) -> list[str]:
        return [r.address for r in self.replicas.values()]

    @property
    def address(self) -> str:
        return ",".join(self.addresses)

    @property
    def peers(self) -> str:
        return ",".join(f"{r.node}={r.address}" for r in self.replicas.values())

    @property
    def kv(self) -> KV:
        if self._kv is None:
            self._kv = KV(self.addresses, token=self.token, config=self._client_config)
        return self._kv

    def pid(self, node: int) -> int | None:
        return self.replicas[node].pid

    # -- faults -----------------------------------------------------------------------
    def kill(self, node: int, sig: int = signal.SIGKILL) -> None:
        replica = self.replicas[node]
        if replica.proc is None or replica.proc.poll() is not None:
            return
        os.kill(replica.proc.pid, sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            if replica.paused:
                os.kill(replica.proc.pid, signal.SIGCONT)
            replica.proc.wait(timeout=self.config.stop_timeout_s)
            _LIVE.pop(replica.proc.pid, None)
            replica.paused = False

    def pause(self, node: int) -> None:
        replica = self.replicas[node]
        if replica.alive and replica.proc is not None:
            os.kill(replica.proc.pid, signal.SIGSTOP)
            replica.paused = True

    def resume(self, node: int) -> None:
        replica = self.replicas[node]
        if replica.alive and replica.proc is not None:
            os.kill(replica.proc.pid, signal.SIGCONT)
            replica.paused = False

    def restart(self, node: int, *, wait: bool = True) -> None:
        """Kill ``node`` if it runs, then start it again on the same port and data."""
        self.kill(node)
        self._spawn(node)
        if wait:
            self.wait_ready(node)

    # -- membership --------------------------------------------------------------------
    def add_replica(self) -> int:
        """Start a new replica (``--join``) and commit its addition; returns its node id."""
        node = max(self.replicas) + 1
        sock = _bind(0)
        port = sock.getsockname()[1]
        sock.close()
        self.replicas[node] = ReplicaProcess(node, port, self.root / f"replica-{node}")
        self._joining.add(node)
        self._spawn(node)
        self.wait_ready(node)
        asyncio.run(self._change(add=True, node=node, address=self.replicas[node].address))
        return node

    def remove_replica(self, node: int) -> None:
        """Commit the removal of ``node``, then stop its process."""
        asyncio.run(self._change(add=False, node=node, address=""))
        self._terminate(node)
        del self.replicas[node]
        if self._kv is not None:  # its address list changed
            self._kv.close()
            self._kv = None

    async def _change(self, *, add: bool, node: int, address: str) -> None:
        async with KvClient(
            [r.address for n, r in self.replicas.items() if n != node or not add],
            token=self.token,
            config=self._client_config,
        ) as client:
            await client.change_members(add=add, node=node, address=address)

    # -- observation ----------------------------------------------------------------
    def status(self, timeout_s: float = 2.0) -> dict[int, Status | None]:
        out: dict[int, Status | None] = {}
        for node, replica in self.replicas.items():
            if not replica.alive or replica.paused:
                out[node] = None
                continue
            try:
                out[node] = self.kv.status(replica.address, timeout_s)
            except (OSError, TimeoutError, LeptonError):
                out[node] = None
        return out

    def leader(self, timeout_s: float = 15.0) -> int:
        """The node id a quorum-backed leader reports, waiting up to ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for node, st in self.status(timeout_s=1.0).items():
                if st is not None and st.role == "leader":
                    return node
            time.sleep(0.05)
        raise LeptonError(f"no leader elected within {timeout_s:g}s")

    def log_tail(self, node: int, lines: int = 30) -> str:
        path = self.replicas[node].log_file
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    # -- internals -------------------------------------------------------------------
    def command(self, node: int, listen_fd: int | None = None) -> list[str]:
        replica = self.replicas[node]
        cmd = [
            sys.executable,
            "-m",
            "lepton_ai.consensus.server",
            "--id",
            str(node),
            "--peers",
            self.peers,
            "--data-dir",
            str(replica.data_dir),
            "--ready-file",
            str(replica.ready_file),
            "--tick-s",
            str(self.config.tick_s),
            "--fsync" if self.config.fsync else "--no-fsync",
        ]
        if listen_fd is not None:
            cmd += ["--listen-fd", str(listen_fd)]
        if node in self._joining:
            cmd.append("--join")
        return cmd + self._extra_args

    def _spawn(self, node: int) -> None:
        replica = self.replicas[node]
        replica.data_dir.mkdir(parents=True, exist_ok=True)
        replica.ready_file.unlink(missing_ok=True)
        sock = _bind(replica.port)
        try:
            fd = sock.fileno()
            with open(replica.log_file, "ab") as log:
                replica.proc = subprocess.Popen(
                    self.command(node, fd),
                    # The token goes in the environment, not argv (argv is public in ps).
                    env={**os.environ, TOKEN_ENV: self.token},
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    pass_fds=(fd,),
                    start_new_session=True,
                )
        finally:
            # The child has its own copy; ours would keep accepting into a dead backlog.
            sock.close()
        _LIVE[replica.proc.pid] = replica.proc
        replica.paused = False

    def wait_ready(self, node: int) -> None:
        replica = self.replicas[node]
        deadline = time.monotonic() + self.config.start_timeout_s
        while not replica.ready_file.exists():
            if replica.proc is None or replica.proc.poll() is not None:
                raise LeptonError(
                    f"replica {node} exited with code "
                    f"{replica.proc.returncode if replica.proc else None}:\n{self.log_tail(node)}"
                )
            if time.monotonic() > deadline:
                raise LeptonError(f"replica {node} not ready after {self.config.start_timeout_s}s")
            time.sleep(self.config.poll_interval_s)

    def _terminate(self, node: int) -> None:
        replica = self.replicas[node]
        proc = replica.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
                if replica.paused:
                    os.kill(proc.pid, signal.SIGCONT)
            try:
                proc.wait(timeout=self.config.stop_timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=self.config.stop_timeout_s)
        _LIVE.pop(proc.pid, None)
        replica.paused = False
