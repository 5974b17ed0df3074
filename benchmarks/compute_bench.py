"""Compute benchmark: lepton_ai against multiprocessing, Dask and Ray, side by side.

    make bench                                   # the full run (about 10 minutes)
    .venv/bin/python benchmarks/compute_bench.py --quick   # small sizes, one run

Scenarios (issue 2), medians over ``--runs`` runs, each peer in its own process
group (memory measured per peer, a crash or hang of one does not stop the rest):

1. start-up of a 2-worker cluster (until 2 trivial tasks came back) and the
   peak RSS summed over the whole process tree during it;
2. 10,000 trivial tasks (tasks/s) and 1,000 tasks of 10 ms CPU each (efficiency
   against the 2-core ideal of 5 s);
3. word count over a seeded ~200 MB Zipf corpus in 64 files (MB/s; every
   result is checked against a serial count);
4. the same word count with one worker SIGKILLed at 40% of the fault-free time
   (completes? correct? slowdown against the lost work plus 1 s).

Dask and Ray are not project dependencies: they live in ``benchmarks/.venv-compute``,
which this script creates on first use (``python3 -m venv`` and ``pip install -e
. 'dask[distributed]' ray psutil``). Results: ``benchmarks/results/compute.json``
and the table in ``docs/benchmarks-compute.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from peer_venv import ensure_peer_venv

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
VENV = BENCH / ".venv-compute"
VENV_PY = VENV / "bin" / "python"
RESULTS_JSON = BENCH / "results" / "compute.json"
RESULTS_MD = ROOT / "docs" / "benchmarks-compute.md"
CORPUS_ROOT = BENCH / "results" / "tmp"
PEER_ORDER = ("lepton", "multiprocessing", "dask", "ray")
PEER_PACKAGES = ("dask[distributed]", "ray", "psutil")
CHILD_TIMEOUT_S = {"full": 900.0, "quick": 300.0}
MARKER_ENV = "LEPTON_BENCH_RUN"

FULL = {"corpus_mb": 200, "files": 64, "trivial_tasks": 10_000, "cpu_tasks": 1_000, "runs": 3}
QUICK = {"corpus_mb": 20, "files": 64, "trivial_tasks": 2_000, "cpu_tasks": 200, "runs": 1}
KILL_FRACTION = 0.4
SEED = 2026

TARGETS = {
    "startup_s": ("<=", 0.8),
    "startup_peak_mb": ("<=", 250.0),
    "trivial_tasks_per_s": (">=", 4000.0),
    "cpu_efficiency": (">=", 0.90),
}


def ensure_venv() -> None:
    """Create or repair the peers' venv; a no-op when everything imports."""
    ensure_peer_venv(
        VENV,
        ["-e", str(ROOT), *PEER_PACKAGES],
        "import dask.distributed, ray, psutil, numpy, lepton_ai.data.synthetic",
        "dask, ray",
    )


def compile_lepton() -> None:
    """Byte-compile lepton_ai's sources, as ``pip install`` does for the peers.

    lepton_ai is installed editable, so pip wrote no ``.pyc`` for it, and with
    ``PYTHONDONTWRITEBYTECODE`` set (as on the benchmark machine) none is written
    at import either: every coordinator, agent and executor would compile every
    module it imports at each start (~0.04 s of CPU per process), while Dask,
    Ray and the standard library load compiled code. Stale files are harmless:
    Python checks each against its source.
    """
    subprocess.run([VENV_PY, "-m", "compileall", "-q", str(ROOT / "src" / "lepton_ai")], check=True)


def ensure_corpus(size_mb: int, files: int) -> list[str]:
    """The Zipf corpus, generated once per (seed, size, files) and kept (gitignored)."""
    directory = CORPUS_ROOT / f"zipf-s{SEED}-{size_mb}mb-{files}f"
    manifest = directory / "MANIFEST.json"
    if manifest.exists():
        paths: list[str] = json.loads(manifest.read_text())["paths"]
        if all(Path(p).exists() for p in paths):
            return paths
    directory.mkdir(parents=True, exist_ok=True)
    print(f"generating {size_mb} MB Zipf corpus in {directory.relative_to(ROOT)} ...", flush=True)
    code = (
        "import json, sys\n"
        "from lepton_ai.data.synthetic import write_zipf_corpus\n"
        f"spec = write_zipf_corpus({str(directory)!r}, {size_mb * 1_000_000}, {files}, {SEED})\n"
        "print(json.dumps([str(p) for p in spec.paths]))\n"
    )
    out = subprocess.run([VENV_PY, "-c", code], check=True, capture_output=True, text=True)
    paths = json.loads(out.stdout.strip().splitlines()[-1])
    manifest.write_text(json.dumps({"seed": SEED, "paths": paths}))
    return paths


