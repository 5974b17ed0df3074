"""Linux network namespaces as hosts: a bridge, one veth per host, faults by policy rules.

    with NetBed(5) as bed:                  # hosts 0..4 at 10.77.K.1..5, the test at .254
        proc = bed.spawn(0, [sys.executable, "-m", "..."], env, log_path)
        bed.block(src=0, dst=1)             # packets from host 0 dropped on arrival at host 1
        bed.partition([0], [1, 2])          # both ways between the two groups
        bed.isolate_client(2)               # the test process can no longer reach host 2
        bed.heal()                          # every rule removed
        bed.kill_host(0); bed.pause_host(1); bed.resume_host(1)

Why policy rules and not routes: a ``blackhole`` route makes the *sender's* kernel fail
``connect()`` at once (EINVAL), which no real partition does. An ``ip rule ... iif eth0
from SRC blackhole`` in the receiving namespace drops SRC's packets on arrival, silently:
SYNs and segments vanish, connections time out, established ones stall, exactly like a
cut cable or a dead switch port. The rule must come before the ``local`` table (which
normally sits at priority 0), so each namespace moves that rule to ``LOCAL_RULE_PREF``.
This needs only ``ip`` (iproute2): no iptables/nft, no tc modules (this kernel has no
netem nor ``act_gact``).

Names carry a prefix and the creating process's pid (``lnb<pid hex>x<seq>``), so beds
of parallel runs never collide, and ``clean_leftovers()`` removes those whose creator
is dead (a run that was SIGKILLed) without touching a live run's.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import itertools
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

IP = "/usr/sbin/ip" if os.path.exists("/usr/sbin/ip") else "ip"
PREFIX = "lnb"  # every namespace ("lnb-...") and link ("lnb...") a bed creates
SUBNET_BASE = "10.77"  # beds use 10.77.K.0/24, K the lowest not on any interface
CLIENT_HOST = 254  # the root namespace's (the test process's) address on the bridge
HOSTS_MAX = 32  # bounds the per-host rule and address space
LOCAL_RULE_PREF = 1000  # where the ``local`` table lookup moves to (after our drop rules)
DROP_RULE_PREF = 100  # drop rules go before it
CMD_TIMEOUT_S = 10.0  # one ``ip`` command
STOP_WAIT_S = 5.0  # for the killed processes of a host to be reaped
LOCK_PATH = "/tmp/lepton-netbed.lock"  # serialises subnet choice between runs
_seq = itertools.count(1)


class NetBedError(RuntimeError):
    """An ``ip`` command failed (its stderr is in the message)."""


def ip(*args: str, check: bool = True) -> str:
    """Run ``ip ARGS``; its stdout. Raises NetBedError on failure when ``check``."""
    done = subprocess.run(
        [IP, *args], capture_output=True, text=True, timeout=CMD_TIMEOUT_S, check=False
    )
    if check and done.returncode != 0:
        raise NetBedError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def available() -> str:
    """ "" when beds can be built here, else why not (the tests skip with it)."""
    if os.geteuid() != 0:
        return "network-namespace tests need root (ip netns add)"
    try:
        ip("netns", "list")
    except (OSError, NetBedError, subprocess.TimeoutExpired) as exc:
        return f"ip netns is unavailable: {exc}"
    return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner(name: str) -> int | None:
    """The creating pid encoded in a bed's namespace or link name."""
    match = re.match(rf"{PREFIX}-?([0-9a-f]+)x", name)
    return int(match.group(1), 16) if match else None


def namespace_pids(ns: str) -> list[int]:
    """Every process in namespace ``ns`` (what ``kill_host`` and teardown signal)."""
    out = ip("netns", "pids", ns, check=False)
    return [int(p) for p in out.split() if p.isdigit()]


def _remove_namespace(ns: str) -> None:
    for pid in namespace_pids(ns):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    ip("netns", "del", ns, check=False)


def clean_leftovers() -> list[str]:
    """Remove namespaces and links of beds whose creating process is gone; their names."""
    removed: list[str] = []
    for line in ip("netns", "list").splitlines():
        ns = line.split()[0] if line.split() else ""
        owner = _owner(ns) if ns.startswith(PREFIX + "-") else None
        if owner is not None and not _pid_alive(owner):
            _remove_namespace(ns)
            removed.append(ns)
    for line in ip("-o", "link", "show").splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        owner = _owner(name) if name.startswith(PREFIX) else None
        if owner is not None and not _pid_alive(owner):
            ip("link", "del", name, check=False)
            removed.append(name)
    return removed


def _free_subnet() -> int:
    """The lowest K with no address in 10.77.K.0/24 on any interface of the root namespace."""
    used = set(re.findall(rf"inet {re.escape(SUBNET_BASE)}\.(\d+)\.", ip("-o", "-4", "addr")))
    for k in range(256):
        if str(k) not in used:
            return k
    raise NetBedError(f"no free {SUBNET_BASE}.K.0/24 subnet")


@dataclass
class Host:
    index: int
    ns: str  # network namespace name
    veth: str  # root side of its veth pair (on the bridge)
    address: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)


