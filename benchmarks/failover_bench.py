"""Client-side failover: leader SIGKILL -> the client's next committed write.

    PYTHONPATH=src .venv/bin/python benchmarks/failover_bench.py [--trials 10] [--label after]

(``lepton_ai`` comes from PYTHONPATH, which the cluster's processes inherit: point it
at another checkout's ``src`` to measure that code with this script.)

One ``LocalCluster(workers=1, coordinators=3, restart=False)``. Each trial, a client
writes in a loop; after a few writes the loop itself SIGKILLs the leading
coordinator (``cluster.kill("leader")``) and times the next write from the kill to
its acknowledgement. Two clients, trials alternating between them:

* ``kv``: ``cluster.kv.put`` (the consensus layer's KV client);
* ``coordinator``: a job submission (``SubmitJob`` of a prepared one-task plan,
  committed in the log before the coordinator answers) through the coordinator client.

Also per trial: the server-side election time, from the kill to the new leader's
``leader_elected`` entry in the timeline. The killed coordinator is started again and
caught up before the next trial. Results are merged into
``benchmarks/results/failover.json`` under ``--label`` (``before``/``after`` a change),
so both runs sit side by side; on a shared machine alternate them and quote medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lepton_ai as lep
from lepton_ai.compute.plan import JobOptions

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "failover.json"
WRITES_BEFORE_KILL = 20  # a warm connection to the leader, as a running client has
CATCH_UP_TIMEOUT_S = 30.0


def _kill_leader(cluster: Any) -> tuple[str, float, float]:
    """SIGKILL the leader; (its id, monotonic and wall time just after the kill)."""
    old = cluster.leader_id()
    cluster.kill("coordinator", old)  # the same as kill("leader"), without a second lookup
    return old, time.monotonic(), time.time()


def kv_trial(cluster: Any, n: int) -> tuple[str, float, float]:
    """Write in a loop, kill the leader between two writes, time the next write."""
    for i in range(WRITES_BEFORE_KILL):
        cluster.kv.put("failover", [n, i])
    old, t0, wall = _kill_leader(cluster)
    cluster.kv.put("failover", [n, WRITES_BEFORE_KILL])
    return old, time.monotonic() - t0, wall


def coordinator_trial(cluster: Any, plan: bytes) -> tuple[str, float, float]:
    """Submit jobs in a loop (each committed before its answer), kill, time the next."""
    options = JobOptions(name="failover-bench")
    for _ in range(3):
        cluster.submit_plan(plan, options)
    old, t0, wall = _kill_leader(cluster)
    cluster.submit_plan(plan, options)
    return old, time.monotonic() - t0, wall


def election_s(cluster: Any, killed_at: float) -> float | None:
    """Kill -> the first ``leader_elected`` entry committed after it (wall clocks of
    this host: every process of a LocalCluster shares it)."""
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        elected = [
            e["t"] for e in cluster.events() if e["kind"] == "leader_elected" and e["t"] > killed_at
        ]
        if elected:
            return min(elected) - killed_at
        time.sleep(0.05)
    return None


def restore(cluster: Any, old: str) -> None:
    """Start the killed coordinator again and wait until every replica applied the log."""
    cluster.restart("coordinator", old)
    deadline = time.monotonic() + CATCH_UP_TIMEOUT_S
    while time.monotonic() < deadline:
        statuses = []
        for address in cluster.paxos_addresses:
            try:
                statuses.append(cluster.kv.status(address, 1.0))
            except Exception:  # not up yet: ask again
                statuses = []
                break
        if statuses and any(s.role == "leader" for s in statuses):
            top = max(s.commit_index for s in statuses)
            if all(s.applied_index >= top for s in statuses):
                return
        time.sleep(0.1)
    raise RuntimeError(f"coordinator {old} did not catch up in {CATCH_UP_TIMEOUT_S} s")


def _summary(trials: list[dict[str, Any]]) -> dict[str, Any]:
    client = [t["client_s"] for t in trials]
    elections = [t["election_s"] for t in trials if t["election_s"] is not None]
    return {
        "client_s_median": statistics.median(client),
        "client_s_max": max(client),
        "election_s_median": statistics.median(elections) if elections else None,
        "election_s_max": max(elections) if elections else None,
        "trials": trials,
    }


def run(trials: int) -> dict[str, Any]:
    results: dict[str, list[dict[str, Any]]] = {"kv": [], "coordinator": []}
    with lep.LocalCluster(workers=1, coordinators=3, restart=False) as cluster:
        task = lep.DistributedTask(cluster, progress=False)
        plan = task.parallelize([1], partitions=1).plan_bytes("count")
        cluster.kv.put("failover", "warm-up")
        for n in range(trials):
            for kind in ("kv", "coordinator"):  # alternate: load changes hit both alike
                if kind == "kv":
                    old, client_s, wall = kv_trial(cluster, n)
                else:
                    old, client_s, wall = coordinator_trial(cluster, plan)
                elected = election_s(cluster, wall)
                results[kind].append({"client_s": client_s, "election_s": elected})
                print(
                    f"{kind:11s} trial {n}: client {client_s:.3f} s, election "
                    f"{'-' if elected is None else f'{elected:.3f}'} s",
                    flush=True,
                )
                restore(cluster, old)
    return {kind: _summary(rows) for kind, rows in results.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--label", default="current", help="key of this run in the JSON file")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    load_start = os.getloadavg()
    out = run(args.trials)
    out.update(
        {
            "command": f"python benchmarks/failover_bench.py --trials {args.trials} "
            f"--label {args.label}",
            "code": str(Path(lep.__file__).resolve().parents[1]),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}",
            "load_average_start_end": [load_start[0], os.getloadavg()[0]],
            "at": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
    )
    doc: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    doc[args.label] = out
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    for kind in ("kv", "coordinator"):
        s = out[kind]
        print(
            f"{kind}: client median {s['client_s_median']:.3f} s, max {s['client_s_max']:.3f} s; "
            f"election median {s['election_s_median']} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