def _kill_marked(marker: str) -> int:
    """SIGKILL processes that carry this child's marker and outlived it (leaks)."""
    import psutil

    killed = 0
    for p in psutil.process_iter(["pid"]):
        try:
            if p.pid != os.getpid() and p.environ().get(MARKER_ENV) == marker:
                p.kill()
                killed += 1
        except psutil.Error:
            continue
    return killed


def run_child(
    peer: str, spec: dict[str, Any], timeout_s: float, program: list[str] | None = None
) -> dict[str, Any]:
    """One peer's measurements in a child (own session, marker, leaked processes killed
    by marker only, the load average kept with the result). ``program``: the script
    and its leading arguments (default ``bench_peers.py PEER``); ``--spec`` follows."""
    marker = uuid.uuid4().hex
    load_before = os.getloadavg()[0]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH), env.get("PYTHONPATH")]))
    env[MARKER_ENV] = marker
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    program = program or [str(BENCH / "bench_peers.py"), peer]
    cmd = [str(VENV_PY), *program, "--spec", json.dumps(spec)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=BENCH,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
        result = None
        for line in out.splitlines():
            if line.startswith("RESULT "):
                result = json.loads(line[len("RESULT ") :])
        if result is None:
            result = {"peer": peer, "error": f"exit {proc.returncode}: {err.strip()[-400:]}"}
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        result = {"peer": peer, "error": f"timed out after {timeout_s:.0f} s"}
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything of its group still alive
    except ProcessLookupError:
        pass
    leaked = _kill_marked(marker)
    if leaked:
        result["leaked_processes"] = leaked
    result["child_wall_s"] = time.perf_counter() - t0
    # Other work on the machine stretches every wall-clock figure: keep the load with them.
    result["load_avg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    if result.get("error"):
        print(f"  {peer}: ERROR {result['error'][:300]}", flush=True)
    return result


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _kill_summary(
    runs: list[dict[str, Any]], reference: str, key: str, base: str = "wordcount_s"
) -> dict[str, Any]:
    # A run whose kill timer never fired (the job ended first) says nothing about faults.
    kills = [r[key] for r in runs if key in r and r[key].get("kill_at_s") is not None]
    slowdowns, budgets = [], []
    for r in runs:
        k = r.get(key)
        if k and k.get("kill_at_s") is not None and k.get("completed"):
            slowdowns.append(k["wall_s"] - r[base])
            budgets.append(k["partition_s"] + 1.0)
    return {
        "runs": len(kills),
        "not_killed": sum(1 for r in runs if key in r and r[key].get("kill_at_s") is None),
        "completed": sum(bool(k.get("completed")) for k in kills),
        "correct": sum(k.get("digest") == reference for k in kills),
        "hung": sum(bool(k.get("hung")) for k in kills),
        "slowdown_s": _median(slowdowns),
        "slowdowns_s": [round(x, 2) for x in slowdowns],
        "budget_s": _median(budgets),
        "killed": kills[0].get("killed") if kills else None,
        "errors": sorted({k["error"][:160] for k in kills if k.get("error")}),
    }


def aggregate(results: dict[str, list[dict[str, Any]]], reference: str) -> dict[str, Any]:
    metrics = (
        "startup_s",
        "startup_peak_mb",
        "trivial_tasks_per_s",
        "cpu_efficiency",
        "wordcount_mb_per_s",
        "wordcount_s",
        "run_peak_mb",
    )
    out: dict[str, Any] = {}
    for peer, runs in results.items():
        ok = [r for r in runs if "error" not in r or r.get("startup_s") is not None]
        agg: dict[str, Any] = {m: _median([r[m] for r in ok if m in r]) for m in metrics}
        agg["wordcount_correct"] = sum(r.get("wordcount_digest") == reference for r in runs)
        agg["runs"] = len(runs)
        agg["errors"] = sorted({r["error"][:200] for r in runs if r.get("error")})
        agg["leaked_processes"] = sum(r.get("leaked_processes", 0) for r in runs)
        agg["load_avg_1m"] = _median(
            [sum(r["load_avg_1m"]) / 2 for r in runs if "load_avg_1m" in r]
        )
        if peer != "serial":
            agg["kill"] = _kill_summary(runs, reference, "kill")
        if any("kill_node" in r for r in runs):
            agg["kill_node"] = _kill_summary(runs, reference, "kill_node")
        if any("kill_node_unreplicated" in r for r in runs):
            agg["kill_node_unreplicated"] = _kill_summary(
                runs, reference, "kill_node_unreplicated", "wordcount_unreplicated_s"
            )
            agg["wordcount_unreplicated_s"] = _median(
                [r["wordcount_unreplicated_s"] for r in runs if "wordcount_unreplicated_s" in r]
            )
        out[peer] = agg
    return out


def _ratios(summary: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """lepton's value divided by each peer's (for times and MB lower is better)."""
    lep = summary.get("lepton", {})
    out: dict[str, dict[str, float | None]] = {}
    for peer, agg in summary.items():
        if peer == "lepton":
            continue
        out[peer] = {}
        for m in (
            "startup_s",
            "startup_peak_mb",
            "trivial_tasks_per_s",
            "cpu_efficiency",
            "wordcount_mb_per_s",
        ):
            a, b = lep.get(m), agg.get(m)
            out[peer][m] = round(a / b, 3) if a and b else None
    return out


def check_targets(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    lep = summary.get("lepton", {})
    checks: dict[str, dict[str, Any]] = {}
    for metric, (op, bound) in TARGETS.items():
        value = lep.get(metric)
        ok = value is not None and (value <= bound if op == "<=" else value >= bound)
        checks[metric] = {"value": value, "target": f"{op} {bound}", "met": ok}
    wc = lep.get("wordcount_mb_per_s")
    ray = summary.get("ray", {}).get("wordcount_mb_per_s")
    mp = summary.get("multiprocessing", {}).get("wordcount_mb_per_s")
    checks["wordcount_vs_ray"] = {
        "value": wc,
        "target": f">= ray ({ray})",
        "met": bool(wc and ray and wc >= ray),
    }
    checks["wordcount_vs_multiprocessing"] = {
        "value": wc,
        "target": f">= multiprocessing / 1.1 ({mp})",
        "met": bool(wc and mp and wc >= mp / 1.1),
    }
    kill = lep.get("kill", {})
    met = bool(
        kill.get("runs")
        and kill.get("correct") == kill.get("runs")
        and kill.get("slowdown_s") is not None
        and kill["slowdown_s"] <= kill["budget_s"]
    )
    checks["worker_kill"] = {
        "value": kill.get("slowdown_s"),
        "target": f"<= {kill.get('budget_s')}",
        "met": met,
    }
    node = lep.get("kill_node", {})
    checks["node_kill_replicated_shuffle"] = {
        "value": node.get("slowdown_s"),
        "target": f"<= {node.get('budget_s')}",
        "met": bool(
            node.get("runs")
            and node.get("correct") == node.get("runs")
            and node.get("slowdown_s") is not None
            and node["slowdown_s"] <= node["budget_s"]
        ),
    }
    return checks


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return str(v)


def _row(name: str, summary: dict[str, Any], key: str, fmt: Any, target: str) -> str:
    cells = [fmt(summary.get(p, {}).get(key)) if p in summary else "—" for p in PEER_ORDER]
    return f"| {name} | " + " | ".join(cells) + f" | {target} |"


METHOD = """How each figure is taken (benchmarks/bench_peers.py):

- start-up: from before the framework's import in the driver until two trivial
  tasks came back from a fresh 2-worker cluster (pool of 2, Dask `LocalCluster(n_workers=2,
  threads_per_worker=1, processes=True)`, `ray.init(num_cpus=2)`, `lep.LocalCluster(workers=2)`);
  peak RSS is the sum over the driver and all its descendants, sampled every 20 ms
  during start-up and every second afterwards (a sample costs the driver ~1.8 ms of CPU
  with lepton's 9 processes: at 20 ms it would take ~9% of a core from the timed scenarios).
- trivial tasks: one task per item (`pool.map` with chunksize 1, `client.map`, one
  `ray.remote` call each, lepton `parallelize(items, partitions=len(items)).map(noop)`).
- 10 ms tasks: each spins for 10 ms of its thread's CPU time; efficiency = (n x 10 ms / 2) / wall.
  Other load on the machine lowers it for every peer alike.
- word count: one task per file (`Counter(text.split())`), counts merged in the driver
  (lepton: `parallelize(paths, partitions=64).map(count_file).reduce(merge_counts)`);
  every result's digest is compared with the serial count.
- worker kill: SIGKILL at 40% of that run's fault-free time of the process running tasks,
  whose supervisor survives (a pool process, a Dask worker under its nanny, a Ray worker
  under its raylet, a lepton executor under its node agent). The budget is one
  partition's duration (the lost work) + 1 s. lepton also loses a whole node (agent and
  executor, never restarted), which none of the peers can inject.
"""


def _kill_cell(s: dict[str, Any], p: str, key: str = "kill") -> str:
    k = s.get(p, {}).get(key)
    if not k:
        return "—"
    slow = "—" if k["slowdown_s"] is None else f"{k['slowdown_s']:+.2f} s"
    text = f"{k['completed']}/{k['runs']} done, {k['correct']} correct, {slow}"
    if k.get("hung"):
        text += f", {k['hung']} hung"
    if k.get("not_killed"):
        text += f" ({k['not_killed']} run ended before the kill)"
    return text


def _table(doc: dict[str, Any]) -> list[str]:
    s = doc["summary"]
    cfg = doc["config"]
    serial = _fmt(s.get("serial", {}).get("wordcount_mb_per_s"))
    return [
        "| scenario | " + " | ".join(PEER_ORDER) + " | lepton target |",
        "|---|" + "---|" * (len(PEER_ORDER) + 1),
        _row("start-up, 2 workers (s)", s, "startup_s", lambda v: _fmt(v, 2), "<= 0.8"),
        _row(
            "start-up peak RSS, all processes (MB)",
            s,
            "startup_peak_mb",
            lambda v: _fmt(v, 0),
            "<= 250",
        ),
        _row(
            f"{cfg['trivial_tasks']:,} trivial tasks (tasks/s)",
            s,
            "trivial_tasks_per_s",
            lambda v: _fmt(v, 0),
            ">= 4,000",
        ),
        _row(
            f"{cfg['cpu_tasks']:,} x 10 ms CPU tasks (% of 2-core ideal)",
            s,
            "cpu_efficiency",
            lambda v: "—" if v is None else f"{100 * v:.0f}%",
            ">= 90%",
        ),
        _row(
            "word count (MB/s)",
            s,
            "wordcount_mb_per_s",
            _fmt,
            f">= Ray, >= multiprocessing/1.1 (serial: {serial})",
        ),
        "| word count, a worker SIGKILLed at 40% (slowdown) | "
        + " | ".join(_kill_cell(s, p) for p in PEER_ORDER)
        + " | correct, <= lost work + 1 s |",
        "| word count, a whole worker node (agent + executor) SIGKILLed at 40%, not restarted"
        " (map outputs also on the other node: `shuffle_replicas=2`, the default) | "
        + " | ".join(_kill_cell(s, p, "kill_node") for p in PEER_ORDER)
        + " | correct, <= lost work + 1 s (no peer can inject this) |",
        "| the same node kill with `shuffle_replicas=1` (slowdown vs its own fault-free run) | "
        + " | ".join(_kill_cell(s, p, "kill_node_unreplicated") for p in PEER_ORDER)
        + " | (the finished outputs on the node are re-made) |",
        _row("word count, fault-free (s)", s, "wordcount_s", _fmt, ""),
        _row(
            "word count with `shuffle_replicas=1`, fault-free (s)",
            s,
            "wordcount_unreplicated_s",
            _fmt,
            "(without the copies)",
        ),
    ]


def _ratio_table(doc: dict[str, Any]) -> list[str]:
    ratios = doc["ratios_lepton_over_peer"]
    peers = [p for p in PEER_ORDER if p in ratios]
    if not peers:
        return []
    names = {
        "startup_s": "start-up time (lower is better)",
        "startup_peak_mb": "start-up memory (lower is better)",
        "trivial_tasks_per_s": "trivial tasks/s",
        "cpu_efficiency": "10 ms task efficiency",
        "wordcount_mb_per_s": "word count MB/s",
    }
    lines = ["| lepton / peer | " + " | ".join(peers) + " |", "|---|" + "---|" * len(peers)]
    for metric, name in names.items():
        cells = [_fmt(ratios[p].get(metric)) for p in peers]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def render_markdown(doc: dict[str, Any]) -> str:
    s = doc["summary"]
    loads = ", ".join(
        f"{p} {s[p]['load_avg_1m']:.1f}" for p in PEER_ORDER if s.get(p, {}).get("load_avg_1m")
    )
    killed = "; ".join(
        f"{p}: {s[p]['kill']['killed']}" for p in PEER_ORDER if s.get(p, {}).get("kill")
    )
    targets = ", ".join(f"{m} {'met' if c['met'] else 'MISSED'}" for m, c in doc["targets"].items())
    lines = [
        "# Compute benchmark: lepton_ai vs multiprocessing, Dask, Ray",
        "",
        f"Command: `{doc['command']}` (generated by `benchmarks/compute_bench.py`; "
        "peers live in `benchmarks/.venv-compute`, created by the script).",
        "",
        f"Measured {doc['date']} on {doc['machine']}; medians of {doc['config']['runs']} run(s); "
        f"corpus {doc['corpus_mb']:.0f} MB in {doc['config']['files']} files (seed {SEED}). "
        "The machine was shared with other work, so absolute numbers are noisy; "
        "the peers ran interleaved, so the comparison is fairer than the absolutes. "
        f"Median 1-minute load average while each peer ran (2 cores): {loads}.",
        "",
        *_table(doc),
        "",
        *_ratio_table(doc),
        "",
        f"Targets for lepton_ai: {targets}.",
        "",
        f"What was killed: {killed}.",
        "",
        METHOD.rstrip(),
    ]
    errors = [f"- {p}: {e}" for p in PEER_ORDER for e in s.get(p, {}).get("errors", [])]
    if errors:
        lines += ["", "Errors:", *errors]
    if doc.get("notes"):
        lines += ["", "Notes on this run:", *(f"- {n}" for n in doc["notes"])]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="small sizes and one run, for development")
    ap.add_argument("--runs", type=int, help="runs per peer (default 3, 1 with --quick)")
    ap.add_argument("--peers", default=",".join(PEER_ORDER), help="comma-separated subset")
    ap.add_argument(
        "--write",
        action="store_true",
        help="store results of a --quick run too (a full run always stores them)",
    )
    ap.add_argument(
        "--render", action="store_true", help="rebuild the markdown table from the stored JSON"
    )
    args = ap.parse_args()
    if args.render:
        # Re-derive everything from the raw measurements with the current aggregation.
        doc = json.loads(RESULTS_JSON.read_text())
        reference = doc["raw"]["serial"][0].get("wordcount_digest", "")
        doc["summary"] = aggregate(doc["raw"], reference)
        doc["ratios_lepton_over_peer"] = _ratios(doc["summary"])
        doc["targets"] = check_targets(doc["summary"])
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
    peers = [p for p in args.peers.split(",") if p]
    if unknown := set(peers) - set(PEER_ORDER):
        ap.error(f"unknown peers: {sorted(unknown)}")
    ensure_venv()
    if "lepton" in peers:
        compile_lepton()
    paths = ensure_corpus(int(config["corpus_mb"]), int(config["files"]))
    corpus_mb = sum(os.path.getsize(p) for p in paths) / 1e6
    spec = {
        "paths": paths,
        "trivial_tasks": config["trivial_tasks"],
        "cpu_tasks": config["cpu_tasks"],
        "kill_fraction": KILL_FRACTION,
    }
    timeout_s = CHILD_TIMEOUT_S[mode]
    results: dict[str, list[dict[str, Any]]] = {p: [] for p in ["serial", *peers]}
    print("serial reference ...", flush=True)
    results["serial"].append(run_child("serial", spec, timeout_s))
    reference = results["serial"][0].get("wordcount_digest", "")
    for run in range(int(config["runs"])):
        order = peers[run % len(peers) :] + peers[: run % len(peers)]  # rotate: share the noise
        for peer in order:
            print(f"run {run + 1}/{config['runs']}: {peer} ...", flush=True)
            results[peer].append(run_child(peer, spec, timeout_s))
    summary = aggregate(results, reference)
    doc = {
        "command": "make bench" if not args.quick else "python benchmarks/compute_bench.py --quick",
        "argv": shlex.join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} cores, {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()}, load avg {os.getloadavg()[0]:.1f}",
        "config": config,
        "corpus_mb": corpus_mb,
        "summary": summary,
        "ratios_lepton_over_peer": _ratios(summary),
        "targets": check_targets(summary),
        "raw": results,
    }
    store = args.write or not args.quick
    if store:  # the measurements first: they took minutes, the table is derived
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
