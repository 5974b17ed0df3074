"""Storage benchmark: lepton_ai's object store and big data paths, side by side.

    .venv/bin/python benchmarks/storage_bench.py            # the full run (3 runs, ~15 min)
    .venv/bin/python benchmarks/storage_bench.py --quick    # small sizes, one run
    .venv/bin/python benchmarks/storage_bench.py --profile  # py-spy over the put/get scenario

Scenarios (storage issue), on the default ``lep.LocalCluster(workers=2)`` (its
default fsync setting), medians over runs interleaved in one invocation:

1. ``cluster.storage.put``/``get`` of a 64 MiB object with ``replicas=1`` and
   ``replicas=2``, against writing (write + close) and reading back the same
   bytes as a local file in the same child, back to back, so every lepton figure
   has a local figure taken a moment before or after it. Targets: put with 2
   replicas >= 0.3x the local write, get >= 0.5x the local read. The CPU seconds
   of the driver, the coordinators, the worker agents and the executors are
   recorded around every operation (where the time goes); ``--profile`` runs the
   same scenario under ``py-spy record --subprocesses``.
2. ``parallelize`` + count of ~2,000,000 strings of 100 bytes (200 MB), a
   200 MB int64 array summed per partition, and a ``collect()`` of 1,000,000
   items ``f"{x:012d}" * 8`` (~100 MB), against multiprocessing, Dask and Ray
   with 2 workers each. Target: lepton within 1.5x of the best peer. Every
   result is checked exactly.

Reused from the compute benchmark: the peers' venv ``benchmarks/.venv-compute``
(created on first use), the peer adapters' start/stop (``bench_peers.PEERS``),
one child process group per peer and run (leaks killed by marker), RSS sampling
(``bench_common.PeakSampler``), medians. Results: ``benchmarks/results/storage.json``
and the table in ``docs/benchmarks-storage.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

import compute_bench as cb

ROOT = cb.ROOT
BENCH = cb.BENCH
VENV_PY = cb.VENV_PY
RESULTS_JSON = BENCH / "results" / "storage.json"
RESULTS_MD = ROOT / "docs" / "benchmarks-storage.md"
PEER_ORDER = ("lepton", "multiprocessing", "dask", "ray")
CHILD_KINDS = ("storage", *PEER_ORDER)
CHILD_TIMEOUT_S = {"full": 600.0, "quick": 240.0}
SEED = 2026
MIB = 1 << 20

FULL = {
    "object_mib": 64,
    "storage_reps": 3,  # interleaved put/get/local rounds inside each storage child
    "strings": 2_000_000,
    "array_mb": 200,
    "collect_items": 1_000_000,
    "partitions": 4,  # lepton's default for 2 workers (2 x slots); the same for every peer
    "runs": 3,
}
QUICK = {
    "object_mib": 16,
    "storage_reps": 1,
    "strings": 200_000,
    "array_mb": 20,
    "collect_items": 100_000,
    "partitions": 4,
    "runs": 1,
}
STRING_BYTES = 100
STORAGE_OPS = ("local_write", "local_read", "put_r1", "get_r1", "put_r2", "get_r2")
EXTRA_OPS = ("local_write_fsync",)
COMPUTE = ("strings_count", "array_sum", "collect")
# lepton op -> the local op it is compared with (MB/s ratio of the same round)
PAIRED = {
    "put_r1": "local_write",
    "put_r2": "local_write",
    "get_r1": "local_read",
    "get_r2": "local_read",
}
# lepton op / local op, and the bound it must reach (higher is better)
STORAGE_TARGETS = {
    "put_r2": ("local_write", 0.3),
    "get_r1": ("local_read", 0.5),
    "get_r2": ("local_read", 0.5),
}
COMPUTE_TARGET = 1.5  # lepton's time <= this x the best peer's


# ----------------------------------------------------------------------------------
# Task functions: run in the peers' workers, which import this module by name
# (benchmarks/ is on PYTHONPATH for every process of a child's tree).


def string_item(i: int) -> str:
    return (f"{i:012d}" * 9)[:STRING_BYTES]


def collect_item(x: int) -> str:
    return f"{x:012d}" * 8


def collect_items(bounds: tuple[int, int]) -> list[str]:
    return [collect_item(x) for x in range(bounds[0], bounds[1])]


def chunk_len(chunk: Any) -> int:
    return len(chunk)


def array_sum(chunk: Any) -> int:
    return int(chunk.sum())


def array_sum_partition(chunk: Any) -> list[int]:
    return [int(chunk.sum())]


def _bounds(n: int, parts: int) -> list[tuple[int, int]]:
    step, extra = divmod(n, parts)
    out, lo = [], 0
    for i in range(parts):
        hi = lo + step + (1 if i < extra else 0)
        out.append((lo, hi))
        lo = hi
    return out


def _split(items: list[Any], parts: int) -> list[list[Any]]:
    return [items[lo:hi] for lo, hi in _bounds(len(items), parts)]


# ----------------------------------------------------------------------------------
# Child side: one process (group) per kind and run.


CPU_KINDS = ("driver", "coordinator", "worker", "executor", "other")


def _cluster_cpu() -> dict[str, float]:
    """CPU seconds (user + system) so far of this process and of its children, by kind
    (lepton's coordinators, worker agents, executors; "other": a peer's processes)."""
    import psutil

    me = psutil.Process()
    t = me.cpu_times()
    out = dict.fromkeys(CPU_KINDS, 0.0)
    out["driver"] = t.user + t.system
    for p in me.children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
            t = p.cpu_times()
        except psutil.Error:
            continue
        # executors run as ``python -m lepton_ai.node.exec_boot``
        kind = next((k for k in CPU_KINDS[1:4] if f"lepton_ai.node.{k[:4]}" in cmd), "other")
        out[kind] += t.user + t.system
    return out


def _timed_cpu(fn: Any, *args: Any) -> tuple[Any, float, dict[str, float]]:
    before = _cluster_cpu()
    t0 = time.perf_counter()
    out = fn(*args)
    wall = time.perf_counter() - t0
    after = _cluster_cpu()
    return out, wall, {k: round(after[k] - before[k], 4) for k in before}


def _local_write(path: str, data: bytes, fsync: bool = False) -> None:
    with open(path, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def _local_read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def measure_storage(spec: dict[str, Any]) -> dict[str, Any]:
    """Put/get on a default LocalCluster and local file I/O, interleaved op by op."""
    import bench_common as bc

    import lepton_ai as lep

    size = int(spec["object_mib"]) * MIB
    data = random.Random(SEED).randbytes(size)
    res: dict[str, Any] = {"peer": "storage", "bytes": size}
    samples: dict[str, list[dict[str, Any]]] = {op: [] for op in (*STORAGE_OPS, *EXTRA_OPS)}
    res["samples"] = samples
    tmp = tempfile.mkdtemp(prefix="lepton-storage-bench-")  # same disk as the cluster's dir
    path = os.path.join(tmp, "object.bin")

    def record(op: str, wall: float, cpu: dict[str, float], rep: int) -> None:
        samples[op].append({"rep": rep, "s": wall, "mb_per_s": size / 1e6 / wall, "cpu_s": cpu})

    with bc.PeakSampler() as sampler:
        t0 = time.perf_counter()
        cluster = lep.LocalCluster(workers=2)
        res["startup_s"] = time.perf_counter() - t0
        res["cluster_fsync"] = cluster.fsync
        sampler.slow_down()
        try:
            # A warm-up round, not recorded: connections, page cache, first allocations.
            _local_write(path, data)
            _local_read(path)
            os.unlink(path)
            for n in (1, 2):
                cluster.storage.put("bench/warm-up", data, replicas=n)
                cluster.storage.get("bench/warm-up")
                cluster.storage.delete("bench/warm-up")
            for rep in range(int(spec["storage_reps"])):
                # Rotate which side goes first, so neither always follows the other.
                order = ["local", "r1", "r2"]
                order = order[rep % 3 :] + order[: rep % 3]
                for what in order:
                    if spec.get("profile") and what != "r2":
                        continue  # --profile: only the replicated put/get, many rounds
                    if what == "local":
                        _, wall, cpu = _timed_cpu(lambda: _local_write(path, data))
                        record("local_write", wall, cpu, rep)
                        got, wall, cpu = _timed_cpu(lambda: _local_read(path))
                        if got != data:
                            raise AssertionError("local read returned different bytes")
                        record("local_read", wall, cpu, rep)
                        del got
                        os.unlink(path)
                        _, wall, cpu = _timed_cpu(lambda: _local_write(path, data, fsync=True))
                        record("local_write_fsync", wall, cpu, rep)
                        os.unlink(path)
                        continue
                    n = int(what[1:])
                    key = f"bench/{uuid.uuid4().hex}"
                    info, wall, cpu = _timed_cpu(
                        lambda n=n, key=key: cluster.storage.put(key, data, replicas=n)
                    )
                    if info.size != size or len(set(info.replicas)) != n:
                        raise AssertionError(f"put stored {info}")
                    record(f"put_{what}", wall, cpu, rep)
                    got, wall, cpu = _timed_cpu(lambda key=key: cluster.storage.get(key))
                    if got != data:
                        raise AssertionError(f"get of {n}-replica object returned other bytes")
                    record(f"get_{what}", wall, cpu, rep)
                    del got
                    cluster.storage.delete(key)
        except Exception as exc:
            res["error"] = f"{type(exc).__name__}: {exc}"[:500]
            traceback.print_exc()
        finally:
            res["run_peak_mb"] = sampler.overall_mb()
            cluster.close()
            for name in os.listdir(tmp):
                os.unlink(os.path.join(tmp, name))
            os.rmdir(tmp)
    return res


def _make_inputs(spec: dict[str, Any], scenario: str) -> tuple[Any, Any, float]:
    """(input, expected result, MB of data) for one compute scenario, built untimed."""
    import numpy as np

    if scenario == "strings_count":
        n = int(spec["strings"])
        items = [string_item(i) for i in range(n)]
        return items, n, n * STRING_BYTES / 1e6
    if scenario == "array_sum":
        n = int(spec["array_mb"]) * 1_000_000 // 8
        arr = np.random.default_rng(SEED).integers(0, 2**31, size=n, dtype=np.int64)
        return arr, int(arr.sum()), arr.nbytes / 1e6
    n = int(spec["collect_items"])
    expected = [collect_item(x) for x in range(n)]
    return n, expected, sum(map(len, expected)) / 1e6


def _run_lepton(peer: Any, scenario: str, data: Any, parts: int) -> Any:
    task = peer.task
    if scenario == "strings_count":
        return task.parallelize(data, partitions=parts).count()
    if scenario == "array_sum":
        ds = task.parallelize(data, partitions=parts).map_partitions(array_sum_partition)
        return sum(ds.collect())
    return task.parallelize(range(data), partitions=parts).map(collect_item).collect()


def _run_peer(peer: Any, scenario: str, data: Any, parts: int) -> Any:
    """multiprocessing, Dask, Ray: the data split in the driver, sent explicitly
    (pool pipes, ``client.scatter``, ``ray.put``), one task per chunk."""
    if scenario == "collect":
        chunks: list[Any] = _bounds(data, parts)  # each task builds its items
        fn: Any = collect_items
    else:
        import numpy as np

        chunks = np.array_split(data, parts) if scenario == "array_sum" else _split(data, parts)
        fn = chunk_len if scenario == "strings_count" else array_sum
        if peer.name == "dask" and scenario == "array_sum":
            # Lists go as task arguments (pickled whole): scatter serializes a list
            # item by item, 5.3 s instead of 0.24 s for 200,000 strings.
            chunks = peer.client.scatter(chunks)
        elif peer.name == "ray":
            chunks = [peer.ray.put(c) for c in chunks]
    out = peer.map(fn, chunks)
    if scenario == "collect":
        return [x for part in out for x in part]
    return sum(out)


def measure_compute(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    import bench_common as bc
    import bench_peers as bp

    res: dict[str, Any] = {"peer": name}
    parts = int(spec["partitions"])
    peer = bp.PEERS[name]()
    with bc.PeakSampler() as sampler:
        t0 = time.perf_counter()
        peer.start()
        res["startup_s"] = time.perf_counter() - t0
        sampler.slow_down()
        try:
            for scenario in COMPUTE:
                data, expected, mb = _make_inputs(spec, scenario)
                run = _run_lepton if name == "lepton" else _run_peer
                sampler.reset()
                out, wall, cpu = _timed_cpu(run, peer, scenario, data, parts)
                ok = out == expected
                res[scenario] = {
                    "s": wall,
                    "cpu_s": cpu,
                    "mb": mb,
                    "mb_per_s": mb / wall,
                    "correct": ok,
                    "peak_mb": sampler.peak_mb(),
                }
                if not ok:
                    got = len(out) if isinstance(out, list) else out
                    want = len(expected) if isinstance(expected, list) else expected
                    res[scenario]["error"] = f"wrong result: {got!r} != {want!r}"[:200]
                del data, expected, out
        except Exception as exc:
            res["error"] = f"{type(exc).__name__}: {exc}"[:500]
            traceback.print_exc()
        finally:
            res["run_peak_mb"] = sampler.overall_mb()
            try:
                peer.stop()
            except Exception as exc:
                res["stop_error"] = repr(exc)[:200]
    return res


def child_main(kind: str, spec: dict[str, Any]) -> None:
    try:
        res = measure_storage(spec) if kind == "storage" else measure_compute(kind, spec)
    except Exception as exc:
        res = {"peer": kind, "error": f"{type(exc).__name__}: {exc}"[:500]}
        traceback.print_exc()
    print("RESULT " + json.dumps(res), flush=True)
    sys.stderr.flush()
    os._exit(0)  # as bench_peers: no interpreter shutdown; the parent kills the group


# ----------------------------------------------------------------------------------
# Parent side.


def run_child(kind: str, spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """``compute_bench.run_child`` running this script's ``--child KIND``."""
    program = [str(Path(__file__).resolve()), "--child", kind]
    return cb.run_child(kind, spec, timeout_s, program)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def summarize_storage(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ops: dict[str, Any] = {}
    for op in (*STORAGE_OPS, *EXTRA_OPS):
        samples = [s for r in runs for s in r.get("samples", {}).get(op, [])]
        cpu = {k: _median([s["cpu_s"].get(k, 0.0) for s in samples]) for k in CPU_KINDS}
        ops[op] = {
            "n": len(samples),
            "mb_per_s": _median([s["mb_per_s"] for s in samples]),
            "s": _median([s["s"] for s in samples]),
            "cpu_s": cpu,
        }
    # Ratios of the samples taken back to back (same child, same round), then the median.
    for op, ref in PAIRED.items():
        pairs: list[float] = []
        for r in runs:
            samples = r.get("samples", {})
            refs = {s["rep"]: s["mb_per_s"] for s in samples.get(ref, [])}
            pairs += [
                s["mb_per_s"] / refs[s["rep"]] for s in samples.get(op, []) if s["rep"] in refs
            ]
        ops[op]["vs"] = ref
        ops[op]["paired_ratio"] = _median(pairs)
        ops[op]["paired_ratios"] = [round(x, 3) for x in pairs]
    return {
        "ops": ops,
        "startup_s": _median([r["startup_s"] for r in runs if "startup_s" in r]),
        "run_peak_mb": _median([r["run_peak_mb"] for r in runs if "run_peak_mb" in r]),
        "cluster_fsync": next((r["cluster_fsync"] for r in runs if "cluster_fsync" in r), None),
        "errors": sorted({r["error"][:200] for r in runs if r.get("error")}),
        "leaked_processes": sum(r.get("leaked_processes", 0) for r in runs),
        "load_avg_1m": _median([sum(r["load_avg_1m"]) / 2 for r in runs if "load_avg_1m" in r]),
    }


def summarize_compute(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for peer in PEER_ORDER:
        runs = results.get(peer, [])
        if not runs:
            continue
        agg: dict[str, Any] = {"runs": len(runs)}
        for sc in COMPUTE:
            done = [r[sc] for r in runs if sc in r]
            good = [d for d in done if d["correct"]]
            agg[sc] = {
                "s": _median([d["s"] for d in good]),
                "mb_per_s": _median([d["mb_per_s"] for d in good]),
                "peak_mb": _median([d["peak_mb"] for d in good]),
                "mb": done[0]["mb"] if done else None,
                "cpu_s": {
                    k: _median([d["cpu_s"].get(k, 0.0) for d in good if "cpu_s" in d])
                    for k in CPU_KINDS
                },
                "correct": len(good),
                "runs": len(done),
                "all_s": [round(d["s"], 3) for d in done],
            }
        agg["startup_s"] = _median([r["startup_s"] for r in runs if "startup_s" in r])
        agg["errors"] = sorted(
            {r["error"][:200] for r in runs if r.get("error")}
            | {r[sc]["error"] for r in runs for sc in COMPUTE if r.get(sc, {}).get("error")}
        )
        agg["leaked_processes"] = sum(r.get("leaked_processes", 0) for r in runs)
        agg["load_avg_1m"] = _median(
            [sum(r["load_avg_1m"]) / 2 for r in runs if "load_avg_1m" in r]
        )
        out[peer] = agg
    return out


def check_targets(storage: dict[str, Any], compute: dict[str, Any]) -> dict[str, Any]:
    checks: dict[str, Any] = {}
    ops = storage.get("ops", {})
    for op, (ref, bound) in STORAGE_TARGETS.items():
        value = ops.get(op, {}).get("paired_ratio")
        checks[f"{op}_vs_{ref}"] = {
            "value": value,
            "target": f">= {bound}x",
            "met": value is not None and value >= bound,
        }
    lep = compute.get("lepton", {})
    for sc in COMPUTE:
        mine = lep.get(sc, {}).get("s")
        peers = {p: compute[p][sc]["s"] for p in compute if p != "lepton" and compute[p][sc]["s"]}
        best = min(peers, key=lambda p: peers[p]) if peers else None
        ratio = _ratio(mine, peers[best]) if best else None
        checks[sc] = {
            "value": ratio,
            "best_peer": best,
            "target": f"lepton time <= {COMPUTE_TARGET}x best peer",
            "met": bool(
                ratio is not None
                and ratio <= COMPUTE_TARGET
                and lep[sc]["correct"] == lep[sc]["runs"]
            ),
        }
    return checks


def _fmt(v: Any, nd: int = 0) -> str:
    return cb._fmt(v, nd)


OP_NAMES = {
    "local_write": "local file write (write + close)",
    "local_read": "local file read back",
    "local_write_fsync": "local file write + fsync (reference only)",
    "put_r1": "`storage.put`, replicas=1",
    "put_r2": "`storage.put`, replicas=2",
    "get_r1": "`storage.get`, replicas=1",
    "get_r2": "`storage.get`, replicas=2",
}
SCENARIO_NAMES = {
    "strings_count": "parallelize + count, {strings:,} strings of 100 B ({mb:.0f} MB)",
    "array_sum": "parallelize + per-partition sum, int64 array ({mb:.0f} MB)",
    "collect": "collect() of {collect_items:,} items of 96 B ({mb:.0f} MB)",
}


def _storage_table(doc: dict[str, Any]) -> list[str]:
    ops = doc["summary"]["storage"]["ops"]
    targets = doc["targets"]
    lines = [
        "| operation | MB/s (median) | vs local (paired median) | target | CPU s: driver"
        " / coordinators / worker agents / executors |",
        "|---|---|---|---|---|",
    ]
    for op in ("local_write", "put_r1", "put_r2", "local_read", "get_r1", "get_r2", *EXTRA_OPS):
        o = ops.get(op, {})
        ratio = o.get("paired_ratio")
        target = "—"
        if op in STORAGE_TARGETS:
            ref, bound = STORAGE_TARGETS[op]
            met = targets[f"{op}_vs_{ref}"]["met"]
            target = f">= {bound}x: {'met' if met else 'MISSED'}"
        cpu = o.get("cpu_s", {})
        cpu_cell = " / ".join(
            _fmt(cpu.get(k), 2) for k in ("driver", "coordinator", "worker", "executor")
        )
        ratio_cell = "—" if ratio is None else f"{ratio:.2f}x"
        lines.append(
            f"| {OP_NAMES[op]} | {_fmt(o.get('mb_per_s'))} | {ratio_cell} | {target} | {cpu_cell} |"
        )
    return lines


def _compute_table(doc: dict[str, Any]) -> list[str]:
    comp = doc["summary"]["compute"]
    cfg = doc["config"]
    peers = [p for p in PEER_ORDER if p in comp]
    lines = [
        "| scenario (seconds, median) | "
        + " | ".join(peers)
        + " | lepton / best peer | target <= 1.5x |",
        "|---|" + "---|" * (len(peers) + 2),
    ]
    for sc in COMPUTE:
        mb = next((comp[p][sc]["mb"] for p in peers if comp[p][sc].get("mb")), 0.0)
        cells = []
        for p in peers:
            c = comp[p][sc]
            cell = _fmt(c["s"], 2)
            if c["correct"] != c["runs"]:
                cell += f" ({c['correct']}/{c['runs']} correct)"
            cells.append(cell)
        t = doc["targets"].get(sc, {})
        ratio = "—" if t.get("value") is None else f"{t['value']:.2f}x ({t['best_peer']})"
        met = "met" if t.get("met") else "MISSED"
        name = SCENARIO_NAMES[sc].format(mb=mb, **cfg)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {ratio} | {met} |")
    lines.append(
        "| start-up, 2 workers (s) | "
        + " | ".join(_fmt(comp[p].get("startup_s"), 2) for p in peers)
        + " | | |"
    )
    return lines


METHOD = """How each figure is taken (benchmarks/storage_bench.py):

- put/get: one child process starts `lep.LocalCluster(workers=2)` (3 coordinators, 2 worker
  nodes, the default fsync setting: off, object chunks are written but not fsynced) and, in
  rounds whose order rotates, writes the object's random bytes to a local file in the same
  temp directory (`open('wb').write(data)` + close), reads it back, then `put(key, data,
  replicas=n)` + `get(key)` for n = 1 and 2; every get and read is compared with the data.
  The ratio is taken per round (each lepton figure against the local figure of the same
  round) and its median reported. Both sides read from the page cache. CPU seconds are
  user + system time of the driver and of each kind of lepton process during the operation.
- compute: each peer in its own child (process group), the same number of partitions/chunks
  (4) for all, input built untimed, the timed part includes moving the data to the workers:
  lepton `parallelize(items, partitions=4).count()`,
  `parallelize(array, 4).map_partitions(sum)`, `parallelize(range(n), 4).map(item).collect()`;
  multiprocessing `ProcessPoolExecutor(2).map` over the chunks; Dask `client.map` over the
  chunks (lists as task arguments: `client.scatter` serializes a list item by item, 20x
  slower; arrays `client.scatter`ed), `LocalCluster(n_workers=2, threads_per_worker=1)`;
  Ray `ray.put` per chunk + one task each (`ray.init(num_cpus=2)`). collect: one task per
  chunk of the range building its items (lepton: `.map` per item). Every count, sum and
  collected list is compared exactly with the expected one.
"""


def render_markdown(doc: dict[str, Any]) -> str:
    s = doc["summary"]
    st = s["storage"]
    loads = ", ".join(
        f"{p} {s['compute'][p]['load_avg_1m']:.1f}"
        for p in PEER_ORDER
        if s["compute"].get(p, {}).get("load_avg_1m")
    )
    met = [k for k, c in doc["targets"].items() if c["met"]]
    missed = [k for k, c in doc["targets"].items() if not c["met"]]
    cfg = doc["config"]
    lines = [
        "# Storage benchmark: lepton_ai object store and big data paths",
        "",
        f"Command: `{doc['command']}` (peers live in `benchmarks/.venv-compute`, created by the "
        "script).",
        "",
        f"Measured {doc['date']} on {doc['machine']}; {cfg['runs']} run(s) per peer, interleaved "
        f"(rotating order), {cfg['storage_reps']} put/get round(s) per storage run. The machine "
        "is shared with other work: absolute numbers are noisy, the ratios (taken from "
        "interleaved runs) less so. Median 1-minute load average (2 cores): storage "
        f"{_fmt(st.get('load_avg_1m'), 1)}, {loads}.",
        "",
        f"## put/get of a {cfg['object_mib']} MiB object (cluster fsync: "
        f"{'on' if st.get('cluster_fsync') else 'off'}, the LocalCluster default)",
        "",
        *_storage_table(doc),
        "",
        "## 200 MB parallelize and 100 MB collect against multiprocessing, Dask, Ray",
        "",
        *_compute_table(doc),
        "",
        f"Targets met: {', '.join(met) or 'none'}. Missed: {', '.join(missed) or 'none'}.",
        "",
        METHOD.rstrip(),
    ]
    errors = [f"- storage: {e}" for e in st.get("errors", [])] + [
        f"- {p}: {e}" for p in PEER_ORDER for e in s["compute"].get(p, {}).get("errors", [])
    ]
    if errors:
        lines += ["", "Errors:", *errors]
    if doc.get("notes"):
        lines += ["", "## Profile: where the time goes", "", *doc["notes"]]
    return "\n".join(lines) + "\n"


def build_doc(
    results: dict[str, list[dict[str, Any]]], config: dict[str, Any], command: str
) -> dict[str, Any]:
    storage = summarize_storage(results.get("storage", []))
    compute = summarize_compute(results)
    return {
        "command": command,
        "argv": shlex.join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} cores, {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()}, load avg {os.getloadavg()[0]:.1f}",
        "config": config,
        "summary": {"storage": storage, "compute": compute},
        "targets": check_targets(storage, compute),
        "raw": results,
    }


def profile(spec: dict[str, Any], top: int) -> int:
    """The put/get scenario under py-spy (all processes), summarized per process kind."""
    import profile_lepton

    pyspy = VENV_PY.parent / "py-spy"
    if not pyspy.exists():
        subprocess.run([str(VENV_PY), "-m", "pip", "install", "-q", "py-spy"], check=True)
    spec = dict(spec, storage_reps=12, profile=True)
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
            str(VENV_PY),
            str(Path(__file__).resolve()),
            "--child",
            "storage",
            "--spec",
            json.dumps(spec),
        ]
        env = dict(os.environ, PYTHONPATH=str(BENCH))
        proc = subprocess.run(
            cmd, env=env, cwd=BENCH, capture_output=True, text=True, timeout=600, check=False
        )
        for line in proc.stdout.splitlines():
            if line.startswith("RESULT "):
                res = json.loads(line[len("RESULT ") :])
                for op in ("put_r2", "get_r2"):
                    mbs = [x["mb_per_s"] for x in res.get("samples", {}).get(op, [])]
                    print(f"{op:12s} {_fmt(_median(mbs))} MB/s (under py-spy)")
        if not raw.exists():
            print(proc.stderr[-2000:])
            return 1
        profile_lepton.summarize(raw, top)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="small sizes and one run")
    ap.add_argument("--runs", type=int, help="runs per peer (default 3, 1 with --quick)")
    ap.add_argument("--peers", default=",".join(CHILD_KINDS), help="comma-separated subset")
    ap.add_argument("--write", action="store_true", help="store the results of a --quick run too")
    ap.add_argument("--render", action="store_true", help="rebuild the markdown from the JSON")
    ap.add_argument("--profile", action="store_true", help="py-spy over the put/get scenario")
    ap.add_argument("--top", type=int, default=12, help="functions shown per process (--profile)")
    ap.add_argument("--child", choices=CHILD_KINDS, help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        # Through the module's name, so the task functions pickle by reference.
        import storage_bench

        storage_bench.child_main(args.child, json.loads(args.spec))
        return 0
    if args.render:
        doc = json.loads(RESULTS_JSON.read_text())
        notes = doc.get("notes")
        kept = {k: doc[k] for k in ("date", "machine", "argv")}
        doc = build_doc(doc["raw"], doc["config"], doc["command"]) | kept
        if notes:
            doc["notes"] = notes
        RESULTS_JSON.write_text(json.dumps(doc, indent=1) + "\n")
        RESULTS_MD.write_text(render_markdown(doc))
        print(RESULTS_MD.read_text())
        return 0
    mode = "quick" if args.quick else "full"
    config = dict(QUICK if args.quick else FULL)
    if args.runs is not None:
        if args.runs <= 0:
            ap.error("--runs must be > 0")
        config["runs"] = args.runs
    kinds = [k for k in args.peers.split(",") if k]
    if unknown := set(kinds) - set(CHILD_KINDS):
        ap.error(f"unknown peers: {sorted(unknown)}")
    cb.ensure_venv()
    cb.compile_lepton()
    if args.profile:
        return profile(config, args.top)
    timeout_s = CHILD_TIMEOUT_S[mode]
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    for run in range(int(config["runs"])):
        order = kinds[run % len(kinds) :] + kinds[: run % len(kinds)]  # rotate: share the noise
        for kind in order:
            print(f"run {run + 1}/{config['runs']}: {kind} ...", flush=True)
            results[kind].append(run_child(kind, config, timeout_s))
    command = (
        "python benchmarks/storage_bench.py"
        if not args.quick
        else "python benchmarks/storage_bench.py --quick"
    )
    doc = build_doc(results, config, command)
    store = args.write or not args.quick
    if store:
        RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
        RESULTS_JSON.write_text(json.dumps(doc, indent=1) + "\n")
    md = render_markdown(doc)
    print(md)
    if store:
        RESULTS_MD.parent.mkdir(parents=True, exist_ok=True)
        RESULTS_MD.write_text(md)
        print(f"wrote {RESULTS_JSON.relative_to(ROOT)} and {RESULTS_MD.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
