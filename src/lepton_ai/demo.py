"""``lepton demo``: a MapReduce job that survives three SIGKILLs and still gets the exact answer.

What it does, in order:

1. writes a seeded synthetic web-server log corpus (``lepton_ai.data.synthetic``)
   to a temporary directory (removed at the end, whatever happens);
2. computes the answer serially in this process (the reference);
3. starts a ``LocalCluster`` and runs the log analysis job
   (``lepton_ai.data.loganalysis``: requests and error rate per service and
   status code, top URLs) as ``read_text -> map_partitions -> reduce_by_key``
   once without faults, for the time to compare against;
4. runs it again and, while it runs, SIGKILLs one executor and then one whole
   worker node at chosen progress points (``cluster.kill``), watching
   ``cluster.status()`` to see each fault detected and the lost process replaced;
   with three coordinators (the default) it also SIGKILLs the leading coordinator
   mid-job and the timeline shows the election and the job going on under the new
   leader (``--coordinators 1``: one coordinator, not killed);
5. prints the timeline, the result, the check against the serial reference and
   both run times (``--json``: the same as one JSON object).

It exits 0 only if both distributed results equal the serial one exactly.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lepton_ai.data import loganalysis, synthetic
from lepton_ai.monitor.events import phase_of

SIZE_MB_DEFAULT = 100
SIZE_MB_MAX = 10_000
WORKERS_DEFAULT = 2
WORKERS_MAX = 16
SEED_DEFAULT = 7
FILES_DEFAULT = 16
PARTITIONS_DEFAULT = 32
REDUCE_PARTITIONS = 4
EXECUTOR_KILL_AT = 0.25  # fraction of the job's progress
WORKER_KILL_AT = 0.55
LEADER_KILL_AT = 0.4  # with 3 or 5 coordinators: the leading coordinator is SIGKILLed here
COORDINATORS_DEFAULT = 3
POLL_INTERVAL_S = 0.02  # how often the fault driver looks at job and cluster status
JOB_TIMEOUT_S = 600.0
WATCH_TIMEOUT_S = 30.0  # how long to keep watching for detection/replacement after the job
_VICTIM = {
    "worker": "a worker node",
    "executor": "an executor",
    "leader": "the leading coordinator",
}
_OWN_KINDS = frozenset({"fault_injected"})  # cluster events the demo reports itself
_DOWN = frozenset({"dead", "down", "failed", "suspect", "lost", "unreachable", "killed", "stopped"})


@dataclass(frozen=True, slots=True)
class DemoConfig:
    size_mb: float = SIZE_MB_DEFAULT
    workers: int = WORKERS_DEFAULT
    seed: int = SEED_DEFAULT
    files: int = FILES_DEFAULT
    partitions: int = PARTITIONS_DEFAULT
    faults: bool = True
    executor_kill_at: float = EXECUTOR_KILL_AT
    worker_kill_at: float = WORKER_KILL_AT
    coordinators: int = COORDINATORS_DEFAULT
    leader_kill_at: float = LEADER_KILL_AT

    def __post_init__(self) -> None:
        if self.coordinators not in (1, 3, 5):
            raise ValueError(f"--coordinators must be 1, 3 or 5, got {self.coordinators}")
        for name in ("executor_kill_at", "worker_kill_at", "leader_kill_at"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} must be in [0, 1), got {value}")
        if not 0 < self.size_mb <= SIZE_MB_MAX:
            raise ValueError(f"--size-mb must be in (0, {SIZE_MB_MAX}], got {self.size_mb}")
        if not 1 <= self.workers <= WORKERS_MAX:
            raise ValueError(f"--workers must be in 1..{WORKERS_MAX}, got {self.workers}")
        if self.faults and self.workers < 2:
            raise ValueError("--workers must be >= 2 to survive a worker node kill")
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")
        if self.files <= 0 or self.partitions <= 0:
            raise ValueError("files and partitions must be > 0")


@dataclass(slots=True)
class Event:
    t_s: float
    kind: str  # "fault", "detected", "replaced", "rescheduled", "progress", "completed", ...
    detail: str


@dataclass(slots=True)
class Timeline:
    """Events relative to the start of the faulted job, appended from one thread at a time."""

    t0: float = field(default_factory=time.perf_counter)
    wall0: float = field(default_factory=time.time)  # the same instant on the wall clock
    events: list[Event] = field(default_factory=list)

    def add(self, kind: str, detail: str) -> Event:
        ev = Event(round(time.perf_counter() - self.t0, 3), kind, detail)
        self.events.append(ev)
        return ev

    def merge_cluster_events(self, cluster: Any, job_id: str) -> int:
        """Add what the cluster itself recorded (detection, rescheduling, ...) since t0.

        The cluster's own ``fault_injected`` lines are skipped: ours say the same
        with the progress point. Returns how many events were added.
        """
        events = getattr(cluster, "events", None)
        if events is None:
            return 0
        added = 0
        for e in events(job_id):
            t = float(_field(e, "t", 0.0)) - self.wall0
            kind = str(_field(e, "kind", ""))
            if t < 0 or kind in _OWN_KINDS:
                continue
            self.events.append(Event(round(t, 3), kind, str(_field(e, "detail", ""))))
            added += 1
        self.events.sort(key=lambda ev: ev.t_s)
        return added


@dataclass(slots=True)
class Fault:
    role: str  # "executor", "worker" or "leader" (the leading coordinator)
    at_progress: float
    member_id: Any = None
    pid: int | None = None
    injected_s: float | None = None
    progress_seen: float | None = None
    detected_s: float | None = None
    replaced_s: float | None = None
    replacement_pid: int | None = None
    resumed_s: float | None = None  # first progress seen after the fault was detected
    back_s: float | None = None  # the killed leader running again (restarted, as a follower)


# ----------------------------------------------------------------- cluster views


def _field(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def members(cluster: Any) -> list[dict[str, Any]]:
    """``cluster.status()``'s members as plain dicts (role, id, pid, health, ...)."""
    status = cluster.status()
    raw = _field(status, "members", status if isinstance(status, list) else [])
    out = []
    for m in raw:
        out.append(
            {
                "role": str(_field(m, "role", "")),
                "id": _field(m, "id"),
                "pid": _field(m, "pid"),
                "health": str(_field(m, "health", "") or ""),
                "node": _field(m, "node", _field(m, "worker")),
            }
        )
    return out


