"""``lepton coordinator``, ``lepton worker``, ``lepton cluster up|down|status``, ``lepton chaos``.

The consensus layer's ``lepton cluster`` commands (``add-coordinator``,
``remove-coordinator``, ``replicas``) are added here through its
``register_cluster_commands``; any other layer adds more through
``cluster_subparsers()`` (this module is registered first, so the group exists).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

STATE_ENV = "LEPTON_STATE_FILE"
_cluster_subparsers: Any = None


def cluster_subparsers() -> Any:
    """The ``lepton cluster`` subparsers object; add more subcommands to it."""
    if _cluster_subparsers is None:
        raise RuntimeError("lepton_ai.node.cli.register() has not run yet")
    return _cluster_subparsers


def default_state_file() -> Path:
    return Path(os.environ.get(STATE_ENV) or Path.home() / ".lepton" / "cluster.json")


def add_coordinator_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port to bind (0: any free port)")
    p.add_argument(
        "--data-dir",
        default=os.path.join(os.getcwd(), ".lepton", "coordinator"),
        help="directory of the command log",
    )
    p.add_argument("--token", default=None, help="cluster token (default: $LEPTON_TOKEN)")
    p.add_argument("--no-fsync", action="store_true", help="do not fsync the command log")
    p.add_argument("--listen-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--quiet", action="store_true", help="do not print the bound address")
    p.add_argument("--id", type=int, default=None, help="this replica's id in --peers")
    p.add_argument(
        "--peers",
        default=None,
        metavar="ID=HOST:PORT,...",
        help="Paxos addresses of every coordinator replica (omit: one coordinator, local log)",
    )
    p.add_argument("--paxos-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--finished-jobs-max",
        type=int,
        default=256,
        help="retention: finished jobs whose results are kept (oldest dropped first; "
        "`lepton job rm` drops one now). Same value on every coordinator.",
    )
    p.add_argument(
        "--job-retention-s",
        type=float,
        default=0.0,
        help="retention: the leader deletes finished jobs older than this (0: keep)",
    )


def add_worker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--join",
        required=True,
        metavar="HOST:PORT[,HOST:PORT...]",
        help="the coordinator, or every coordinator replica (the agent follows the leader)",
    )
    p.add_argument("--token", default=None, help="cluster token (default: $LEPTON_TOKEN)")
    p.add_argument("--slots", type=int, default=1, help="executor processes (default 1)")
    p.add_argument(
        "--spares", type=int, default=1, help="warm executors kept for instant replacement"
    )
    p.add_argument(
        "--name",
        default=None,
        help="member id shown in status, and the node's directory under --data-dir "
        "(default: the host name; give each worker of one host its own)",
    )
    p.add_argument(
        "--data-dir",
        default=os.path.join(os.getcwd(), ".lepton", "workers"),
        help="directory of the node's stored objects and shuffle files",
    )
    p.add_argument(
        "--storage-bytes-max",
        type=int,
        default=0,
        help="capacity of the node's object store (0: the disk's free space less a reserve)",
    )
    p.add_argument(
        "--no-fsync", action="store_true", help="do not fsync stored objects (tests only)"
    )
    p.add_argument(
        "--scrub-interval-s",
        type=float,
        default=60.0,
        help="pause between two scrubs (re-reads checking every chunk) of the stored objects",
    )
    p.add_argument(
        "--orphan-grace-s",
        type=float,
        default=120.0,
        help="age after which an object no committed reference lists here is deleted",
    )
    p.add_argument("--quiet", action="store_true", help="do not print the worker id")


def add_connect_args(p: argparse.ArgumentParser) -> None:
    """--address/--token, or the state file ``lepton cluster up`` wrote."""
    p.add_argument("--address", default=None, help="coordinator HOST:PORT[,HOST:PORT...]")
    p.add_argument("--token", default=None, help="cluster token (default: $LEPTON_TOKEN)")
    p.add_argument("--state-file", default=None, help="state file of `lepton cluster up`")


def connect_from_args(args: argparse.Namespace) -> Any:
    from lepton_ai.node.cluster import connect

    if args.address:
        return connect(args.address, args.token)
    state = _read_state(args.state_file)
    return connect(state["address"], args.token or state["token"])


def _read_state(path_text: str | None) -> dict[str, Any]:
    path = Path(path_text) if path_text else default_state_file()
    try:
        state: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(
            f"no running cluster: {path} does not exist "
            "(start one with `lepton cluster up` or pass --address)"
        ) from None
    return state


def _print(args: argparse.Namespace, obj: Any, text: str) -> None:
    print(json.dumps(obj) if getattr(args, "json", False) else text)


# ---------------------------------------------------------------- commands


def _cmd_coordinator(args: argparse.Namespace) -> int:
    from lepton_ai.node.coordinator import run_from_args

    run_from_args(args)
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    # With several coordinators (``--join h1:p1,h2:p2``) the agent follows the leader.
    from lepton_ai.node.worker import run_from_args

    run_from_args(args)
    return 0


def _spawn_background(
    args: argparse.Namespace, data_dir: Path, token: str
) -> tuple[str, list[int]]:
    """Start the coordinator(s) and workers detached (own session, logs to a file).

    With ``--coordinators 3`` each coordinator gets a client port and a Paxos
    port; the returned address lists every client port (comma-separated).
    """
    from lepton_ai.node.netutil import bind_listener

    n = getattr(args, "coordinators", 3)
    if n < 1 or n % 2 == 0:
        raise ValueError(f"--coordinators must be odd and >= 1, got {n}")
    socks = [bind_listener(args.host, args.port if i == 0 else 0) for i in range(n)]
    paxos = [bind_listener(args.host, 0) for _ in range(n if n > 1 else 0)]

    def addr(sock: Any) -> str:
        host, port = sock.getsockname()[:2]
        return f"{host}:{port}"

    address = ",".join(addr(sock) for sock in socks)
    peers = ",".join(f"{i}={addr(sock)}" for i, sock in enumerate(paxos))
    log = open(data_dir / "cluster.log", "ab")  # noqa: SIM115 - handed to the children
    common: dict[str, Any] = {
        "env": dict(os.environ, LEPTON_TOKEN=token),
        "stdin": subprocess.DEVNULL,
        "stdout": log,
        "stderr": log,
        "start_new_session": True,
    }
    py = [sys.executable, "-m"]
    pids: list[int] = []
    for i, sock in enumerate(socks):
        cmd = [*py, "lepton_ai.node.coordinator", "--listen-fd", str(sock.fileno()), "--quiet"]
        fds = [sock.fileno()]
        if n > 1:
            fds.append(paxos[i].fileno())
            cmd += ["--paxos-fd", str(paxos[i].fileno()), "--id", str(i), "--peers", peers]
            cmd += ["--data-dir", str(data_dir / f"coordinator-{i}")]
        else:
            cmd += ["--data-dir", str(data_dir / "coordinator")]
        pids.append(subprocess.Popen(cmd, pass_fds=tuple(fds), **common).pid)
    for sock in [*socks, *paxos]:
        sock.close()
    module = "lepton_ai.node.worker"  # follows the leader when given several
    worker_args = ["--join", address, "--slots", str(args.slots), "--quiet"]
    worker_args += ["--data-dir", str(data_dir / "workers")]
    for i in range(args.workers):
        w = subprocess.Popen([*py, module, *worker_args, "--name", str(i)], **common)
        pids.append(w.pid)
    log.close()
    return address, pids


def _cmd_up(args: argparse.Namespace) -> int:
    from lepton_ai.node.cluster import Cluster
    from lepton_ai.wire import generate_token

    path = Path(args.state_file) if args.state_file else default_state_file()
    if path.exists():
        state = json.loads(path.read_text())
        if any(_is_ours(p) for p in state.get("pids", [])):
            raise ValueError(
                f"a cluster is already up ({state['address']}); `lepton cluster down` first"
            )
    if args.workers < 1 or args.slots < 1:
        raise ValueError("--workers and --slots must be >= 1")
    data_dir = Path(args.data_dir or path.parent / "cluster-data")
    data_dir.mkdir(parents=True, exist_ok=True)
    token = args.token or generate_token()
    address, pids = _spawn_background(args, data_dir, token)
    state = {"address": address, "token": token, "pids": pids, "data_dir": str(data_dir)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state))
    os.chmod(path, 0o600)  # the token lets anyone run code on the workers
    cluster = Cluster(address, token)
    try:
        info = cluster._cluster_info(args.workers, 30.0)
    finally:
        cluster.close()
    ready = sum(1 for m in info.members if m.role == "worker")
    if ready < args.workers:
        _stop_pids(pids)
        path.unlink(missing_ok=True)
        raise RuntimeError(
            f"only {ready} of {args.workers} workers joined; see {data_dir / 'cluster.log'}"
        )
    _print(args, state, f"cluster up at {address} (state in {path}; token in the file)")
    return 0


def _is_ours(pid: int) -> bool:
    """True if ``pid`` is a live lepton node program (never signal a recycled pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"lepton_ai.node." in cmdline


def _stop_pids(pids: list[int]) -> list[int]:
    from lepton_ai.node.process import pid_alive

    ours = [p for p in pids if _is_ours(p)]
    for pid in ours:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline and any(pid_alive(p) for p in ours):
        time.sleep(0.05)
    for pid in ours:
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return ours


def _cmd_down(args: argparse.Namespace) -> int:
    path = Path(args.state_file) if args.state_file else default_state_file()
    state = _read_state(str(path))
    stopped = _stop_pids(list(state.get("pids", [])))
    path.unlink(missing_ok=True)
    _print(args, {"stopped": stopped}, f"stopped {len(stopped)} processes")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    cluster = connect_from_args(args)
    try:
        status = cluster.status()
    finally:
        cluster.close()
    lines = [f"leader {status['leader']}"]
    for m in status["members"]:
        lines.append(
            f"  {m['role']:<12} {m['id']:<6} pid {m['pid']:<8} {m['health']:<9} {m['address']}"
        )
    _print(args, status, "\n".join(lines))
    return 0


def _cmd_events(args: argparse.Namespace) -> int:
    cluster = connect_from_args(args)
    try:
        events = cluster.events(args.job or None)
    finally:
        cluster.close()
    if args.last > 0:
        events = events[-args.last :]
    text = "\n".join(
        f"{time.strftime('%H:%M:%S', time.localtime(e['t']))}.{int(e['t'] % 1 * 1000):03d} "
        f"{e['kind']:<18} {e['detail']}" + (f" [{e['job_id']}]" if e["job_id"] else "")
        for e in events
    )
    _print(args, {"events": events}, text or "(no events)")
    return 0


def _cmd_chaos(args: argparse.Namespace) -> int:
    cluster = connect_from_args(args)
    try:
        target: int | str = int(args.id) if args.id.isdigit() else args.id
        verb = {"kill": cluster.kill, "pause": cluster.pause, "resume": cluster.resume}
        pid = verb[args.action](args.role, target)
    finally:
        cluster.close()
    _print(
        args,
        {"action": args.action, "role": args.role, "id": args.id, "pid": pid},
        f"{args.action} {args.role} {args.id}: pid {pid}",
    )
    return 0


def _add_consensus_commands(sub: Any) -> None:
    """The replicated log's ``lepton cluster`` commands (add/remove-coordinator, replicas).

    Its replica status is named ``replicas`` because ``status`` here lists every member.
    """
    try:
        from lepton_ai.consensus.cli import register_cluster_commands
    except ImportError:  # the consensus layer is optional for the node layer
        return
    register_cluster_commands(sub, status_name="replicas")


def register(subparsers: Any) -> None:
    global _cluster_subparsers
    p = subparsers.add_parser("coordinator", help="run a coordinator")
    add_coordinator_args(p)
    p.set_defaults(func=_cmd_coordinator)

    p = subparsers.add_parser("worker", help="run a worker node agent")
    add_worker_args(p)
    p.set_defaults(func=_cmd_worker)

    cluster = subparsers.add_parser("cluster", help="start, stop or inspect a local cluster")
    sub = cluster.add_subparsers(dest="cluster_command", metavar="SUBCOMMAND", required=True)
    _cluster_subparsers = sub
    up = sub.add_parser("up", help="start coordinators and workers in the background")
    up.add_argument("--workers", type=int, default=2)
    up.add_argument("--slots", type=int, default=1, help="executors per worker")
    up.add_argument(
        "--coordinators",
        type=int,
        default=3,
        help="coordinator replicas: 3 (the default) or 5 survive one or two deaths; 1 is smallest",
    )
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=0)
    up.add_argument("--token", default=None, help="cluster token (default: generated)")
    up.add_argument("--data-dir", default=None)
    up.add_argument("--state-file", default=None)
    up.add_argument("--json", action="store_true")
    up.set_defaults(func=_cmd_up)
    down = sub.add_parser("down", help="stop the cluster `up` started (by PID)")
    down.add_argument("--state-file", default=None)
    down.add_argument("--json", action="store_true")
    down.set_defaults(func=_cmd_down)
    st = sub.add_parser("status", help="members with role, id, pid, address, health")
    add_connect_args(st)
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_cmd_status)

    ev = sub.add_parser(
        "events",
        help="the cluster's event log: leader elected, node lost, task retried, backup launched, "
        "job finished (replicated with 3 coordinators)",
    )
    add_connect_args(ev)
    ev.add_argument("--job", default="", help="only this job's events (and cluster-wide ones)")
    ev.add_argument("--last", type=int, default=0, help="only the last N events")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=_cmd_events)

    _add_consensus_commands(sub)

    chaos = subparsers.add_parser("chaos", help="inject a fault into a running cluster")
    chaos.add_argument("action", choices=["kill", "pause", "resume"])
    chaos.add_argument("role", choices=["coordinator", "leader", "worker", "executor"])
    chaos.add_argument("id", help="member id (executors: index or WORKER.SLOT)")
    add_connect_args(chaos)
    chaos.add_argument("--json", action="store_true")
    chaos.set_defaults(func=_cmd_chaos)
