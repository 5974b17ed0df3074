"""Replicated-log benchmark: lepton_ai's Multi-Paxos KV vs PySyncObj 0.3.17, side by side.

Run it in the benchmark venv (PySyncObj is not a dependency of the package)::

    python3 -m venv benchmarks/.venv-consensus
    benchmarks/.venv-consensus/bin/pip install pysyncobj==0.3.17 -e .
    benchmarks/.venv-consensus/bin/python benchmarks/consensus_bench.py          # full: ~8 min
    benchmarks/.venv-consensus/bin/python benchmarks/consensus_bench.py --quick  # smoke: ~2 min

Setup: 3 replicas on 127.0.0.1, each its own process. lepton_ai: one separate
client process talking the KV protocol over TCP. PySyncObj has no network client,
so its load runs inside the leader process (an advantage to PySyncObj: no client
hop). Measured, each as the median of ``--trials`` runs of ``--duration`` seconds:

* one write at a time: writes/s and p50/p99 latency;
* pipelined, up to 8,192 writes in flight: writes/s;
* failover: SIGKILL of the leader -> first write committed by a new leader, over
  ``--failover-trials`` trials (median, max).

lepton_ai runs with fsync on and off; PySyncObj never fsyncs (no option to), so
its one configuration is listed against both. The machine's fdatasync latency is
measured and printed beside them. Results: benchmarks/results/consensus.json and
docs/benchmarks-consensus.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "consensus.json"
DOC = ROOT / "docs" / "benchmarks-consensus.md"
WINDOW_MAX = 8192

# -- helpers ---------------------------------------------------------------------------


def measure_fdatasync(
    samples: int = 200, *, gap_s: float = 0.0, preallocated: bool = False
) -> dict[str, float]:
    """fdatasync latency of a 100-byte append in the directory the replicas write to.

    ``gap_s``: sleep between calls (a replica sleeps between writes; back to back is
    the best case). ``preallocated``: the append overwrites zeros already inside the
    file, as the WAL's does (no inode/size update for the fdatasync to write).
    """
    lat = []
    with tempfile.NamedTemporaryFile(dir=tempfile.gettempdir()) as f:
        if preallocated:
            os.write(f.fileno(), bytes(samples * 100))
            os.fsync(f.fileno())
            os.lseek(f.fileno(), 0, os.SEEK_SET)
        for _ in range(samples):
            os.write(f.fileno(), b"x" * 100)
            t = time.perf_counter()
            os.fdatasync(f.fileno())
            lat.append(time.perf_counter() - t)
            if gap_s:
                time.sleep(gap_s)
    lat.sort()
    return {"p50_ms": lat[len(lat) // 2] * 1e3, "p99_ms": lat[int(len(lat) * 0.99)] * 1e3}


def _pct(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))]


def _median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    keys = runs[0].keys()
    return {k: statistics.median(r[k] for r in runs) for k in keys}


def _run_json(cmd: list[str], timeout_s: float) -> dict[str, Any]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _retry(run: Any, attempts: int = 3) -> dict[str, Any]:
    """A run that hit a leader change (a loaded machine can starve a leader past its
    election timeout) is repeated rather than averaged in; repeats are counted."""
    for attempt in range(attempts):
        try:
            out: dict[str, Any] = run()
            out["repeats"] = attempt
            return out
        except RuntimeError as exc:
            print(f"run failed ({str(exc)[-300:]}); repeating", file=sys.stderr, flush=True)
    raise RuntimeError(f"{attempts} runs failed in a row")


# -- lepton_ai client process ------------------------------------------------------------


async def _lepton_one(addresses: list[str], token: str, duration_s: float) -> dict[str, float]:
    from lepton_ai.consensus.client import KvClient

    lat: list[float] = []
    async with KvClient(addresses, token=token) as client:
        await client.put("warmup", 0)
        end = time.perf_counter() + duration_s
        i = 0
        while True:
            t = time.perf_counter()
            if t >= end:
                break
            await client.put(f"k{i % 1024}", i)
            lat.append(time.perf_counter() - t)
            i += 1
    lat.sort()
    return {
        "writes_per_s": len(lat) / duration_s,
        "p50_ms": _pct(lat, 0.5) * 1e3,
        "p99_ms": _pct(lat, 0.99) * 1e3,
    }


async def _lepton_pipelined(
    addresses: list[str], token: str, duration_s: float, window: int
) -> dict[str, float]:
    """Up to ``window`` writes in flight on one connection, each with its session sequence."""
    from lepton_ai.consensus.client import KvClient
    from lepton_ai.consensus.client_messages import Reply, ReplyMessage, Submit
    from lepton_ai.consensus.kv import Put, Request, decode_result, encode_command
    from lepton_ai.wire import Codec, connect, encode_frame

    async with KvClient(addresses, token=token) as probe:
        await probe.put("warmup", 0)  # finds the leader and opens a session
        leader, session = probe.leader, probe.session
    if leader is None:
        raise RuntimeError("no leader")
    host, _, port = leader.rpartition(":")
    conn = await connect(host, int(port), token=token, codec=Codec[ReplyMessage](ReplyMessage))
    outstanding: set[int] = set()
    room = asyncio.Event()
    state = {"seq": 0, "low": 1, "done": 0, "errors": 0}
    failures: dict[str, str] = {}
    start = time.perf_counter()
    end = start + duration_s

    async def sender() -> None:
        while time.perf_counter() < end:
            frames = []
            while len(outstanding) < window and len(frames) < 1024:
                state["seq"] += 1
                seq = state["seq"]
                while state["low"] < seq and state["low"] not in outstanding:
                    state["low"] += 1
                cmd = encode_command(
                    Request(session, seq, state["low"], Put(f"k{seq % 1024}", seq))
                )
                frames.append(encode_frame(conn.codec.encode(Submit(seq, cmd))))
                outstanding.add(seq)
            if frames:
                conn.writer.writelines(frames)
                await conn.drain()
            else:
                room.clear()
                await room.wait()

    async def receiver() -> None:
        while time.perf_counter() < end or outstanding:
            msg = await asyncio.wait_for(conn.recv(), 10)
            outstanding.discard(msg.rid)
            if time.perf_counter() <= end:
                ok = isinstance(msg, Reply) and decode_result(msg.result).error is None
                state["done" if ok else "errors"] += 1
                if not ok and "first_error" not in failures:
                    failures["first_error"] = repr(msg)
            if len(outstanding) < window // 2:
                room.set()

    send_task = asyncio.create_task(sender())
    try:
        await receiver()
    finally:
        send_task.cancel()
        await conn.close()
    if state["errors"]:
        raise RuntimeError(f"{state['errors']} pipelined writes failed: {failures}")
    return {"writes_per_s": state["done"] / duration_s}


def client_main(args: argparse.Namespace) -> int:
    from lepton_ai.eventloop import loop_factory

    addresses = args.addresses.split(",")
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        if args.mode == "one":
            out = runner.run(_lepton_one(addresses, args.token, args.duration))
        else:
            out = runner.run(_lepton_pipelined(addresses, args.token, args.duration, args.window))
    print(json.dumps(out))
    return 0


# -- lepton_ai orchestration ---------------------------------------------------------------


def _lepton_cluster(fsync: bool, tick_s: float) -> Any:
    from lepton_ai.consensus.cluster import KvCluster, LauncherConfig

    return KvCluster(3, config=LauncherConfig(fsync=fsync, tick_s=tick_s))


def lepton_throughput(fsync: bool, args: argparse.Namespace) -> dict[str, Any]:
    one_runs, pipe_runs = [], []
    for _ in range(args.trials):
        with _lepton_cluster(fsync, args.tick_s) as cluster:
            cluster.leader()
            base = [sys.executable, __file__, "client", "--addresses", cluster.address]
            base += ["--token", cluster.token, "--duration", str(args.duration)]
            one_runs.append(_retry(lambda b=base: _run_json([*b, "--mode", "one"], 120)))
            pipe = [*base, "--mode", "pipelined", "--window", str(WINDOW_MAX)]
            pipe_runs.append(_retry(lambda p=pipe: _run_json(p, 120)))
    return {"one": _median_of(one_runs), "pipelined": _median_of(pipe_runs), "runs": {
        "one": one_runs, "pipelined": pipe_runs}}  # fmt: skip


def lepton_failover(fsync: bool, args: argparse.Namespace) -> dict[str, Any]:
    from lepton_ai.consensus.client import KvClient, KvClientConfig

    times: list[float] = []
    config = KvClientConfig(
        deadline_s=10, attempt_timeout_s=0.25, backoff_s=0.005, backoff_max_s=0.02
    )
    with _lepton_cluster(fsync, args.tick_s) as cluster:

        async def trial(n: int) -> float:
            async with KvClient(cluster.addresses, token=cluster.token, config=config) as client:
                await client.put("failover", -n)
                old = cluster.leader()
                t0 = time.monotonic()
                os.kill(cluster.pid(old), signal.SIGKILL)
                await client.put("failover", n)
                elapsed = time.monotonic() - t0
            cluster.kill(old)  # reap it
            new = cluster.leader()
            if new == old:
                raise RuntimeError("the killed replica is still reported as leader")
            cluster.restart(old)
            _wait_caught_up(cluster, old)
            return elapsed

        cluster.leader()
        for n in range(1, args.failover_trials + 1):
            times.append(asyncio.run(trial(n)))
    return {"median_ms": statistics.median(times) * 1e3, "max_ms": max(times) * 1e3,
            "trials_ms": [t * 1e3 for t in times]}  # fmt: skip


def _wait_caught_up(cluster: Any, node: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = cluster.status()
        mine = status.get(node)
        top = max((s.commit_index for s in status.values() if s is not None), default=0)
        if mine is not None and mine.applied_index >= top:
            return
        time.sleep(0.05)
    raise RuntimeError(f"replica {node} did not catch up")


# -- PySyncObj --------------------------------------------------------------------------


def pysyncobj_node_main(args: argparse.Namespace) -> int:  # runs in its own process
    from pysyncobj import SyncObj, SyncObjConf, replicated

    class Store(SyncObj):  # type: ignore[misc]
        def __init__(self, me: str, others: list[str], batch: bool) -> None:
            # Fastest configuration per mode (no journal, no dumps, defaults otherwise):
            # batched appends for throughput; unbatched for one at a time, which also
            # turns on PySyncObj's pipe notifier so its tick thread wakes on each command
            # instead of polling every autoTickPeriod (50 ms).
            conf = SyncObjConf(appendEntriesUseBatch=batch, dynamicMembershipChange=False)
            super().__init__(me, others, conf)
            self.data: dict[str, int] = {}

        @replicated  # type: ignore[misc]
        def set(self, key: str, value: int) -> None:
            self.data[key] = value

    me, others = args.node, [p for p in args.partners.split(",") if p]
    store = Store(me, others, batch=args.mode == "pipelined")
    out = Path(args.out)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        st = store.getStatus()
        if st["leader"] is not None and store._isReady():
            break
        time.sleep(0.01)
    status = store.getStatus()
    is_leader = str(status["leader"]) == str(status["self"])
    (out / f"status-{me.replace(':', '_')}").write_text(f"{status['leader']} {os.getpid()}")
    if args.mode == "failover":
        return _pysyncobj_failover_writer(store, me, out)
    if not is_leader:
        time.sleep(args.duration + 5)
        return 0
    result = (_pso_one if args.mode == "one" else _pso_pipelined)(store, args.duration)
    (out / "result.json").write_text(json.dumps(result))
    return 0


def _pso_one(store: Any, duration_s: float) -> dict[str, float]:
    lat: list[float] = []
    end = time.perf_counter() + duration_s
    i = 0
    while True:
        t = time.perf_counter()
        if t >= end:
            break
        store.set(f"k{i % 1024}", i, sync=True)
        lat.append(time.perf_counter() - t)
        i += 1
    lat.sort()
    return {
        "writes_per_s": len(lat) / duration_s,
        "p50_ms": _pct(lat, 0.5) * 1e3,
        "p99_ms": _pct(lat, 0.99) * 1e3,
    }


def _pso_pipelined(store: Any, duration_s: float) -> dict[str, float]:
    slots = threading.Semaphore(WINDOW_MAX)
    counts = {"done": 0, "errors": 0}
    lock = threading.Lock()
    end = time.perf_counter() + duration_s

    def callback(result: Any, error: Any) -> None:
        with lock:
            if time.perf_counter() <= end:
                counts["done" if error == 0 else "errors"] += 1
        slots.release()

    i = 0
    while time.perf_counter() < end:
        if slots.acquire(timeout=0.1):
            store.set(f"k{i % 1024}", i, callback=callback)
            i += 1
    time.sleep(0.5)
    return {"writes_per_s": counts["done"] / duration_s, "errors": counts["errors"]}


def _pysyncobj_failover_writer(store: Any, me: str, out: Path) -> int:
    """Write in a loop; after the orchestrator's kill mark, report the first success."""
    mark = out / "killed-at"
    while True:
        killed_at = float(mark.read_text()) if mark.exists() else None
        try:
            store.set("failover", 1, sync=True, timeout=0.2)
        except Exception:  # SyncObjException: no leader / timeout - keep trying
            time.sleep(0.002)
            continue
        now = time.monotonic()
        if killed_at is not None and now > killed_at:
            (out / f"first-{me.replace(':', '_')}").write_text(repr(now - killed_at))
            return 0
        time.sleep(0.002)


