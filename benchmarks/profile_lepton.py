"""Profile one lepton benchmark scenario across all its processes with py-spy.

    benchmarks/.venv-compute/bin/pip install py-spy      # once
    benchmarks/.venv-compute/bin/python benchmarks/profile_lepton.py trivial --tasks 5000

Runs the scenario under ``py-spy record --subprocesses --format raw`` (collapsed
stacks of the driver, the coordinator, the worker agents and the executors),
then prints, per process kind, where the samples went: the top leaf functions
(self time) and the top functions by inclusive time. Needs root or ptrace rights.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def scenario(name: str, tasks: int, corpus: str | None) -> None:
    import bench_common as bc

    import lepton_ai as lep

    t0 = time.perf_counter()
    with lep.LocalCluster(workers=2) as cluster:
        print(f"startup {time.perf_counter() - t0:.3f} s", flush=True)
        task = lep.DistributedTask(cluster, progress=False)
        t0 = time.perf_counter()
        if name == "trivial":
            out = task.parallelize(list(range(tasks)), partitions=tasks).map(bc.noop).collect()
            assert out == list(range(tasks))
        elif name == "cpu":
            task.parallelize([bc.CPU_TASK_S] * tasks, partitions=tasks).map(bc.burn).collect()
        elif name == "wordcount":
            if corpus is None:
                raise SystemExit("--corpus DIR is needed for wordcount")
            paths = sorted(str(p) for p in Path(corpus).glob("*.txt"))
            task.parallelize(paths, partitions=len(paths)).map(bc.count_file).reduce(
                bc.merge_counts
            )
        print(f"{name} {time.perf_counter() - t0:.3f} s", flush=True)


_KIND = re.compile(r"lepton_ai\.node\.(coordinator|worker|executor)")


def summarize(raw: Path, top: int) -> None:
    """py-spy raw lines: 'process (pid) ...;frame;frame N'."""
    self_t: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    incl: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    totals: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        frames = stack.split(";")
        procs = [f for f in frames if f.startswith("process ")]
        m = _KIND.search(procs[-1]) if procs else None  # nested: the innermost process
        kind = m.group(1) if m else "driver"
        count = int(n)
        totals[kind] += count
        funcs = [
            f.split(" (")[0] + " " + f.split("/")[-1].rstrip(")")
            for f in frames
            if not f.startswith(("process ", "thread "))
        ]
        if funcs:
            self_t[kind][funcs[-1]] += count
            for f in set(funcs):
                incl[kind][f] += count
    for kind, total in totals.most_common():
        print(f"\n== {kind}: {total} samples")
        print("  self:")
        for f, c in self_t[kind].most_common(top):
            print(f"    {100 * c / total:5.1f}%  {f}")
        print("  inclusive:")
        for f, c in incl[kind].most_common(top):
            print(f"    {100 * c / total:5.1f}%  {f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("scenario", choices=["startup", "trivial", "cpu", "wordcount"])
    ap.add_argument("--tasks", type=int, default=5000)
    ap.add_argument("--corpus", help="directory of *.txt files (wordcount)")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        scenario(args.scenario, args.tasks, args.corpus)
        return 0
    pyspy = Path(sys.executable).parent / "py-spy"
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "profile.txt"
        cmd = [
            str(pyspy),
            "record",
            "--subprocesses",
            "--format",
            "raw",
            "--rate",
            "200",
            "--nonblocking",
            "-o",
            str(raw),
            "--",
            sys.executable,
            __file__,
            args.scenario,
            "--tasks",
            str(args.tasks),
            "--child",
        ]
        if args.corpus:
            cmd += ["--corpus", args.corpus]
        subprocess.run(cmd, check=True, env=dict(os.environ, PYTHONPATH=str(HERE)))
        summarize(raw, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
