"""The coordinator and worker programs: their entry points and arguments.

    lepton coordinator [--id N --peers ...]   python -m lepton_ai.node.coordinator
    lepton worker --join HOST:PORT           python -m lepton_ai.node.worker

This module sits above the programs: it imports ``node.coordinator`` (the shell),
``node.replicated`` (the shell on the Paxos log) and ``node.worker`` (the agent),
and none of them imports it (``python -m lepton_ai.node.coordinator`` runs that
file as ``__main__``, which hands over to ``coordinator_main``; the worker's to
``worker_main``), so they form no import cycle. The imports are lazy:
``lepton_ai.cli`` loads this module (``register``) for every ``lepton`` command,
and only two of them start a program.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import socket
import sys
from typing import TYPE_CHECKING, Any

from lepton_ai import eventloop

if TYPE_CHECKING:
    from lepton_ai.node.coord_config import CoordinatorConfig
    from lepton_ai.node.worker import WorkerConfig

__all__ = [
    "add_coordinator_args",
    "add_worker_args",
    "coordinator_main",
    "next_epoch",
    "register",
    "run_coordinator",
    "run_from_args",
    "run_worker",
    "serve_coordinator",
    "worker_main",
]


def register(subparsers: Any) -> None:
    """``lepton coordinator`` and ``lepton worker``."""
    p = subparsers.add_parser("coordinator", help="run a coordinator")
    add_coordinator_args(p)
    p.set_defaults(func=_cmd_coordinator)

    p = subparsers.add_parser("worker", help="run a worker node agent")
    add_worker_args(p)
    p.set_defaults(func=_cmd_worker)


def _cmd_coordinator(args: argparse.Namespace) -> int:
    run_from_args(args)
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    # With several coordinators (``--join h1:p1,h2:p2``) the agent follows the leader.
    _run_worker_args(args)
    return 0


# ---------------------------------------------------------------- the worker


def worker_main(argv: list[str] | None = None) -> None:
    """``python -m lepton_ai.node.worker`` (``LocalCluster`` and ``cluster up`` spawn it)."""
    parser = argparse.ArgumentParser(prog="lepton worker")
    add_worker_args(parser)
    _cmd_worker(parser.parse_args(argv))
    sys.exit(0)


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
    p.add_argument(
        "--serve-slots",
        type=int,
        default=4,
        help="model-serving replicas this node may run (0: none, and no balancer)",
    )
    p.add_argument(
        "--serve-port",
        type=int,
        default=0,
        help="port of this node's serving balancer (default: any free port)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        help="port of this agent's HTTP /metrics (default: any free port)",
    )
    p.add_argument("--quiet", action="store_true", help="do not print the worker id")


def _run_worker_args(args: Any) -> None:
    """``lepton worker`` and ``python -m lepton_ai.node.worker`` (argparse namespace)."""
    from lepton_ai.node.executor_slots import ExecutorConfig
    from lepton_ai.node.node_storage import NodeStorageConfig
    from lepton_ai.node.worker import WorkerConfig
    from lepton_ai.wire import resolve_token

    if args.slots < 1 or args.spares < 0:
        raise ValueError(
            f"--slots must be >= 1 and --spares >= 0 (got {args.slots}, {args.spares})"
        )
    capacity = int(getattr(args, "storage_bytes_max", 0) or 0)
    scrub_s = float(getattr(args, "scrub_interval_s", 60.0))
    grace_s = float(getattr(args, "orphan_grace_s", 120.0))
    if capacity < 0 or scrub_s <= 0 or grace_s <= 0:
        raise ValueError(
            f"--storage-bytes-max must be >= 0, --scrub-interval-s and --orphan-grace-s > 0 "
            f"(got {capacity}, {scrub_s}, {grace_s})"
        )
    serve_slots = int(getattr(args, "serve_slots", 4))
    serve_port = int(getattr(args, "serve_port", 0))
    metrics_port = int(getattr(args, "metrics_port", 0))
    if not 0 <= serve_slots <= 64 or not 0 <= serve_port <= 65535 or not 0 <= metrics_port <= 65535:
        raise ValueError(
            f"--serve-slots must be in 0..64, --serve-port and --metrics-port in 0..65535 "
            f"(got {serve_slots}, {serve_port}, {metrics_port})"
        )
    config = WorkerConfig(
        slots=args.slots,
        serve_slots=serve_slots,
        serve_port=serve_port,
        metrics_port=metrics_port,
        executor=ExecutorConfig(spares=args.spares),
        storage=NodeStorageConfig(
            capacity_bytes=capacity,
            fsync=not getattr(args, "no_fsync", False),
            scrub_interval_s=scrub_s,
            orphan_grace_s=grace_s,
            orphan_check_interval_s=min(30.0, grace_s / 2),
        ),
    )
    # The name names the node's directory (its stored objects): stable across
    # restarts by default, so a restarted worker finds its objects again.
    name = args.name or socket.gethostname()
    token = resolve_token(args.token)
    run_worker(args.join, token, args.data_dir, name, config, announce=not args.quiet)


def run_worker(
    join: str,
    token: str,
    data_dir: str,
    name: str,
    config: WorkerConfig,
    *,
    announce: bool = True,
) -> None:
    """Entry point of ``lepton worker``: run the agent until killed."""
    from lepton_ai.node.process import private_files, watch_parent
    from lepton_ai.node.worker import WorkerAgent

    private_files()
    watch_parent()
    logging.basicConfig(level=os.environ.get("LEPTON_LOG_LEVEL", "WARNING"))
    agent = WorkerAgent(join, token, data_dir, name, config)
    # User code in the executors (children of this process) may read and write the
    # cluster's storage (``lep://`` URLs, ``lep.connect()``): it finds the cluster here.
    os.environ["LEPTON_ADDRESS"] = join
    os.environ["LEPTON_TOKEN"] = token
    if announce:
        print(json.dumps({"worker": agent.worker_id, "pid": os.getpid()}), flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        eventloop.run(agent.run())


# ---------------------------------------------------------------- the coordinator


def add_coordinator_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port to bind (0: any free port)")
    p.add_argument(
        "--advertise",
        default=None,
        metavar="HOST[:PORT]",
        help="the address workers and clients are sent to when this coordinator leads "
        "(default: the bound one; with --host 0.0.0.0, this host's address on the "
        "interface that routes to its peers)",
    )
    p.add_argument(
        "--data-dir",
        default=os.path.join(os.getcwd(), ".lepton", "coordinator"),
        help="directory of the command log",
    )
    p.add_argument(
        "--http-port",
        type=int,
        default=0,
        help="port of its HTTP endpoint (/metrics, /sd, the dashboard) on --host "
        "(0: any free port; `lepton cluster status` shows it)",
    )
    p.add_argument(
        "--alert-webhook",
        default="",
        metavar="URL",
        help="POST each alert raised and cleared here (Alertmanager-style JSON; retried)",
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
    p.add_argument(
        "--standby",
        action="store_true",
        help="a standby coordinator: streamed the log, no vote; promoted when a voter is "
        "unheard for --replace-after-s (--peers: the voters, and this one's own id)",
    )
    p.add_argument(
        "--replace-after-s",
        type=_positive_float,
        default=10.0,
        help="the leader replaces a coordinator unheard this long by a standby (default 10)",
    )


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def next_epoch(data_dir: str) -> int:
    """A new leadership epoch per coordinator start, persisted so it never repeats."""
    path = os.path.join(data_dir, "epoch")
    epoch = 0
    with contextlib.suppress(FileNotFoundError, ValueError), open(path) as f:
        epoch = int(f.read().strip())
    epoch += 1
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(epoch))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return epoch


async def serve_coordinator(
    sock: socket.socket,
    token: str,
    data_dir: str,
    config: CoordinatorConfig,
    address: str,
    *,
    http_sock: socket.socket | None = None,
) -> None:
    from lepton_ai.compute.job_state import JobStateConfig
    from lepton_ai.node.coord_machine import JobsMachine
    from lepton_ai.node.coordinator import Coordinator
    from lepton_ai.node.local_log import LocalLog, LocalLogConfig

    os.makedirs(data_dir, exist_ok=True)
    machine = JobsMachine(JobStateConfig(finished_jobs_max=config.finished_jobs_max))
    local_log = LocalLog(
        os.path.join(data_dir, "log"), machine, LocalLogConfig(fsync=config.fsync), address
    )
    coordinator = Coordinator(local_log, machine, address, config, token=token)
    if http_sock is not None:
        from lepton_ai.node.coord_http import attach_http

        attach_http(coordinator, http_sock)
    # A local log is always its own leader; a replicated one calls this on every
    # election won or lost, with its ballot as the epoch.
    epoch = next_epoch(data_dir)
    local_log.on_leadership(lambda leading: coordinator.on_leadership(leading, epoch))
    try:
        # The log's flusher in the same task group: a failed write or apply ends the
        # coordinator (the process exits with the error) instead of going unnoticed.
        async with asyncio.TaskGroup() as tg:
            tg.create_task(local_log.run())
            await coordinator.run(sock)
    finally:
        await local_log.close()


def run_coordinator(
    token: str,
    data_dir: str,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    listen_fd: int | None = None,
    fsync: bool = True,
    announce: bool = True,
    node_id: int | None = None,
    peers: dict[int, str] | None = None,
    paxos_fd: int | None = None,
    finished_jobs_max: int = 256,
    job_retention_s: float = 0.0,
    standby: bool = False,
    replace_after_s: float = 10.0,
    advertise: str | None = None,
    http_port: int = 0,
    alert_webhook: str = "",
) -> None:
    """Entry point of ``lepton coordinator``: run until killed.

    With ``peers`` (and ``node_id``) the coordinator is one replica of the
    Multi-Paxos log (``node.replicated``); without, it runs on a local log.
    """
    from lepton_ai.node.coord_config import CoordinatorConfig
    from lepton_ai.node.node_net import advertised_address, bind_listener, parse_address
    from lepton_ai.node.process import private_files, watch_parent

    if (peers is None) != (node_id is None):
        raise ValueError("--id and --peers go together")
    if peers is not None and node_id not in peers and not (standby and paxos_fd is not None):
        raise ValueError(f"--id {node_id} is not in --peers ({', '.join(map(str, peers))})")
    private_files()
    watch_parent()
    logging.basicConfig(level=os.environ.get("LEPTON_LOG_LEVEL", "WARNING"))
    sock = socket.socket(fileno=listen_fd) if listen_fd is not None else bind_listener(host, port)
    others = [a for i, a in (peers or {}).items() if i != node_id]
    address = advertised_address(sock, advertise, parse_address(others[0])[0] if others else None)
    from lepton_ai.monitor.http import bind_http

    http_sock = bind_http(host, http_port)
    http_address = f"{parse_address(address)[0]}:{http_sock.getsockname()[1]}"
    if announce:
        print(
            json.dumps({"address": address, "pid": os.getpid(), "http": http_address}),
            flush=True,
        )
    if finished_jobs_max < 1:
        raise ValueError(f"--finished-jobs-max must be >= 1, got {finished_jobs_max}")
    if job_retention_s < 0:
        raise ValueError(f"--job-retention-s must be >= 0, got {job_retention_s}")
    if alert_webhook and not alert_webhook.startswith(("http://", "https://")):
        raise ValueError(f"--alert-webhook must be an http(s) URL, got {alert_webhook!r}")
    config = CoordinatorConfig(
        fsync=fsync,
        finished_jobs_max=finished_jobs_max,
        job_retention_s=job_retention_s,
        alert_webhook=alert_webhook,
    )
    if peers is None or node_id is None:
        main_coro = serve_coordinator(sock, token, data_dir, config, address, http_sock=http_sock)
    else:
        from lepton_ai.node.replicated import serve_replicated

        paxos_sock = socket.socket(fileno=paxos_fd) if paxos_fd is not None else None
        main_coro = serve_replicated(
            sock,
            paxos_sock,
            node_id=node_id,
            peers=peers,
            token=token,
            data_dir=data_dir,
            config=config,
            standby=standby,
            replace_after_s=replace_after_s,
            address=address,
            http_sock=http_sock,
        )
    with contextlib.suppress(KeyboardInterrupt):
        eventloop.run(main_coro)


def run_from_args(args: object) -> None:
    """``lepton coordinator`` and ``python -m lepton_ai.node.coordinator``. Exits with
    ``EXIT_REMOVED`` (3) once a committed membership change removed this coordinator."""
    from lepton_ai.node.coord_membership import EXIT_REMOVED, MemberRemoved

    peers_text = getattr(args, "peers", None)
    try:
        _run_coordinator_args(args, peers_text)
    except MemberRemoved as exc:
        # Not an error to retry: a supervisor seeing this code leaves the process down.
        print(f"lepton coordinator: {exc}; exiting ({EXIT_REMOVED})", file=sys.stderr)
        raise SystemExit(EXIT_REMOVED) from exc


def _run_coordinator_args(args: object, peers_text: str | None) -> None:
    from lepton_ai.consensus.server import parse_peers
    from lepton_ai.wire import resolve_token

    run_coordinator(
        resolve_token(getattr(args, "token", None)),
        str(getattr(args, "data_dir", "")),
        host=str(getattr(args, "host", "127.0.0.1")),
        port=int(getattr(args, "port", 0)),
        listen_fd=getattr(args, "listen_fd", None),
        fsync=not getattr(args, "no_fsync", False),
        announce=not getattr(args, "quiet", False),
        node_id=getattr(args, "id", None),
        peers=parse_peers(peers_text) if peers_text else None,
        paxos_fd=getattr(args, "paxos_fd", None),
        finished_jobs_max=int(getattr(args, "finished_jobs_max", 256)),
        job_retention_s=float(getattr(args, "job_retention_s", 0.0)),
        standby=bool(getattr(args, "standby", False)),
        replace_after_s=float(getattr(args, "replace_after_s", 10.0)),
        advertise=getattr(args, "advertise", None),
        http_port=int(getattr(args, "http_port", 0)),
        alert_webhook=str(getattr(args, "alert_webhook", "") or ""),
    )


def coordinator_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lepton coordinator")
    add_coordinator_args(parser)
    run_from_args(parser.parse_args(argv))
