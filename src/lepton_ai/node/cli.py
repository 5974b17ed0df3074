"""``lepton cluster up|down|status|events``, ``lepton chaos``, and the client options.

``lepton coordinator`` and ``lepton worker``, their entry points and their
arguments (``add_coordinator_args``, ``add_worker_args``) are ``node.programs``'s;
this module imports no program.

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
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lepton_ai.node.state_file import default_state_file, read_state

_cluster_subparsers: Any = None


def cluster_subparsers() -> Any:
    """The ``lepton cluster`` subparsers object; add more subcommands to it."""
    if _cluster_subparsers is None:
        raise RuntimeError("lepton_ai.node.cli.register() has not run yet")
    return _cluster_subparsers


def add_connect_args(p: argparse.ArgumentParser) -> None:
    """--address/--token, or the state file ``lepton cluster up`` wrote."""
    p.add_argument("--address", default=None, help="coordinator HOST:PORT[,HOST:PORT...]")
    p.add_argument("--token", default=None, help="cluster token (default: $LEPTON_TOKEN)")
    p.add_argument("--state-file", default=None, help="state file of `lepton cluster up`")


def connect_from_args(args: argparse.Namespace) -> Any:
    from lepton_ai.node.cluster_handle import connect

    if args.address:
        return connect(args.address, args.token)
    state = read_state(args.state_file)
    return connect(state["address"], args.token or state["token"])


def _print(args: argparse.Namespace, obj: Any, text: str) -> None:
    print(json.dumps(obj) if getattr(args, "json", False) else text)


# ---------------------------------------------------------------- commands


def _supervisor_command(args: argparse.Namespace, path: Path, data_dir: Path) -> list[str]:
    n, standbys = args.coordinators, args.standbys
    if n < 1 or n % 2 == 0:
        raise ValueError(f"--coordinators must be odd and >= 1, got {n}")
    if args.workers < 1 or args.slots < 1:
        raise ValueError("--workers and --slots must be >= 1")
    if standbys < 0 or (standbys and n < 3):
        raise ValueError("--standbys must be >= 0 and needs --coordinators >= 3")
    return [
        sys.executable,
        "-m",
        "lepton_ai.node.cluster_up",
        *("--state-file", str(path), "--data-dir", str(data_dir)),
        *("--workers", str(args.workers), "--slots", str(args.slots)),
        *("--coordinators", str(n), "--standbys", str(standbys)),
        *("--host", args.host, "--port", str(args.port)),
    ]


def _wait_for_state(path: Path, supervisor: subprocess.Popen[bytes], log: Path) -> dict[str, Any]:
    """The state file the supervisor writes once every worker is ready."""
    deadline = time.monotonic() + UP_TIMEOUT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError, ValueError):
            state: dict[str, Any] = json.loads(path.read_text())
            if state.get("supervisor") == supervisor.pid:
                return state
        if supervisor.poll() is not None:
            tail = log.read_text(errors="replace").splitlines()[-15:]
            raise RuntimeError(
                f"the cluster did not start (exit {supervisor.returncode}); {log}:\n"
                + "\n".join(tail)
            )
        time.sleep(0.05)
    _stop_pids([supervisor.pid])
    raise RuntimeError(f"the cluster was not ready within {UP_TIMEOUT_S} s; see {log}")


UP_TIMEOUT_S = 90.0  # the supervisor's cluster waits 60 s for its workers


def _cmd_up(args: argparse.Namespace) -> int:
    from lepton_ai.wire import generate_token

    path = Path(args.state_file) if args.state_file else default_state_file()
    if path.exists():
        state = json.loads(path.read_text())
        if any(_is_ours(p) for p in state.get("pids", [])):
            raise ValueError(
                f"a cluster is already up ({state['address']}); `lepton cluster down` first"
            )
    data_dir = Path(args.data_dir or path.parent / "cluster-data").resolve()
    if args.data_dir is None and data_dir.exists():
        # The default directory belongs to the last `cluster up` (none runs: checked
        # above): a new cluster starts empty, not replaying that one's jobs and blocks.
        shutil.rmtree(data_dir)
    cmd = _supervisor_command(args, path.resolve(), data_dir)
    for d in (path.parent, data_dir):  # ~/.lepton holds the token: private from the start
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.unlink(missing_ok=True)  # a stale one, from a cluster that is gone
    token = args.token or generate_token()
    log = data_dir / "cluster.log"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "ab") as out:
        # Detached (own session): the cluster outlives this command and its terminal.
        supervisor = subprocess.Popen(
            cmd,
            env=dict(os.environ, LEPTON_TOKEN=token),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    state = _wait_for_state(path, supervisor, log)
    _print(
        args,
        state,
        f"cluster up at {state['address']} (supervisor pid {supervisor.pid}; "
        f"state in {path}; token in the file)",
    )
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
    from lepton_ai.node.process import pid_alive

    path = Path(args.state_file) if args.state_file else default_state_file()
    state = read_state(str(path))
    supervisor = int(state.get("supervisor", 0))
    stopped: list[int] = []
    if supervisor and _is_ours(supervisor):
        # First the supervisor (it stops its members and restarts nothing more),
        # then whatever it left: a member outlives a supervisor that was killed.
        os.kill(supervisor, signal.SIGTERM)
        deadline = time.monotonic() + 15.0
        while pid_alive(supervisor) and time.monotonic() < deadline:
            time.sleep(0.05)
        stopped.append(supervisor)
    stopped += _stop_pids([p for p in state.get("pids", []) if p != supervisor])
    path.unlink(missing_ok=True)
    _print(args, {"stopped": stopped}, f"stopped {len(stopped)} processes")
    return 0


def _merge_supervised(args: argparse.Namespace, status: dict[str, Any]) -> None:
    """Restarts and last exits as ``cluster up``'s supervisor saw them."""
    from lepton_ai.node.member_status import with_typed_health

    if args.address:
        return
    try:
        state = read_state(args.state_file)
    except (ValueError, OSError):
        return
    supervisor = int(state.get("supervisor", 0))
    status["supervisor"] = {"pid": supervisor, "alive": bool(supervisor) and _is_ours(supervisor)}
    known = {(m["role"], m["id"]): m for m in state.get("members", [])}
    for m in status["members"]:
        seen = known.get((m["role"], m["id"]))
        if seen is not None:
            m["restarts"], m["last_exit"] = seen["restarts"], seen["last_exit"]
            if seen["state"] in ("crashloop", "gone"):
                m["health"] = seen["state"]
    with_typed_health(status["members"])


