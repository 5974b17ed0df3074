"""High-availability costs: coordinators=3 vs 1, and a leader SIGKILL mid-job.

    .venv/bin/python benchmarks/ha_bench.py [--trials 5] [--size-mb 50] [--no-failover] [--json]

1. start-up of ``LocalCluster(workers=2, coordinators=N)`` for N in 1, 3;
2. 10,000 trivial tasks and a word count (Zipf corpus of ``compute_bench``) on each,
   the two configurations alternating run by run; also the CPU seconds all cluster
   processes spent on the trivial tasks (steadier than wall time on a shared machine);
3. extra time of a shuffle job whose leading coordinator is SIGKILLed at ~40%
   of its expected duration, against the same job fault-free (medians).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc
import cloudpickle
import psutil
from compute_bench import ensure_corpus

import lepton_ai as lep

cloudpickle.register_pickle_by_value(sys.modules[__name__])
cloudpickle.register_pickle_by_value(bc)


def slow_pairs(chunk: range) -> Any:
    time.sleep(0.1)
    return ((x % 97, x) for x in chunk)


def shuffle_job(cluster: Any) -> Any:
    task = lep.DistributedTask(cluster, progress=False)
    ds = task.parallelize(range(40_000), partitions=40).map_partitions(slow_pairs)
    return ds.reduce_by_key(lambda a, b: a + b, partitions=4).submit()


def _timed(fn: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _cluster_cpu_s() -> float:
    """CPU seconds used so far by this process's children (the cluster's processes)."""
    total = 0.0
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            total += t.user + t.system
    return total


def _one_run(coordinators: int, paths: list[str], trivial: int) -> dict[str, Any]:
    cluster, startup = _timed(lambda: lep.LocalCluster(workers=2, coordinators=coordinators))
    with cluster:
        task = lep.DistributedTask(cluster, progress=False)
        task.parallelize(range(4), partitions=4).map(bc.noop).collect()  # warm up
        ds = task.parallelize(range(trivial), partitions=trivial).map(bc.noop)
        cpu0 = _cluster_cpu_s()
        res, wall = _timed(ds.collect)
        cpu = _cluster_cpu_s() - cpu0
        if list(res) != list(range(trivial)):
            raise AssertionError("trivial tasks: wrong result")
        words = task.parallelize(paths, partitions=len(paths)).map(bc.count_file)
        counts, wc_wall = _timed(partial(words.reduce, bc.merge_counts))
    return {
        "startup_s": startup,
        "trivial_tasks_per_s": trivial / wall,
        "trivial_cluster_cpu_s": cpu,
        "wordcount_s": wc_wall,
        "digest": bc.digest(Counter(counts)),
    }


def throughput(paths: list[str], trivial: int, runs: int) -> dict[str, Any]:
    """Medians of ``runs`` per configuration; the configurations alternate run by run so
    that a load change on a shared machine hits both alike."""
    samples: dict[int, list[dict[str, Any]]] = {1: [], 3: []}
    for _ in range(runs):
        for n in (1, 3):
            samples[n].append(_one_run(n, paths, trivial))
    if len({s["digest"] for runs_ in samples.values() for s in runs_}) != 1:
        raise AssertionError("word count: results differ between runs")
    keys = ("startup_s", "trivial_tasks_per_s", "trivial_cluster_cpu_s", "wordcount_s")
    out: dict[str, Any] = {
        f"coordinators_{n}": {k: statistics.median(s[k] for s in runs_) for k in keys}
        for n, runs_ in samples.items()
    }
    # Every run too: on a shared machine one slow run says more about the load than
    # about the configuration, and the spread shows how far to trust the medians.
    out["runs_detail"] = {
        f"coordinators_{n}": [{k: round(s[k], 3) for k in keys} for s in runs_]
        for n, runs_ in samples.items()
    }
    return out


def failover(trials: int) -> dict[str, Any]:
    clean: list[float] = []
    faulted: list[float] = []
    elections: list[float] = []
    with lep.LocalCluster(workers=2, coordinators=3) as cluster:
        for _ in range(2):
            job, wall = _timed(lambda: shuffle_job(cluster).result(timeout=120))
            clean.append(wall)
        base = statistics.median(clean)
        for _ in range(trials):
            t0 = time.perf_counter()
            job = shuffle_job(cluster)
            time.sleep(0.4 * base)
            old = cluster.leader_id()
            cluster.kill("leader")
            job.result(timeout=120)
            faulted.append(time.perf_counter() - t0)
            events = cluster.events()
            kill_t = max(e["t"] for e in events if e["kind"] == "fault_injected")
            elected = [e["t"] for e in events if e["kind"] == "leader_elected" and e["t"] > kill_t]
            if elected:
                elections.append(min(elected) - kill_t)
            cluster.restart("coordinator", old)
            time.sleep(0.5)
    return {
        "clean_s": clean,
        "faulted_s": faulted,
        "extra_s_median": statistics.median(faulted) - statistics.median(clean),
        "extra_s_max": max(faulted) - statistics.median(clean),
        "election_s": elections,
        "election_s_median": statistics.median(elections) if elections else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--size-mb", type=int, default=50)
    ap.add_argument("--files", type=int, default=32)
    ap.add_argument("--trivial", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=3, help="runs per configuration (medians)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument(
        "--no-failover", action="store_true", help="only start-up and throughput (no SIGKILLs)"
    )
    args = ap.parse_args()
    paths = ensure_corpus(args.size_mb, args.files)
    for path in paths:  # page cache warm for both configurations alike
        Path(path).read_bytes()
    doc: dict[str, Any] = {"size_mb": args.size_mb, "runs": args.runs}
    doc.update(throughput(paths, args.trivial, args.runs))
    if not args.no_failover:
        doc["failover"] = failover(args.trials)
    one, three = doc["coordinators_1"], doc["coordinators_3"]
    doc["cost"] = {
        "trivial_tasks": 1 - three["trivial_tasks_per_s"] / one["trivial_tasks_per_s"],
        "wordcount": three["wordcount_s"] / one["wordcount_s"] - 1,
        "trivial_cluster_cpu": three["trivial_cluster_cpu_s"] / one["trivial_cluster_cpu_s"] - 1,
    }
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        for key in ("coordinators_1", "coordinators_3", "cost"):
            print(key, {k: round(v, 3) for k, v in doc[key].items()})
        fo = doc.get("failover")
        if fo is None:
            return 0
        print(
            f"leader SIGKILL at ~40% (trials {len(fo['faulted_s'])}): "
            f"clean {[round(x, 2) for x in fo['clean_s']]} s, "
            f"faulted {[round(x, 2) for x in fo['faulted_s']]} s, "
            f"extra median {fo['extra_s_median']:.2f} s, max {fo['extra_s_max']:.2f} s; "
            f"kill -> leader_elected median {fo['election_s_median']} s "
            f"({[round(x, 2) for x in fo['election_s']]})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
