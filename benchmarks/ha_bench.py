"""High-availability costs: coordinators=3 vs 1, and a leader SIGKILL mid-job.

    .venv/bin/python benchmarks/ha_bench.py [--trials 5] [--size-mb 50] [--json]

1. start-up of ``LocalCluster(workers=2, coordinators=N)`` for N in 1, 3;
2. 10,000 trivial tasks and a word count (Zipf corpus of ``compute_bench``) on each;
3. extra time of a shuffle job whose leading coordinator is SIGKILLed at ~40%
   of its expected duration, against the same job fault-free (medians).
"""

from __future__ import annotations

import argparse
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


def throughput(coordinators: int, paths: list[str], trivial: int, runs: int) -> dict[str, float]:
    """Medians of ``runs``: start-up, trivial tasks/s, word count seconds."""
    startup: list[float] = []
    rates: list[float] = []
    wordcount: list[float] = []
    digests: set[str] = set()
    for _ in range(runs):
        cluster, wall = _timed(lambda: lep.LocalCluster(workers=2, coordinators=coordinators))
        startup.append(wall)
        with cluster:
            task = lep.DistributedTask(cluster, progress=False)
            task.parallelize(range(4), partitions=4).map(bc.noop).collect()  # warm up
            ds = task.parallelize(range(trivial), partitions=trivial).map(bc.noop)
            res, wall = _timed(ds.collect)
            if list(res) != list(range(trivial)):
                raise AssertionError("trivial tasks: wrong result")
            rates.append(trivial / wall)
            words = task.parallelize(paths, partitions=len(paths)).map(bc.count_file)
            counts, wall = _timed(partial(words.reduce, bc.merge_counts))
            wordcount.append(wall)
            digests.add(bc.digest(Counter(counts)))
    if len(digests) != 1:
        raise AssertionError("word count: results differ between runs")
    return {
        "startup_s": statistics.median(startup),
        "trivial_tasks_per_s": statistics.median(rates),
        "wordcount_s": statistics.median(wordcount),
    }


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
    args = ap.parse_args()
    paths = ensure_corpus(args.size_mb, args.files)
    for path in paths:  # page cache warm for both configurations alike
        Path(path).read_bytes()
    doc: dict[str, Any] = {"size_mb": args.size_mb, "runs": args.runs}
    for n in (1, 3):
        doc[f"coordinators_{n}"] = throughput(n, paths, args.trivial, args.runs)
    doc["failover"] = failover(args.trials)
    one, three = doc["coordinators_1"], doc["coordinators_3"]
    doc["cost"] = {
        "trivial_tasks": 1 - three["trivial_tasks_per_s"] / one["trivial_tasks_per_s"],
        "wordcount": three["wordcount_s"] / one["wordcount_s"] - 1,
    }
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        for key in ("coordinators_1", "coordinators_3", "cost"):
            print(key, {k: round(v, 3) for k, v in doc[key].items()})
        fo = doc["failover"]
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