def _is_down(member: dict[str, Any] | None) -> bool:
    if member is None:
        return True
    health = member["health"].lower()
    return health in _DOWN or member["pid"] is None


def _back(member: dict[str, Any], fault: Fault) -> bool:
    """The killed member's slot runs again, under a new pid."""
    return not _is_down(member) and member["pid"] not in (None, 0, fault.pid)


def _find(view: list[dict[str, Any]], role: str, member_id: Any) -> dict[str, Any] | None:
    for m in view:
        if m["role"] == role and m["id"] == member_id:
            return m
    return None


def job_progress(job: Any) -> tuple[float | None, str]:
    """(fraction of tasks done, or None if unknown; state) from ``job.progress()``/``status()``."""
    state = str(job.status())
    progress = getattr(job, "progress", None)
    if progress is None:
        return None, state
    done, total = progress()
    return (done / total if total > 0 else None), state


# ----------------------------------------------------------------- fault driver


def _victim(view: list[dict[str, Any]], role: str, avoid_node: Any) -> dict[str, Any] | None:
    """A live member to kill: for an executor, preferably a busy one off ``avoid_node``."""
    live = [m for m in view if m["role"] == role and not _is_down(m)]
    if role == "executor":
        live.sort(key=lambda m: (m["node"] == avoid_node, m["health"] != "busy", str(m["id"])))
    else:
        live.sort(key=lambda m: str(m["id"]), reverse=True)  # the newest worker: not the first
    return live[0] if live else None


