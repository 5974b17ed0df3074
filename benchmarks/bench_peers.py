"""One adapter per framework, and the child program that measures one of them.

``compute_bench.py`` runs ``python bench_peers.py PEER --spec JSON`` once per
peer and run, in its own process group, so each framework's memory is measured
alone and a crash or hang of one cannot take the others down. The child prints
one line ``RESULT {json}`` at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from typing import Any

import bench_common as bc
import psutil

WORKERS = 2
KILL_TIMEOUT_MIN_S = 30.0  # a killed run that gives no answer in this long has hung
KILL_TIMEOUT_FACTOR = 5.0  # ... or in this many times the fault-free run


class Peer:
    """Common shape: start a 2-worker cluster, run tasks, count words, kill a worker."""

    name = "?"

    def start(self) -> None:
        raise NotImplementedError

    def map(self, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        raise NotImplementedError

    def wordcount(self, paths: list[str]) -> Counter[str]:
        """One task per file, counts merged in the driver (what each peer's docs suggest)."""
        total: Counter[str] = Counter()
        for part in self.map(bc.count_file, paths):
            total.update(part)
        return total

    # Kill scenarios: "worker" = the process that runs tasks, whose supervisor
    # (pool, nanny, raylet, node agent) survives. lepton adds "node": a whole
    # worker node (agent and its executors), which no peer offers to inject.
    kill_variants: tuple[str, ...] = ("worker",)

    def kill_worker(self, variant: str = "worker") -> str:
        """SIGKILL one worker process (the unit that runs tasks); returns what was killed."""
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


class MultiprocessingPeer(Peer):
    name = "multiprocessing"

    def start(self) -> None:
        from concurrent.futures import ProcessPoolExecutor

        self.ex = ProcessPoolExecutor(max_workers=WORKERS)
        self.map(bc.noop, list(range(WORKERS)))

    def map(self, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        return list(self.ex.map(fn, items))

    def kill_worker(self, variant: str = "worker") -> str:
        pid = next(iter(self.ex._processes))  # the pool keeps {pid: Process}
        os.kill(pid, signal.SIGKILL)
        return f"pool process pid {pid}"

    def stop(self) -> None:
        self.ex.shutdown(wait=True, cancel_futures=True)


class DaskPeer(Peer):
    name = "dask"

    def start(self) -> None:
        from dask.distributed import Client, LocalCluster

        self.cluster = LocalCluster(
            n_workers=WORKERS,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
        )
        self.client = Client(self.cluster)
        self.map(bc.noop, list(range(WORKERS)))

    def map(self, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        futures = self.client.map(fn, items, pure=False)
        return list(self.client.gather(futures))

    def kill_worker(self, variant: str = "worker") -> str:
        pids = self.client.run(os.getpid)  # worker address -> pid (the nanny restarts it)
        addr, pid = sorted(pids.items())[0]
        os.kill(pid, signal.SIGKILL)
        return f"worker {addr} pid {pid}"

    def stop(self) -> None:
        self.client.close()
        self.cluster.close()


class RayPeer(Peer):
    name = "ray"

    def start(self) -> None:
        import ray

        self.ray = ray
        ray.init(num_cpus=WORKERS, include_dashboard=False, log_to_driver=False)
        self._remote: dict[Callable[[Any], Any], Any] = {}
        self.map(bc.noop, list(range(WORKERS)))

    def map(self, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        remote = self._remote.get(fn)
        if remote is None:
            remote = self._remote[fn] = self.ray.remote(fn)
        return list(self.ray.get([remote.remote(x) for x in items]))

    def kill_worker(self, variant: str = "worker") -> str:
        # Task workers are the raylet's children titled "ray::<function>" (or
        # "ray::IDLE"); the "ray::...Agent" processes are infrastructure.
        me = psutil.Process(os.getpid())
        busy, idle = [], []
        for p in me.children(recursive=True):
            try:
                title = p.name()
            except psutil.Error:
                continue
            if not title.startswith("ray::") or title.endswith("Agent"):
                continue
            (idle if title == "ray::IDLE" else busy).append((title, p))
        victims = busy or idle
        if not victims:
            raise RuntimeError("no ray worker process found")
        title, victim = victims[0]
        victim.send_signal(signal.SIGKILL)
        return f"ray worker pid {victim.pid} ({title})"

    def stop(self) -> None:
        self.ray.shutdown()


class LeptonPeer(Peer):
    """lepton_ai through the public API of DESIGN section 5 only."""

    name = "lepton"

    def start(self) -> None:
        import lepton_ai as lep

        self.lep = lep
        self.cluster = lep.LocalCluster(workers=WORKERS)
        self.cluster.__enter__()
        self.task = lep.DistributedTask(self.cluster)
        self.map(bc.noop, list(range(WORKERS)))

    def map(self, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        # One partition per item, so one task per item, as for the other peers.
        ds = self.task.parallelize(items, partitions=len(items))
        return list(ds.map(fn).collect())

    def wordcount(self, paths: list[str]) -> Counter[str]:
        mode = os.environ.get("LEPTON_BENCH_INPUT", "files")
        if mode == "read_text":
            pattern = os.path.join(os.path.dirname(paths[0]), "*.txt")
            ds = self.task.read_text(pattern, partitions=len(paths)).map_partitions(bc.count_lines)
        else:
            ds = self.task.parallelize(paths, partitions=len(paths)).map(bc.count_file)
        options = (
            {} if self.shuffle_replicas is None else {"shuffle_replicas": self.shuffle_replicas}
        )
        result: Counter[str] = ds.reduce(bc.merge_counts, **options)
        return result

    # "node": a whole node killed, with the default shuffle_replicas=2 (every map
    # output also on the other node: only the attempts it was running are lost);
    # "node_unreplicated": the same with shuffle_replicas=1 (its outputs are re-made).
    kill_variants = ("worker", "node_unreplicated", "node")
    shuffle_replicas: int | None = None  # None: the default

    def prepare(self, variant: str) -> None:
        """Before each fault scenario: a full cluster, and the variant's replication."""
        self.shuffle_replicas = 1 if variant == "node_unreplicated" else None
        for m in self.cluster.status()["members"]:
            if m["role"] == "worker" and m["health"] == "down":
                self.cluster.restart("worker", m["id"])
        self.cluster.wait_ready(WORKERS)

    def kill_worker(self, variant: str = "worker") -> str:
        # "worker": an executor (its node agent restarts it, like Dask's nanny);
        # "node": the whole worker node (agent + executors); nothing restarts it.
        role = "executor" if variant == "worker" else "worker"
        members = self.cluster.status()["members"]
        ids = sorted(m["id"] for m in members if m["role"] == role and m["health"] != "dead")
        if not ids:
            raise RuntimeError(f"no live {role} in cluster.status()")
        victim = ids[-1]
        pid = self.cluster.kill(role, victim)
        return f"lepton {role} {victim} pid {pid}"

    def stop(self) -> None:
        self.cluster.__exit__(None, None, None)


PEERS: dict[str, type[Peer]] = {
    p.name: p for p in (MultiprocessingPeer, DaskPeer, RayPeer, LeptonPeer)
}


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _wordcount_with_kill(
    peer: Peer, paths: list[str], delay_s: float, variant: str, timeout_s: float
) -> dict[str, Any]:
    """Word count with a SIGKILL after ``delay_s``; no answer in ``timeout_s`` means hung."""
    killed: dict[str, Any] = {}
    box: dict[str, Any] = {}

    def killer() -> None:
        try:
            killed["what"] = peer.kill_worker(variant)
            killed["at_s"] = time.perf_counter() - t0
        except Exception as exc:
            killed["error"] = repr(exc)

    def work() -> None:
        try:
            box["counts"] = peer.wordcount(paths)
        except Exception as exc:
            box["error"] = f"{type(exc).__name__}: {exc}"[:300]

    timer = threading.Timer(delay_s, killer)
    worker = threading.Thread(target=work, name="wordcount", daemon=True)
    t0 = time.perf_counter()
    timer.start()
    worker.start()
    worker.join(timeout_s)
    out: dict[str, Any] = {"kill_delay_s": delay_s, "wall_s": time.perf_counter() - t0}
    timer.cancel()
    timer.join()
    if worker.is_alive():
        # e.g. a ProcessPoolExecutor that never notices its dead process: it hangs forever.
        out.update(completed=False, hung=True, error=f"hung: no result after {timeout_s:.0f} s")
    elif "counts" in box:
        out.update(completed=True, digest=bc.digest(box["counts"]))
    else:
        out.update(completed=False, error=box.get("error", "no result"))
    out["killed"] = killed.get("what") or killed.get("error", "timer did not fire")
    out["kill_at_s"] = killed.get("at_s")
    return out


def _corpus_bytes(paths: list[str]) -> int:
    return sum(os.path.getsize(p) for p in paths)


def measure(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Every scenario for one peer, in one process (the cluster is started once)."""
    res: dict[str, Any] = {"peer": name}
    paths: list[str] = spec["paths"]
    size_mb = _corpus_bytes(paths) / 1e6
    peer = PEERS[name]()
    hung = False
    with bc.PeakSampler() as sampler:
        _, res["startup_s"] = _timed(peer.start)
        res["startup_peak_mb"] = sampler.peak_mb()
        sampler.slow_down()  # its CPU would otherwise weigh on the timed scenarios
        try:
            n = spec["trivial_tasks"]
            out, wall = _timed(lambda: peer.map(bc.noop, list(range(n))))
            if out != list(range(n)):
                raise AssertionError("trivial tasks returned wrong results")
            res["trivial_tasks_per_s"] = n / wall
            m = spec["cpu_tasks"]
            _, wall = _timed(lambda: peer.map(bc.burn, [bc.CPU_TASK_S] * m))
            ideal = m * bc.CPU_TASK_S / WORKERS
            res["cpu_wall_s"] = wall
            res["cpu_efficiency"] = ideal / wall
            counts, wall = _timed(lambda: peer.wordcount(paths))
            res["wordcount_s"] = wall
            res["wordcount_mb_per_s"] = size_mb / wall
            res["wordcount_digest"] = bc.digest(counts)
            res["wordcount_distinct"] = len(counts)
            timeout_s = max(KILL_TIMEOUT_MIN_S, KILL_TIMEOUT_FACTOR * wall)
            if "node_unreplicated" in peer.kill_variants:
                # Without the shuffle copies, fault-free (the base of its kill run).
                peer.prepare("node_unreplicated")
                counts, res["wordcount_unreplicated_s"] = _timed(lambda: peer.wordcount(paths))
                if bc.digest(counts) != res["wordcount_digest"]:
                    raise AssertionError("unreplicated-shuffle word count differs")
            for variant in peer.kill_variants:  # "node" last: it leaves the cluster smaller
                key = "kill" if variant == "worker" else f"kill_{variant}"
                getattr(peer, "prepare", lambda v: None)(variant)
                base = "wordcount_unreplicated_s" if variant == "node_unreplicated" else ""
                wall = res[base or "wordcount_s"]
                delay_s = spec["kill_fraction"] * wall
                res[key] = _wordcount_with_kill(peer, paths, delay_s, variant, timeout_s)
                res[key]["partition_s"] = wall * WORKERS / len(paths)
                if res[key].get("hung"):
                    hung = True
                    break
        except Exception as exc:
            # Keep what was measured before the failure; the report shows the error.
            res["error"] = f"{type(exc).__name__}: {exc}"[:500]
            traceback.print_exc()
        finally:
            res["run_peak_mb"] = sampler.overall_mb()
            try:
                if not hung:  # stopping a hung framework hangs too; main() exits hard instead
                    peer.stop()
            except Exception as exc:
                res["stop_error"] = repr(exc)[:200]
    return res


def serial(spec: dict[str, Any]) -> dict[str, Any]:
    paths: list[str] = spec["paths"]
    t0 = time.perf_counter()
    total: Counter[str] = Counter()
    for p in paths:
        total.update(bc.count_file(p))
    wall = time.perf_counter() - t0
    return {
        "peer": "serial",
        "wordcount_s": wall,
        "wordcount_mb_per_s": _corpus_bytes(paths) / 1e6 / wall,
        "wordcount_digest": bc.digest(total),
        "wordcount_distinct": len(total),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("peer", choices=[*PEERS, "serial"])
    ap.add_argument("--spec", required=True, help="JSON: paths, trivial_tasks, cpu_tasks, ...")
    args = ap.parse_args()
    spec = json.loads(args.spec)
    try:
        res = serial(spec) if args.peer == "serial" else measure(args.peer, spec)
    except Exception as exc:
        res = {"peer": args.peer, "error": f"{type(exc).__name__}: {exc}"[:500]}
        traceback.print_exc()
    print("RESULT " + json.dumps(res), flush=True)
    sys.stderr.flush()
    # Exit without interpreter shutdown: a hung framework's threads would block it forever.
    # The parent kills this process group afterwards, so nothing is left behind.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