def _cmd_status(args: argparse.Namespace) -> int:
    cluster = connect_from_args(args)
    try:
        status = cluster.status()
    finally:
        cluster.close()
    _merge_supervised(args, status)
    lines = [f"leader {status['leader']}"]
    sup = status.get("supervisor")
    if sup:
        lines.append(
            f"supervisor pid {sup['pid']} "
            + ("(restarts members that die)" if sup["alive"] else "DOWN: nothing restarts members")
        )
    for m in status["members"]:
        exit_note = f"  last exit: {m['last_exit']}" if m.get("last_exit") else ""
        lines.append(
            f"  {m['role']:<12} {m['id']:<6} pid {m['pid']:<8} {m['health']:<9} "
            f"restarts {m.get('restarts', 0):<3} {m['address']}{exit_note}"
        )
    _print(args, status, "\n".join(lines))
    return 0


def _cmd_events(args: argparse.Namespace) -> int:
    from lepton_ai.monitor.timeline import format_event

    cluster = connect_from_args(args)
    try:
        events = cluster.events(args.job or None)
    finally:
        cluster.close()
    if args.last > 0:
        events = events[-args.last :]
    text = "\n".join(format_event(e) for e in events)
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
    cluster = subparsers.add_parser("cluster", help="start, stop or inspect a local cluster")
    sub = cluster.add_subparsers(dest="cluster_command", metavar="SUBCOMMAND", required=True)
    _cluster_subparsers = sub
    up = sub.add_parser(
        "up",
        help="start coordinators and workers in the background, under a supervisor that "
        "restarts them",
    )
    up.add_argument("--workers", type=int, default=2)
    up.add_argument("--slots", type=int, default=1, help="executors per worker")
    up.add_argument(
        "--coordinators",
        type=int,
        default=3,
        help="coordinator replicas: 3 (the default) or 5 survive one or two deaths; 1 is smallest",
    )
    up.add_argument(
        "--standbys",
        type=int,
        default=0,
        help="non-voting coordinators, promoted in place of a voter down for long",
    )
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=0)
    up.add_argument("--token", default=None, help="cluster token (default: generated)")
    up.add_argument(
        "--data-dir",
        default=None,
        help="keep the cluster's log and stored objects here across down and up "
        "(default: a fresh directory next to the state file, emptied at each up)",
    )
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