class FaultDriver:
    """Injects the planned faults at their progress points and watches them heal."""

    def __init__(self, cluster: Any, faults: list[Fault], timeline: Timeline) -> None:
        self.cluster = cluster
        self.faults = faults
        self.tl = timeline

    def _inject(self, fault: Fault, progress: float, view: list[dict[str, Any]]) -> None:
        # Kill the executor on a node other than the one the worker fault will take
        # down, so that the two faults hit different machines.
        workers = [m for m in view if m["role"] == "worker" and not _is_down(m)]
        doomed = max(workers, key=lambda m: str(m["id"]), default=None)
        if fault.role == "leader":
            leaders = [m for m in view if m["role"] == "coordinator" and m["health"] == "leader"]
            victim = leaders[0] if leaders else None
        else:
            victim = _victim(view, fault.role, None if doomed is None else doomed["node"])
        if victim is None:
            self.tl.add("skipped", f"no live {fault.role} to kill")
            fault.injected_s = -1.0
            return
        if fault.role == "leader":
            self.cluster.kill("coordinator", victim["id"])
        else:
            self.cluster.kill(fault.role, victim["id"])
        fault.member_id, fault.pid, fault.progress_seen = victim["id"], victim["pid"], progress
        where = f" on worker {victim['node']}" if fault.role == "executor" else ""
        ev = self.tl.add(
            "fault",
            f"SIGKILL {fault.role} {victim['id']}{where} (pid {victim['pid']}) "
            f"at {100 * progress:.0f}% of the job",
        )
        fault.injected_s = ev.t_s

    def _watch(self, fault: Fault, view: list[dict[str, Any]]) -> None:
        if fault.injected_s is None or fault.injected_s < 0:
            return
        role = "coordinator" if fault.role == "leader" else fault.role
        m = _find(view, role, fault.member_id)
        if fault.detected_s is None and (m is None or _is_down(m) or m["pid"] != fault.pid):
            if m is None:
                state = "gone from status"
            elif m["pid"] != fault.pid:
                state = f"pid {fault.pid} gone from status, slot now pid {m['pid']}"
            else:
                state = f"health {m['health']!r}"
            fault.detected_s = self.tl.add(
                "detected", f"{fault.role} {fault.member_id}: {state}"
            ).t_s
        if fault.detected_s is None:
            return
        if fault.role == "leader":
            self._watch_leader(fault, view, m)
        elif fault.replaced_s is None and m is not None and _back(m, fault):
            # An executor's agent restarts it in the same slot at once, under a new
            # pid; the cluster's supervisor restarts a dead worker node.
            fault.replacement_pid = m["pid"]
            fault.replaced_s = self.tl.add(
                "replaced", f"{fault.role} {fault.member_id} running again as pid {m['pid']}"
            ).t_s

    def _watch_leader(
        self, fault: Fault, view: list[dict[str, Any]], old: dict[str, Any] | None
    ) -> None:
        """A new leader elected (any process but the killed one: the restarted old
        replica may win too); and the killed one back under a new pid (the cluster's
        supervisor restarted it; its ``member_restarted`` event comes from the cluster)."""
        if fault.replaced_s is None:
            new = [c for c in view if c["role"] == "coordinator" and c["health"] == "leader"]
            if new and new[0]["pid"] != fault.pid:
                fault.replacement_pid = new[0]["pid"]
                fault.replaced_s = self.tl.add(
                    "elected", f"coordinator {new[0]['id']} leads now (pid {new[0]['pid']})"
                ).t_s
        if fault.back_s is None and old is not None and _back(old, fault):
            fault.back_s = self.tl.add(
                "restarted",
                f"coordinator {fault.member_id} running again as pid {old['pid']} "
                f"({old['health']})",
            ).t_s

    def step(self, progress: float | None, elapsed_fraction: float) -> None:
        """One poll: inject what is due, watch what was injected, note progress after faults."""
        view = members(self.cluster)
        point = progress if progress is not None else elapsed_fraction
        for fault in self.faults:
            if fault.injected_s is None and point >= fault.at_progress:
                self._inject(fault, point, view)
                view = members(self.cluster)
        for fault in self.faults:
            self._watch(fault, view)
        if progress is not None:
            for fault in self.faults:
                seen = fault.progress_seen
                if (
                    fault.detected_s is not None
                    and fault.resumed_s is None
                    and seen is not None
                    and progress > seen
                ):
                    fault.resumed_s = self.tl.add(
                        "progress",
                        f"job moving again after the {fault.role} kill: {100 * progress:.0f}% done",
                    ).t_s


