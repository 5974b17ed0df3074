"""How a ``LocalCluster`` starts its members, each a coordinator or worker program
(``node.programs``) run as ``python -m``.

Here: the checks on the sizes a ``LocalCluster`` is asked for (before anything
starts), each member's command line (the programs' flags; a coordinator gets its
listening sockets as inherited fds), the child's environment (secrets go there,
never in argv, which ``ps`` shows), its lifeline pipe, and ``MemberProc``, the
started process. ``node.local_cluster`` owns the sockets, keeps the processes and
decides when to start which.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from typing import IO, TYPE_CHECKING, Any

from lepton_ai.node.process import Lifeline
from lepton_ai.wire.http_auth import HTTP_TOKEN_ENV
from lepton_ai.wire.tls import TLS_DIR_ENV

if TYPE_CHECKING:
    from lepton_ai.node.local_cluster import LocalCluster

STANDBY_ID_BASE = 100  # a LocalCluster's standby coordinators are 100, 101, ...
STANDBYS_MAX = 8  # as many as the Paxos group keeps learners


def checked_sizes(
    workers: int,
    coordinators: int | None,
    slots_per_worker: int,
    spares_per_worker: int,
    job_retention_s: float,
) -> int:
    """Refuses bad sizes before anything starts; returns the coordinator count."""
    if job_retention_s < 0:
        raise ValueError(f"job_retention_s must be >= 0, got {job_retention_s!r}")
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
        raise ValueError(f"workers must be an int >= 0, got {workers!r}")
    if coordinators is None:
        # The default: three replicas of the Multi-Paxos log, so the cluster survives
        # the death of any one coordinator; LEPTON_COORDINATORS=1 (or coordinators=1)
        # gives the smallest footprint: one coordinator on a local log.
        coordinators = int(os.environ.get("LEPTON_COORDINATORS", "3"))
    if (
        not isinstance(coordinators, int)
        or isinstance(coordinators, bool)
        or coordinators < 1
        or coordinators % 2 == 0
    ):
        raise ValueError(f"coordinators must be an odd int >= 1, got {coordinators!r}")
    if not isinstance(slots_per_worker, int) or slots_per_worker < 1:
        raise ValueError(f"slots_per_worker must be an int >= 1, got {slots_per_worker!r}")
    if not isinstance(spares_per_worker, int) or spares_per_worker < 0:
        raise ValueError(f"spares_per_worker must be an int >= 0, got {spares_per_worker!r}")
    return coordinators


def checked_standbys(standbys: int, coordinators: int, replace_after_s: float) -> float:
    """Refuses a bad standby count or promotion delay; returns the delay."""
    if not isinstance(standbys, int) or isinstance(standbys, bool) or standbys < 0:
        raise ValueError(f"standbys must be an int >= 0, got {standbys!r}")
    if standbys > STANDBYS_MAX:
        raise ValueError(f"standbys must be <= {STANDBYS_MAX}, got {standbys}")
    if standbys and coordinators < 3:
        raise ValueError("standbys need a replicated control plane (coordinators >= 3)")
    if not replace_after_s > 0:
        raise ValueError(f"replace_after_s must be > 0, got {replace_after_s!r}")
    return float(replace_after_s)


def checked_storage(
    scrub_interval_s: float, orphan_grace_s: float, storage_bytes_max: int
) -> tuple[float, float]:
    """Refuses bad storage timings or capacity; returns (scrub interval, orphan grace)."""
    if not scrub_interval_s > 0 or not orphan_grace_s > 0:
        raise ValueError("scrub_interval_s and orphan_grace_s must be > 0")
    if not isinstance(storage_bytes_max, int) or storage_bytes_max < 0:
        raise ValueError(f"storage_bytes_max must be an int >= 0, got {storage_bytes_max!r}")
    return float(scrub_interval_s), float(orphan_grace_s)


def checked_metrics_env() -> None:
    """Every member reads $LEPTON_METRICS at start: a bad value is refused here, before
    any starts, not as a coordinator's exit status."""
    # Imported here: the metrics module brings prometheus-client, which a driver that
    # only imports lepton_ai need not load.
    from lepton_ai.monitor.metrics import enabled_from_env

    enabled_from_env()