def _free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _pysyncobj_group(mode: str, duration_s: float, out: Path) -> list[subprocess.Popen[bytes]]:
    nodes = [f"127.0.0.1:{p}" for p in _free_ports(3)]
    procs = []
    for node in nodes:
        partners = ",".join(n for n in nodes if n != node)
        cmd = [sys.executable, __file__, "pysyncobj-node", "--node", node, "--partners", partners]
        cmd += ["--mode", mode, "--duration", str(duration_s), "--out", str(out)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)


def pysyncobj_throughput(args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[str, list[dict[str, float]]] = {"one": [], "pipelined": []}
    for _ in range(args.trials):
        for mode in ("one", "pipelined"):
            with tempfile.TemporaryDirectory() as d:
                procs = _pysyncobj_group(mode, args.duration, Path(d))
                try:
                    result = Path(d) / "result.json"
                    deadline = time.monotonic() + args.duration + 60
                    while not result.exists() and time.monotonic() < deadline:
                        time.sleep(0.1)
                    time.sleep(0.1)
                    runs[mode].append(json.loads(result.read_text()))
                finally:
                    _stop(procs)
    return {"one": _median_of(runs["one"]), "pipelined": _median_of(runs["pipelined"]),
            "runs": runs}  # fmt: skip


def pysyncobj_failover(args: argparse.Namespace) -> dict[str, Any]:
    times = []
    timeouts = 0
    for _ in range(args.failover_trials):
        with tempfile.TemporaryDirectory() as d:
            out = Path(d)
            procs = _pysyncobj_group("failover", 0, out)
            try:
                deadline = time.monotonic() + 30
                while len(list(out.glob("status-*"))) < 3 and time.monotonic() < deadline:
                    time.sleep(0.05)
                time.sleep(0.5)  # let every writer loop commit a few writes
                leader = next(iter(out.glob("status-*"))).read_text().split()[0]
                victim = next(
                    int(f.read_text().split()[1])
                    for f in out.glob("status-*")
                    if f.name == f"status-{leader.replace(':', '_')}"
                )
                t0 = time.monotonic()
                (out / "killed-at").write_text(repr(t0))
                os.kill(victim, signal.SIGKILL)
                deadline = time.monotonic() + 30
                firsts: list[float] = []
                while not firsts and time.monotonic() < deadline:
                    firsts = [
                        float(f.read_text())
                        for f in out.glob("first-*")
                        if f.name != f"first-{leader.replace(':', '_')}"
                    ]
                    time.sleep(0.01)
                if not firsts:  # counted at the bound, and reported, rather than dropped
                    print("PySyncObj: no commit within 30 s of the kill", file=sys.stderr)
                    timeouts += 1
                    firsts = [30.0]
                times.append(min(firsts))
            finally:
                _stop(procs)
    return {"median_ms": statistics.median(times) * 1e3, "max_ms": max(times) * 1e3,
            "trials_ms": [t * 1e3 for t in times], "timeouts_30s": timeouts}  # fmt: skip


# -- report -------------------------------------------------------------------------------


def _markdown(res: dict[str, Any]) -> str:
    lines = [
        "# Replicated log benchmark: lepton_ai Multi-Paxos vs PySyncObj 0.3.17",
        "",
        f"Command: `{res['command']}`  ",
        f"Machine: {res['machine']}; fdatasync of a 100-byte append: "
        f"p50 {res['fdatasync']['p50_ms']:.2f} ms, p99 {res['fdatasync']['p99_ms']:.2f} ms "
        "back to back on a growing file; with 1 ms sleeps between calls (as a replica "
        f"sleeps between writes): p50 {res['fdatasync_growing_1ms_gap']['p50_ms']:.2f} / "
        f"p99 {res['fdatasync_growing_1ms_gap']['p99_ms']:.2f} ms growing, "
        f"p50 {res['fdatasync_preallocated_1ms_gap']['p50_ms']:.2f} / "
        f"p99 {res['fdatasync_preallocated_1ms_gap']['p99_ms']:.2f} ms preallocated.  ",
        "Load average (1 min) at start/end: "
        f"{res['load_average_at_start'][0]:.1f} / {res['load_average_at_end'][0]:.1f} "
        "(the machine is shared; other work ran during the measurement).  ",
        f"3 replicas on 127.0.0.1, {res['duration_s']:g} s runs, median of {res['trials']}; "
        f"failover over {res['failover_trials']} trials. PySyncObj never fsyncs and has no "
        "network client (its load runs inside its leader process).",
        "",
        "| system | fsync | one-at-a-time writes/s | p50 ms | p99 ms | pipelined writes/s "
        "| failover median ms | failover max ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in res["rows"]:
        lines.append(
            f"| {row['system']} | {row['fsync']} | {row['one']['writes_per_s']:,.0f} | "
            f"{row['one']['p50_ms']:.2f} | {row['one']['p99_ms']:.2f} | "
            f"{row['pipelined']['writes_per_s']:,.0f} | {row['failover']['median_ms']:.0f} | "
            f"{row['failover']['max_ms']:.0f} |"
        )
    lines += [
        "",
        "Targets (issue 3): one at a time >= 1,500 writes/s with p50 <= 0.7 ms; pipelined "
        ">= 30,000 writes/s fsync off and >= 24,000 fsync on; failover median <= 500 ms, "
        "max <= 1 s.",
        "",
        "What bounds the numbers (from profiling the leader):",
        "",
        "- One write at a time crosses 6 loopback socket sends on its critical path "
        "(client -> leader, leader -> 2 followers, follower -> leader, leader -> client); "
        "PySyncObj's in-process load crosses 4. On this VM a loopback `send` costs about "
        "0.1 ms of system time under load, so the client hop alone costs more than the whole "
        "p50 budget's slack, and the throughput of one-at-a-time writes is set by the "
        "latency tail (p99), i.e. by scheduling delays on the shared cores.",
        "- With fsync on, the fdatasync a replica pays inside a run is not the back-to-"
        "back figure above. Measured in the replicas (os.fdatasync wrapped, 3 s one-at-a-"
        "time runs): p50 0.17-0.27 ms on a quiet machine, but 0.8-2.3 ms with p90 4-6 ms "
        "(one 20 ms) when the 2 cores are busy (load 5-7), which is when the old 5.9 ms "
        "p50 was recorded. Two causes were ours: (1) every WAL append grew the file, so "
        "each fdatasync also wrote the inode (new size): 3 dependent block requests per "
        "fdatasync instead of 2 (perf stat -a block:block_rq_issue: 8.7 requests per "
        "write over the 3 replicas before, 6.7 after), and each extra dependent request "
        "is one more sleep and wake-up on the busy CPUs (a 100-byte append + fdatasync "
        "while 3 CPU spinners ran, two runs: p50 0.18-3.5 ms growing vs 0.09-0.19 ms "
        "preallocated); the WAL now keeps 1 MiB of written zeros ahead of its end "
        "(recovery treats a zero run as the end of the log); (2) the leader sent its "
        "Accept only after its own fdatasync, so a write paid the leader's and a "
        "follower's fdatasync in sequence; a leader's Accept carries no vote of the "
        "leader, so it now leaves before the leader's fdatasync and the two overlap "
        "(promises and acceptances still leave only after their fdatasync). What remains "
        "is one fdatasync plus process wake-ups on shared cores. Also on the one-at-a-"
        "time path (both modes): the leader now writes a pass's replies at the end of "
        "that pass instead of one event-loop turn later.",
        "- Pipelined writes are bounded by Python CPU per command on the leader (decode, "
        "propose, apply, encode the reply: tens of microseconds); group commit makes fsync "
        "nearly free there (one fdatasync per batch of up to thousands of commands).",
        "- Failover = election timeout (10-20 ticks of 20 ms after the last heartbeat) + one "
        "Prepare/Promise round + the new leader's first commit + the client's redirect.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="role")
    client = sub.add_parser("client")
    client.add_argument("--addresses", required=True)
    client.add_argument("--token", required=True)
    client.add_argument("--mode", choices=["one", "pipelined"], required=True)
    client.add_argument("--duration", type=float, default=10)
    client.add_argument("--window", type=int, default=WINDOW_MAX)
    node = sub.add_parser("pysyncobj-node")
    node.add_argument("--node", required=True)
    node.add_argument("--partners", required=True)
    node.add_argument("--mode", choices=["one", "pipelined", "failover"], required=True)
    node.add_argument("--duration", type=float, default=10)
    node.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true", help="3 s runs, 1 trial, 5 failovers")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--failover-trials", type=int, default=20)
    parser.add_argument("--tick-s", type=float, default=0.02)
    parser.add_argument("--skip-pysyncobj", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if args.role == "client":
        return client_main(args)
    if args.role == "pysyncobj-node":
        return pysyncobj_node_main(args)
    if args.quick:
        args.duration, args.trials, args.failover_trials = 3.0, 1, 5
    return orchestrate(args, argv)


def orchestrate(args: argparse.Namespace, argv: list[str] | None) -> int:
    res: dict[str, Any] = {
        "command": "python benchmarks/consensus_bench.py " + " ".join(argv or sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}",
        "fdatasync": measure_fdatasync(),
        "fdatasync_growing_1ms_gap": measure_fdatasync(gap_s=0.001),
        "fdatasync_preallocated_1ms_gap": measure_fdatasync(gap_s=0.001, preallocated=True),
        "duration_s": args.duration,
        "trials": args.trials,
        "failover_trials": args.failover_trials,
        "tick_s": args.tick_s,
        "load_average_at_start": os.getloadavg(),
        "rows": [],
    }
    print(f"fdatasync: {res['fdatasync']}", flush=True)
    for fsync in (False, True):
        row = {"system": "lepton_ai", "fsync": "on" if fsync else "off"}
        row.update(lepton_throughput(fsync, args))
        row["failover"] = lepton_failover(fsync, args)
        print(json.dumps({k: v for k, v in row.items() if k != "runs"}), flush=True)
        res["rows"].append(row)
    if not args.skip_pysyncobj:
        row = {"system": "PySyncObj 0.3.17", "fsync": "never"}
        row.update(pysyncobj_throughput(args))
        row["failover"] = pysyncobj_failover(args)
        print(json.dumps({k: v for k, v in row.items() if k != "runs"}), flush=True)
        res["rows"].append(row)
    res["load_average_at_end"] = os.getloadavg()
    print(_markdown(res))
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(res, indent=2))
        DOC.parent.mkdir(parents=True, exist_ok=True)
        DOC.write_text(_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