# ----------------------------------------------------------------- the job

_ENDED = frozenset({"finished", "failed", "succeeded", "done", "cancelled", "error"})


def build_job(task: Any, pattern: str, partitions: int) -> Any:
    """read_text -> map side with combiner -> shuffle + sum per key."""
    return (
        task.read_text(pattern, partitions=partitions)
        .map_partitions(loganalysis.partition_counts)
        .reduce_by_key(loganalysis.add, partitions=REDUCE_PARTITIONS)
    )


def _watch_after(driver: FaultDriver, deadline: float) -> None:
    """Keep polling status until every injected fault was detected (and executors replaced)."""

    def settled(f: Fault) -> bool:
        if f.injected_s is None or f.injected_s < 0:
            return True
        if f.role == "leader":
            return f.replaced_s is not None and f.back_s is not None
        return f.detected_s is not None and f.replaced_s is not None

    while not all(settled(f) for f in driver.faults) and time.perf_counter() < deadline:
        driver.step(None, 0.0)
        time.sleep(POLL_INTERVAL_S * 5)


def run_faulted(
    cluster: Any, ds: Any, faults: list[Fault], expected_s: float
) -> tuple[list[Any], float, Timeline]:
    """Submit the job detached, inject ``faults`` while it runs, return pairs, wall time, events."""
    tl = Timeline()
    driver = FaultDriver(cluster, faults, tl)
    job = ds.submit(progress=False)
    tl.add("submitted", f"job {job.id}: {ds.num_partitions} reduce partitions after the shuffle")
    deadline = tl.t0 + JOB_TIMEOUT_S
    while time.perf_counter() < deadline:
        progress, state = job_progress(job)
        if state.lower() in _ENDED:
            break
        driver.step(progress, (time.perf_counter() - tl.t0) / max(expected_s, 1e-3))
        time.sleep(POLL_INTERVAL_S)
    pairs: list[Any] = job.result(timeout=max(1.0, deadline - time.perf_counter()))
    wall = time.perf_counter() - tl.t0
    tl.add("completed", f"job {job.id} finished: {len(pairs)} keys")
    _watch_after(driver, time.perf_counter() + WATCH_TIMEOUT_S)
    tl.merge_cluster_events(cluster, str(job.id))
    for f in faults:
        if f.injected_s is None:
            tl.add("skipped", f"{f.role} kill: the job ended before {100 * f.at_progress:.0f}%")
    return pairs, wall, tl


_CONDENSE = frozenset(
    {"output_lost", "task_rescheduled", "task_moved", "task_failed", "fetch_failed"}
)
_PARTITION = re.compile(r"partition (\d+)")


