"""What monitoring costs: 10,000 trivial tasks with metrics on and with metrics off.

    .venv/bin/python benchmarks/metrics_cost_bench.py [--head HEAD] [--baseline REV]
        [--runs 5] [--tasks 10000] [--scrape-s 1.0] [--json]

"With" is ``--head`` (default this checkout's HEAD) as it ships; "without" is the
same tree with ``LEPTON_METRICS=0`` (no metric sources, no task timeline at the
leader), or with ``--baseline REV`` another commit (9921f15: main before the metrics
layer existed, which also lacks everything landed since). Each is a frozen copy of
its tree (``git worktree``) run in its own interpreter, the two alternating run by
run (ABBA) so a load change on this shared machine hits both alike. During each
"with" run every process's ``/metrics`` is scraped every ``--scrape-s`` seconds
(Prometheus' default is 15 s: 1 s is the pessimistic case). Reported: medians of
tasks/s and of the CPU seconds every cluster process spent, and their ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
METRICS_OFF = {"LEPTON_METRICS": "0"}

# Run inside each tree's interpreter; prints one JSON line.
_RUN = r"""
import json, sys, threading, time
import httpx, psutil
import lepton_ai as lep

def noop(x):
    return x

def cluster_cpu_s():
    total = 0.0
    for p in psutil.Process().children(recursive=True):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total

tasks, scrape_s = int(sys.argv[1]), float(sys.argv[2])
with lep.LocalCluster(workers=2) as cluster:
    task = lep.DistributedTask(cluster, progress=False)
    task.parallelize(range(4), partitions=4).map(noop).collect()  # warm up
    urls = list(getattr(cluster, "metrics_urls", [])) if scrape_s > 0 else []
    stop = threading.Event()
    scrapes = [0]

    def scraper():
        with httpx.Client(timeout=5.0) as client:
            while not stop.wait(scrape_s):
                for u in urls:
                    client.get(u).raise_for_status()
                    scrapes[0] += 1

    # No scraper at all without targets: a wait(0) loop would spin in the driver.
    thread = threading.Thread(target=scraper, daemon=True)
    if urls:
        thread.start()
    ds = task.parallelize(range(tasks), partitions=tasks).map(noop)
    cpu0, t0 = cluster_cpu_s(), time.perf_counter()
    out = ds.collect()
    wall, cpu = time.perf_counter() - t0, cluster_cpu_s() - cpu0
    stop.set()
    if urls:
        thread.join()
    assert list(out) == list(range(tasks)), "wrong result"
    print(json.dumps({"tasks_per_s": tasks / wall, "cluster_cpu_s": cpu, "scrapes": scrapes[0],
                      "targets": len(urls)}))
"""


def frozen_tree(rev: str, into: Path) -> Path:
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", "-f", str(into), rev],
        check=True,
        capture_output=True,
    )
    return into


def one_run(tree: Path, tasks: int, scrape_s: float, extra_env: dict[str, str]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), **extra_env}
    out = subprocess.run(
        [sys.executable, "-c", _RUN, str(tasks), str(scrape_s)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--baseline", default="", help="compare with this commit (default: HEAD, metrics off)"
    )
    ap.add_argument("--head", default="HEAD", help="the tree with metrics (default HEAD)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tasks", type=int, default=10_000)
    ap.add_argument("--scrape-s", type=float, default=1.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="lepton-metrics-bench-") as tmp:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", args.head],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        trees = {"with": frozen_tree(head, Path(tmp) / "with")}
        trees["without"] = (
            frozen_tree(args.baseline, Path(tmp) / "without") if args.baseline else trees["with"]
        )
        envs: dict[str, dict[str, str]] = {"with": {}, "without": METRICS_OFF}
        try:
            samples: dict[str, list[dict[str, Any]]] = {"without": [], "with": []}
            for i in range(args.runs):
                # ABBA: which goes first alternates, so an order effect (a warm page
                # cache, a neighbour's load rising over a round) cancels out.
                order = list(trees.items()) if i % 2 == 0 else list(trees.items())[::-1]
                for name, tree in order:
                    scrape = args.scrape_s if name == "with" else 0.0
                    samples[name].append(one_run(tree, args.tasks, scrape, envs[name]))
        finally:
            for tree in set(trees.values()):
                subprocess.run(
                    ["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                    check=False,
                    capture_output=True,
                )
    report = summarize(samples, args, head)
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


def summarize(
    samples: dict[str, list[dict[str, Any]]], args: argparse.Namespace, head: str
) -> dict[str, Any]:
    med = {
        name: {k: statistics.median(s[k] for s in runs) for k in ("tasks_per_s", "cluster_cpu_s")}
        for name, runs in samples.items()
    }
    return {
        "baseline": args.baseline or f"{head} with LEPTON_METRICS=0",
        "head": head,
        "tasks": args.tasks,
        "runs": args.runs,
        "scrape_s": args.scrape_s,
        "median": med,
        "throughput_ratio": med["with"]["tasks_per_s"] / med["without"]["tasks_per_s"],
        "cpu_ratio": med["with"]["cluster_cpu_s"] / med["without"]["cluster_cpu_s"],
        "runs_detail": samples,
    }


def render(r: dict[str, Any]) -> str:
    m = r["median"]
    return "\n".join(
        [
            f"{r['tasks']:,} trivial tasks, medians of {r['runs']} runs each "
            f"(without = {r['baseline']}, with = {r['head']}, scraped every {r['scrape_s']} s)",
            f"  tasks/s       without {m['without']['tasks_per_s']:8.0f}   "
            f"with {m['with']['tasks_per_s']:8.0f}   ratio {r['throughput_ratio']:.3f}",
            f"  cluster CPU s without {m['without']['cluster_cpu_s']:8.2f}   "
            f"with {m['with']['cluster_cpu_s']:8.2f}   ratio {r['cpu_ratio']:.3f}",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