def checked_webhook(url: str) -> str:
    if url and not url.startswith(("http://", "https://")):
        raise ValueError(f"alert_webhook must be an http(s) URL, got {url!r}")
    return url


def sock_address(sock: Any) -> str:
    """``host:port`` of a bound socket."""
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def coordinator_command(cluster: LocalCluster, id: str, fd: int, pfd: int | None) -> list[str]:
    """Coordinator ``id``'s command line: ``fd`` its client listener, ``pfd`` its
    Paxos listener (None: the one coordinator, on a local log)."""
    index = cluster.coordinator_ids.index(id)
    args = ["lepton_ai.node.coordinator", "--listen-fd", str(fd), "--quiet"]
    args += ["--host", cluster.host]  # its HTTP port's (the listener is bound here)
    if cluster.alert_webhook:
        args += ["--alert-webhook", cluster.alert_webhook]
    if pfd is not None:
        # The voters it was started with; a standby learns the others, and a
        # restarted member the changes since, from the log.
        voters = cluster.paxos_addresses[: cluster.coordinators]
        peers = ",".join(f"{i}={a}" for i, a in enumerate(voters))
        args += ["--paxos-fd", str(pfd), "--id", id, "--peers", peers]
        args += ["--replace-after-s", repr(cluster.replace_after_s)]
        if index >= cluster.coordinators:
            args.append("--standby")
        args += ["--data-dir", os.path.join(cluster.data_dir, f"coordinator-{id}")]
    else:
        args += ["--data-dir", os.path.join(cluster.data_dir, "coordinator")]
    if not cluster.fsync:
        args.append("--no-fsync")
    if cluster.job_retention_s > 0:
        args += ["--job-retention-s", repr(cluster.job_retention_s)]
    return [sys.executable, "-m", *args]


def worker_command(cluster: LocalCluster, id: str) -> list[str]:
    """Worker ``id``'s command line: it joins every coordinator address."""
    args = [
        "lepton_ai.node.worker",  # follows the leader when given several
        "--join",
        cluster.address,
        "--slots",
        str(cluster.slots_per_worker),
        "--spares",
        str(cluster.spares_per_worker),
        "--name",
        id,
        "--quiet",
        "--data-dir",
        os.path.join(cluster.data_dir, "workers"),
    ]
    if cluster.storage_bytes_max:
        args += ["--storage-bytes-max", str(cluster.storage_bytes_max)]
    scrub_s, grace_s = cluster.storage_timing
    args += ["--scrub-interval-s", repr(scrub_s), "--orphan-grace-s", repr(grace_s)]
    if not cluster.fsync:
        args.append("--no-fsync")
    return [sys.executable, "-m", *args]


class MemberProc:
    """A member process a ``LocalCluster`` started, with its lifeline (None: untied)."""

    def __init__(
        self, role: str, id: str, popen: subprocess.Popen[bytes], line: Lifeline | None
    ) -> None:
        self.role, self.id, self.popen, self.lifeline = role, id, popen, line

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self) -> None:
        if self.lifeline is not None:
            self.lifeline.cut()
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGKILL)  # works on a paused process too
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5.0)


def start_member(
    role: str,
    id: str,
    cmd: list[str],
    fds: tuple[int, ...],
    *,
    token: str,
    tls_dir: str | None,
    http_token: str | None,
    tied: bool,
    log: IO[bytes] | None,
) -> MemberProc:
    """Start ``cmd`` with the inherited ``fds``. ``tied``: it dies with this process
    (a lifeline pipe) and shares its output; else it runs in its own session,
    writing to ``log``."""
    line = Lifeline() if tied else None
    env = dict(os.environ)
    env["LEPTON_TOKEN"] = token
    # Secrets and settings in the environment, never in argv (argv is public in ps).
    if tls_dir:
        env[TLS_DIR_ENV] = tls_dir
    if http_token:
        env[HTTP_TOKEN_ENV] = http_token
    kwargs: dict[str, Any] = {}
    if line is not None:
        env.update(line.child_env())
        fds = (*fds, line.read_fd)
    else:
        kwargs = {"start_new_session": True, "stdout": log, "stderr": log}
    try:
        popen = subprocess.Popen(cmd, env=env, pass_fds=fds, stdin=subprocess.DEVNULL, **kwargs)
    finally:
        if line is not None:
            line.after_spawn()
    return MemberProc(role, id, popen, line)