def condense(events: list[Event]) -> list[Event]:
    """Fold runs of per-task events of one kind into one line each (they come in bursts)."""
    out: list[Event] = []
    run: list[Event] = []

    def flush() -> None:
        if len(run) == 1:
            out.append(run[0])
        elif run:
            parts = [m.group(1) for ev in run if (m := _PARTITION.search(ev.detail))]
            shown = ", ".join(parts[:12]) + (", ..." if len(parts) > 12 else "")
            detail = f"{len(run)} tasks: partitions {shown}" if parts else run[0].detail
            out.append(Event(run[0].t_s, run[0].kind, f"{detail} (until {run[-1].t_s:.3f} s)"))
        run.clear()

    for ev in events:
        if run and (ev.kind != run[0].kind or ev.kind not in _CONDENSE):
            flush()
        run.append(ev)
    flush()
    return out


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run_demo(cfg: DemoConfig, say: Callable[[str], None]) -> dict[str, Any]:
    """The whole demo; returns the JSON-able outcome (``ok`` is the exit criterion)."""
    import lepton_ai as lep

    tmp = Path(tempfile.mkdtemp(prefix="lepton-demo-"))
    try:
        say(f"generating a {cfg.size_mb:g} MB web-server log corpus (seed {cfg.seed}) ...")
        spec, t_gen = _timed(
            lambda: synthetic.write_log_corpus(
                tmp, int(cfg.size_mb * 1e6), files=cfg.files, seed=cfg.seed
            )
        )
        say("computing the reference answer serially ...")
        reference, t_serial = _timed(lambda: loganalysis.serial_report(spec.paths))
        say(f"starting LocalCluster(workers={cfg.workers}, coordinators={cfg.coordinators}) ...")
        t0 = time.perf_counter()
        with lep.LocalCluster(workers=cfg.workers, coordinators=cfg.coordinators) as cluster:
            t_start = time.perf_counter() - t0
            task = lep.DistributedTask(cluster, progress=False)
            ds = build_job(task, str(tmp / "*.log"), cfg.partitions)
            say("running the job without faults ...")
            clean_pairs, t_clean = _timed(lambda: ds.collect(progress=False))
            faults = (
                [Fault("executor", cfg.executor_kill_at), Fault("worker", cfg.worker_kill_at)]
                if cfg.faults
                else []
            )
            if cfg.faults and cfg.coordinators > 1:
                faults.append(Fault("leader", cfg.leader_kill_at))
            victims = ", ".join(_VICTIM.get(f.role, f.role) for f in faults)
            say(f"running it again, killing: {victims or 'nothing (--no-faults)'} ...")
            pairs, t_faulted, tl = run_faulted(cluster, ds, faults, t_clean)
            final_members = members(cluster)
        clean = loganalysis.summarize(clean_pairs)
        faulted = loganalysis.summarize(pairs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    injected = [f for f in faults if f.injected_s is not None and f.injected_s >= 0]
    checks = {
        "fault_free_matches_serial": clean == reference,
        "with_faults_matches_serial": faulted == reference,
        "faults_injected": len(injected),
        "faults_planned": len(faults),
    }
    return {
        "ok": bool(checks["fault_free_matches_serial"] and checks["with_faults_matches_serial"]),
        "config": asdict(cfg),
        "corpus": {
            "bytes": spec.size_bytes,
            "files": len(spec.paths),
            "lines": reference.total_requests,
        },
        "timings_s": {
            "generate": round(t_gen, 3),
            "serial": round(t_serial, 3),
            "cluster_start": round(t_start, 3),
            "fault_free": round(t_clean, 3),
            "with_faults": round(t_faulted, 3),
        },
        "faults": [asdict(f) for f in faults],
        "timeline": [asdict(e) for e in condense(tl.events)],
        "checks": checks,
        "members_after": final_members,
        "result": faulted.to_json(),
    }


# ----------------------------------------------------------------- output


# The demo's own lines (what it did and saw); the cluster's events merged into its
# timeline are styled by their phase (monitor.events), as on the dashboard.
_STYLES = {
    "fault": "bold red",
    "detected": "yellow",
    "replaced": "green",
    "restarted": "green",
    "completed": "bold green",
}
_PHASE_STYLES = {"fault": "red", "detection": "yellow", "healing": "cyan"}


def render(out: dict[str, Any]) -> None:
    """The human form of ``run_demo``'s outcome (rich tables)."""
    from rich.console import Console
    from rich.table import Table

    con = Console()
    t = out["timings_s"]
    corpus = out["corpus"]
    con.print(
        f"\n[bold]lepton demo[/bold]: log analysis of {corpus['bytes'] / 1e6:.0f} MB "
        f"({corpus['lines']:,} requests in {corpus['files']} files) on "
        f"{out['config']['workers']} workers"
    )
    tl = Table(title="Timeline of the run with faults", title_justify="left")
    tl.add_column("t (s)", justify="right")
    tl.add_column("event")
    tl.add_column("detail")
    for ev in out["timeline"]:
        style = _STYLES.get(ev["kind"]) or _PHASE_STYLES.get(phase_of(ev["kind"]), "")
        tl.add_row(
            f"{ev['t_s']:.3f}", f"[{style}]{ev['kind']}[/]" if style else ev["kind"], ev["detail"]
        )
    con.print(tl)

    res = out["result"]
    svc = Table(title="Requests per service", title_justify="left")
    for col in ("service", "requests", "5xx errors", "error rate", "top status codes"):
        svc.add_column(col, justify="left" if col in ("service", "top status codes") else "right")
    for name, s in res["services"].items():
        top = sorted(s["by_status"].items(), key=lambda kv: -kv[1])[:4]
        svc.add_row(
            name,
            f"{s['requests']:,}",
            f"{s['errors']:,}",
            f"{100 * s['error_rate']:.2f}%",
            ", ".join(f"{code}: {n:,}" for code, n in top),
        )
    con.print(svc)
    urls = Table(title="Top URLs", title_justify="left")
    urls.add_column("#", justify="right")
    urls.add_column("path")
    urls.add_column("requests", justify="right")
    for i, (url, n) in enumerate(res["top_urls"], 1):
        urls.add_row(str(i), url, f"{n:,}")
    con.print(urls)

    c = out["checks"]
    mark = {True: "[green]exact match[/]", False: "[red]MISMATCH[/]"}
    con.print(f"fault-free run vs serial computation: {mark[c['fault_free_matches_serial']]}")
    con.print(
        f"run with {c['faults_injected']}/{c['faults_planned']} faults vs serial computation: "
        f"{mark[c['with_faults_matches_serial']]}"
    )
    slow = t["with_faults"] - t["fault_free"]
    con.print(
        f"time: serial {t['serial']:.2f} s, fault-free {t['fault_free']:.2f} s, "
        f"with faults {t['with_faults']:.2f} s ({slow:+.2f} s); "
        f"cluster start {t['cluster_start']:.2f} s"
    )
    verdict = "[bold green]OK[/]" if out["ok"] else "[bold red]FAILED[/]"
    con.print(f"result: {verdict}")


def _cmd(args: argparse.Namespace) -> int:
    cfg = DemoConfig(
        size_mb=args.size_mb,
        workers=args.workers,
        seed=args.seed,
        partitions=args.partitions,
        files=args.files,
        faults=not args.no_faults,
        executor_kill_at=args.executor_kill_at,
        worker_kill_at=args.worker_kill_at,
        coordinators=args.coordinators,
        leader_kill_at=args.leader_kill_at,
    )

    def say(msg: str) -> None:
        if not args.json:
            print(msg, file=sys.stderr, flush=True)

    out = run_demo(cfg, say)
    if args.json:
        print(json.dumps(out))
    else:
        render(out)
    return 0 if out["ok"] else 1


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run a log analysis job on a local cluster while killing an executor, a worker "
        "and the leading coordinator",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--size-mb", type=float, default=SIZE_MB_DEFAULT, help="corpus size (MB)")
    p.add_argument("--workers", type=int, default=WORKERS_DEFAULT, help="worker nodes")
    p.add_argument("--seed", type=int, default=SEED_DEFAULT, help="corpus seed")
    p.add_argument("--partitions", type=int, default=PARTITIONS_DEFAULT, help="input partitions")
    p.add_argument("--files", type=int, default=FILES_DEFAULT, help="log files to write")
    p.add_argument("--no-faults", action="store_true", help="skip the fault injection")
    p.add_argument(
        "--executor-kill-at",
        type=float,
        default=EXECUTOR_KILL_AT,
        help="fraction of the job's tasks done when an executor is killed",
    )
    p.add_argument(
        "--worker-kill-at",
        type=float,
        default=WORKER_KILL_AT,
        help="fraction of the job's tasks done when a worker node is killed",
    )
    p.add_argument(
        "--coordinators",
        type=int,
        default=COORDINATORS_DEFAULT,
        help="coordinator replicas (3 or 5: the leading one is also SIGKILLed mid-job; "
        "1: a single coordinator, not killed)",
    )
    p.add_argument(
        "--leader-kill-at",
        type=float,
        default=LEADER_KILL_AT,
        help="fraction of the job's tasks done when the leading coordinator is killed",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd)
