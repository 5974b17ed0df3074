"""Measure failover and job times on a 5-host bed (the figures of docs/multi-host.md).

    sudo PYTHONPATH=src .venv/bin/python tests/hosts/measure.py [--trials 10] [--job-trials 3]

Leader isolation trials: a writer thread puts back to back through ``cluster.kv``'s
client (default ``KvClientConfig``: 10 s deadline, 2 s per attempt); the leader's host
is cut off from every other host (not from the client); measured from the moment the
drop rules are in place: when a majority-side coordinator first reports itself
leader (status polled every ~50 ms) and when the writer's next write is acknowledged.
Then heal and wait for convergence. Job trials: the same word count as the tests,
without a fault and with the leader isolated 0.5 s after submission until the job
has finished (the job completes through the partition). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: ``hosts`` importable

from hosts.bedcluster import BedCluster, converged
from hosts.netbed import NetBed, available
from hosts.workload import corpus, submit_wordcount
from lepton_ai.consensus.client_sync import KV
from lepton_ai.errors import LeptonError

STUCK_S = 0.05  # a write in flight at the fault and acked later than this was held up by it
TEXT = corpus(600, seed=13)
PARTITIONS = 6
PAUSE_S = 0.6


class Writer:
    """Back-to-back puts; (call, ret) of each acknowledged one, on the monotonic clock."""

    def __init__(self, cluster: BedCluster) -> None:
        self.kv = KV(cluster.paxos_addresses, token=cluster.token)
        self.acks: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            call = time.monotonic()
            try:
                self.kv.put("measure/w", n)
            except (LeptonError, OSError, TimeoutError):
                continue
            self.acks.append((call, time.monotonic()))

    def next_ack_after(self, t: float, timeout_s: float = 30.0) -> float:
        """Seconds from ``t`` to the first write acknowledged because of the new leader."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            later = [r - t for c, r in list(self.acks) if c >= t or r - t > STUCK_S]
            if later:
                return min(later)
            time.sleep(0.01)
        raise TimeoutError("no write acknowledged after the fault")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(15)
        self.kv.close()


def isolation_trial(cluster: BedCluster, writer: Writer) -> dict[str, Any]:
    old = cluster.wait_leader(cluster.coordinator_hosts, 10)
    others = [h for h in range(len(cluster.bed.hosts)) if h != old]
    cluster.bed.partition([old], others)
    t = time.monotonic()
    majority = [c for c in cluster.coordinator_hosts if c != old]
    new = cluster.wait_leader(majority, 15)
    elected = time.monotonic() - t
    write = writer.next_ack_after(t)
    cluster.bed.heal()
    converged(cluster)
    time.sleep(1.0)
    return {"old": old, "new": new, "new_leader_s": elected, "next_write_s": write}


def kill_trial(cluster: BedCluster, writer: Writer) -> dict[str, Any]:
    """SIGKILL every process of the leader's host (issue 13's client failover figure,
    across hosts), then start it again."""
    old = cluster.wait_leader(cluster.coordinator_hosts, 10)
    cluster.kill_host(old)
    t = time.monotonic()
    majority = [c for c in cluster.coordinator_hosts if c != old]
    new = cluster.wait_leader(majority, 15)
    elected = time.monotonic() - t
    write = writer.next_ack_after(t)
    cluster.restart_host(old)
    converged(cluster)
    time.sleep(1.0)
    return {"old": old, "new": new, "new_leader_s": elected, "next_write_s": write}


def job_trial(cluster: BedCluster, lc: Any, partitioned: bool) -> float:
    started = time.monotonic()
    job = submit_wordcount(lc, TEXT, PARTITIONS, PAUSE_S, "measure")
    if partitioned:
        time.sleep(0.5)
        old = cluster.wait_leader(cluster.coordinator_hosts, 10)
        cluster.bed.partition([old], [h for h in range(len(cluster.bed.hosts)) if h != old])
    try:
        job.result(timeout=120)
        return time.monotonic() - started
    finally:
        cluster.bed.heal()
        converged(cluster)
        time.sleep(1.0)


def summary(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
        "n": len(values),
    }


def measure(cluster: BedCluster, trials: int, job_trials: int) -> dict[str, Any]:
    writer = Writer(cluster)
    try:
        runs = [isolation_trial(cluster, writer) for _ in range(trials)]
        kills = [kill_trial(cluster, writer) for _ in range(trials)]
    finally:
        writer.close()
    with cluster.connect() as lc:
        plain = [job_trial(cluster, lc, False) for _ in range(job_trials)]
        cut = [job_trial(cluster, lc, True) for _ in range(job_trials)]
    return {
        "isolation_trials": runs,
        "new_leader_s": summary([r["new_leader_s"] for r in runs]),
        "next_write_s": summary([r["next_write_s"] for r in runs]),
        "kill_trials": kills,
        "kill_new_leader_s": summary([r["new_leader_s"] for r in kills]),
        "kill_next_write_s": summary([r["next_write_s"] for r in kills]),
        "job_s_no_fault": summary(plain),
        "job_s_leader_isolated": summary(cut),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="measure", description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--job-trials", type=int, default=3)
    args = parser.parse_args(argv)
    why = available()
    if why:
        print(f"measure: {why}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="lepton-measure-") as tmp, NetBed(5) as bed:
        cluster = BedCluster(bed, tmp)
        try:
            cluster.wait_ready()
            print(json.dumps(measure(cluster, args.trials, args.job_trials), indent=1))
        finally:
            cluster.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
