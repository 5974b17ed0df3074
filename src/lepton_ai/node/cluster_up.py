"""The detached supervisor behind ``lepton cluster up``.

``python -m lepton_ai.node.cluster_up`` runs a ``LocalCluster`` whose members are
its children in their own sessions, restarts them when they die (the cluster's
``Supervisor``), and keeps the state file (address, token, pids, restarts)
current for ``lepton cluster status/down``. SIGTERM stops the members and it.

Its members do not die with it: if the supervisor itself is killed the cluster
keeps running, unsupervised, as a cluster up was before there was one (status
shows the supervisor down; ``lepton cluster down`` still stops every member). On
a host with systemd, ``deploy/systemd/`` runs each member under the service
manager instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from lepton_ai.node.local_cluster import LocalCluster
from lepton_ai.node.process import private_files
from lepton_ai.node.supervise import member_key

STATE_WRITE_S = 0.5  # how stale the state file's pids and restarts may be


class _UpCluster(LocalCluster):
    tie_children = False


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Atomically: ``lepton cluster status/down`` may read it at any moment."""
    tmp = path.with_name(path.name + ".tmp")
    # 0600 from its creation, not chmodded after: the token lets anyone run code.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(state))
    os.replace(tmp, path)


def cluster_state(cluster: LocalCluster, data_dir: str) -> dict[str, Any]:
    members = [
        {"role": p.role, "id": p.id, "pid": p.pid, **_restarts(cluster, p.role, p.id)}
        for p in list(cluster.procs.values())
    ]
    return {
        "address": cluster.address,
        "token": cluster.token,
        "supervisor": os.getpid(),
        "pids": [os.getpid(), *cluster.pids()],
        "data_dir": data_dir,
        "members": members,
    }


def _restarts(cluster: LocalCluster, role: str, id: str) -> dict[str, Any]:
    rec = cluster.supervisor.record(member_key(role, id)) if cluster.supervisor else None
    if rec is None:
        return {"restarts": 0, "last_exit": "", "state": "running"}
    return {"restarts": rec.restarts, "last_exit": rec.last_exit, "state": rec.verdict or rec.state}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lepton_ai.node.cluster_up")
    p.add_argument("--state-file", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--slots", type=int, default=1)
    p.add_argument("--coordinators", type=int, default=3)
    p.add_argument("--standbys", type=int, default=0)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    private_files()  # the state file (token), the log, the data directories
    logging.basicConfig(level=logging.INFO, format="%(asctime)s supervisor %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    path = Path(args.state_file)
    with open(Path(args.data_dir) / "cluster.log", "ab") as log:
        _UpCluster.log = log
        cluster = _UpCluster(
            workers=args.workers,
            coordinators=args.coordinators,
            slots_per_worker=args.slots,
            standbys=args.standbys,
            data_dir=args.data_dir,
            fsync=True,  # with --data-dir, a cluster keeps its state across `down` and `up`
            host=args.host,
            port=args.port,
            token=os.environ.get("LEPTON_TOKEN") or None,
        )
        try:
            written: dict[str, Any] = {}
            while not stop.is_set():
                state = cluster_state(cluster, args.data_dir)
                if state != written:
                    write_state(path, state)
                    written = state
                stop.wait(STATE_WRITE_S)
        finally:
            cluster.close()


if __name__ == "__main__":
    main()