class NetBed:
    """N hosts (network namespaces) on one bridge; the root namespace is the client."""

    def __init__(self, hosts: int) -> None:
        if not 1 <= hosts <= HOSTS_MAX:
            raise ValueError(f"hosts must be in 1..{HOSTS_MAX}, got {hosts}")
        self.tag = f"{os.getpid():x}x{next(_seq)}"
        self.bridge = f"{PREFIX}{self.tag}b"
        self.hosts: list[Host] = []
        self.blocked: set[tuple[int, int]] = set()  # (src, dst); CLIENT_HOST is the client
        self._closed = False
        clean_leftovers()
        try:
            with _lock():
                k = _free_subnet()
                self.subnet = f"{SUBNET_BASE}.{k}"
                self._create_bridge()
            for i in range(hosts):
                self._create_host(i)
        except BaseException:
            self.close()
            raise

    @property
    def client_address(self) -> str:
        return f"{self.subnet}.{CLIENT_HOST}"

    def _create_bridge(self) -> None:
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.client_address}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")

    def _create_host(self, i: int) -> None:
        host = Host(i, f"{PREFIX}-{self.tag}-h{i}", f"{PREFIX}{self.tag}h{i}", self._addr(i))
        self.hosts.append(host)
        ip("netns", "add", host.ns)
        ip("link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.ns)
        ip("link", "set", host.veth, "master", self.bridge)
        ip("link", "set", host.veth, "up")
        ip("-n", host.ns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        ip("-n", host.ns, "link", "set", "lo", "up")
        ip("-n", host.ns, "link", "set", "eth0", "up")
        # Drop rules must be consulted before local delivery (see the module docstring).
        ip("-n", host.ns, "rule", "add", "pref", str(LOCAL_RULE_PREF), "lookup", "local")
        ip("-n", host.ns, "rule", "del", "pref", "0")

    def _addr(self, i: int) -> str:
        return str(ipaddress.IPv4Address(f"{self.subnet}.{i + 1}"))

    # -- processes ---------------------------------------------------------------
    def spawn(
        self,
        i: int,
        argv: Sequence[str],
        env: dict[str, str],
        log: IO[bytes],
        pass_fds: Sequence[int] = (),
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` on host ``i`` (``ip netns exec`` execs it: the pid is the program's)."""
        host = self.hosts[i]
        proc = subprocess.Popen(
            [IP, "netns", "exec", host.ns, *argv],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            pass_fds=tuple(pass_fds),
        )
        host.procs.append(proc)
        return proc

    def signal_host(self, i: int, sig: int) -> list[int]:
        """Send ``sig`` to every process on host ``i`` (executors included); their pids."""
        pids = namespace_pids(self.hosts[i].ns)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return pids

    def kill_host(self, i: int) -> list[int]:
        """SIGKILL everything on host ``i`` (a power cut, but its disk survives) and reap it."""
        pids = self.signal_host(i, signal.SIGKILL)
        host = self.hosts[i]
        deadline = time.monotonic() + STOP_WAIT_S
        for proc in host.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
        host.procs = [p for p in host.procs if p.poll() is None]
        return pids

    def pause_host(self, i: int) -> list[int]:
        """SIGSTOP everything on host ``i``: a hung machine (its sockets stay open)."""
        return self.signal_host(i, signal.SIGSTOP)

    def resume_host(self, i: int) -> list[int]:
        return self.signal_host(i, signal.SIGCONT)

    # -- links -------------------------------------------------------------------
    def _source(self, src: int) -> str:
        return self.client_address if src == CLIENT_HOST else self.hosts[src].address

    def block(self, src: int, dst: int) -> None:
        """Drop every packet from ``src`` arriving at host ``dst`` (one way; ``src`` may be
        ``CLIENT_HOST``). TCP needs both ways, so connections between them stall too,
        but ``dst`` still reaches ``src`` with its datagrams: an asymmetric link."""
        if (src, dst) in self.blocked:
            return
        rule = ["rule", "add", "pref", str(DROP_RULE_PREF), "iif", "eth0"]
        ip("-n", self.hosts[dst].ns, *rule, "from", self._source(src), "blackhole")
        self.blocked.add((src, dst))

    def unblock(self, src: int, dst: int) -> None:
        if (src, dst) not in self.blocked:
            return
        rule = ["rule", "del", "pref", str(DROP_RULE_PREF), "iif", "eth0"]
        ip("-n", self.hosts[dst].ns, *rule, "from", self._source(src), "blackhole")
        self.blocked.discard((src, dst))

    def partition(self, *groups: Sequence[int]) -> None:
        """Cut every link between hosts of different groups, both ways (the client,
        ``CLIENT_HOST``, may be in a group; hosts in no group are untouched)."""
        for a, b in itertools.permutations(range(len(groups)), 2):
            for src in groups[a]:
                for dst in groups[b]:
                    if dst != CLIENT_HOST:
                        self.block(src, dst)

    def isolate_client(self, *hosts: int) -> None:
        """The test process can no longer reach ``hosts`` (dropped on arrival there)."""
        for i in hosts:
            self.block(CLIENT_HOST, i)

    def heal(self) -> None:
        """Remove every drop rule: all links work again."""
        for src, dst in sorted(self.blocked):
            self.unblock(src, dst)

    # -- teardown ----------------------------------------------------------------
    def close(self) -> None:
        """Kill every process on every host, delete the namespaces, veths and bridge."""
        if self._closed:
            return
        self._closed = True
        for host in self.hosts:
            _remove_namespace(host.ns)  # SIGKILLs everything in it, then deletes it
            for proc in host.procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(STOP_WAIT_S)
            ip("link", "del", host.veth, check=False)  # gone with its peer, normally
        ip("link", "del", self.bridge, check=False)

    def __enter__(self) -> NetBed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> dict[str, Any]:
        return {
            "tag": self.tag,
            "bridge": self.bridge,
            "client": self.client_address,
            "hosts": [{"index": h.index, "ns": h.ns, "address": h.address} for h in self.hosts],
            "blocked": sorted(self.blocked),
        }


@contextlib.contextmanager
def _lock() -> Iterator[None]:
    """Held while a bed picks and claims its subnet, so two runs never pick the same."""
    with open(LOCK_PATH, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
