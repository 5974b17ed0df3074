"""``lepton estimate``: the seed's cost models, from numbers or measured on a cluster.

    lepton estimate job-time --N 1000 --n 5 --b 10 --c 1000 --r 5   # T = 25.2 s
    lepton estimate consensus --m 5 --p 2 --d 1 --u 3 --e 5         # T' = 23 s
    lepton estimate consensus [--measure-election]   # p, d, u, e measured on the cluster
    lepton estimate job FILE[:FUNC] --workers 1,2,4,8  # b, c, r calibrated, T per n

See docs/cost-model.md for how each term is measured.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from lepton_ai.monitor import cost

WORKERS_MAX = 10_000  # the largest n a prediction is asked for


def _connect(args: argparse.Namespace) -> Any:
    from lepton_ai.node.cli import connect_from_args

    return connect_from_args(args)


def _emit(args: argparse.Namespace, obj: Any, lines: list[str]) -> int:
    print(json.dumps(obj) if args.json else "\n".join(lines))
    return 0


def _cmd_job_time(args: argparse.Namespace) -> int:
    t = cost.job_terms(args.N, args.n, args.b, args.c, args.r)
    lines = [
        "T = N/(n·b) + N/(n·c) + r",
        f"  transfer N/(n·b) = {args.N:g}/({args.n:g}·{args.b:g}) = {t.transfer_s:g} s",
        f"  compute  N/(n·c) = {args.N:g}/({args.n:g}·{args.c:g}) = {t.compute_s:g} s",
        f"  reduce   r = {t.reduce_s:g} s",
        f"T = {t.total_s:g} s",
    ]
    obj = {
        "T_s": t.total_s,
        "transfer_s": t.transfer_s,
        "compute_s": t.compute_s,
        "reduce_s": t.reduce_s,
    }
    return _emit(args, obj, lines)


_CONSENSUS_ARGS = ("m", "p", "d", "u", "e")


def _measured_consensus(args: argparse.Namespace) -> tuple[dict[str, float | None], dict[str, str]]:
    """The terms not given on the command line, measured on the running cluster."""
    from lepton_ai.monitor.estimate import CONSENSUS_WRITES_DEFAULT, measure_consensus

    writes = CONSENSUS_WRITES_DEFAULT if args.writes is None else args.writes
    cluster = _connect(args)
    try:
        est = measure_consensus(cluster, writes, args.measure_election)
    finally:
        cluster.close()
    values: dict[str, float | None] = {"m": est.m, "p": est.p, "d": est.d, "u": est.u, "e": est.e}
    return values, est.how


def _cmd_consensus(args: argparse.Namespace) -> int:
    given = {k: getattr(args, k) for k in _CONSENSUS_ARGS if getattr(args, k) is not None}
    values: dict[str, float | None] = dict(given)
    how = {k: "given" for k in given}
    if len(given) < len(_CONSENSUS_ARGS) or args.measure_election:
        measured, measured_how = _measured_consensus(args)
        for k in _CONSENSUS_ARGS:
            if k not in given:
                values[k] = measured[k]
                how[k] = measured_how.get(k, "measured" if k == "m" else "not measured")
    if values["e"] is None:
        raise ValueError(
            "e: no leader election in the cluster's timeline; pass --measure-election "
            "(kills the leader) or --e SECONDS"
        )
    m, p, d, u, e = (float(values[k] or 0.0) for k in _CONSENSUS_ARGS)
    t = cost.consensus_terms(m, p, d, u, e)
    lines = [
        "T' = p + d + m·u + e",
        f"  propose  p = {p:g} s   ({how['p']})",
        f"  decide   d = {d:g} s   ({how['d']})",
        f"  update   m·u = {m:g}·{u:g} = {t.update_s:g} s   ({how['u']})",
        f"  election e = {e:g} s   ({how['e']})",
        f"T' = {t.total_s:g} s",
    ]
    obj = {"T_s": t.total_s, **{k: float(values[k] or 0.0) for k in _CONSENSUS_ARGS}, "how": how}
    return _emit(args, obj, lines)


def parse_workers(text: str) -> list[int]:
    """``"1,2,4,8"`` -> ``[1, 2, 4, 8]``; ValueError for anything else."""
    try:
        ns = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--workers must be integers like 1,2,4,8, got {text!r}") from None
    if not ns or any(not 1 <= n <= WORKERS_MAX for n in ns):
        raise ValueError(f"--workers must be integers in 1..{WORKERS_MAX}, got {text!r}")
    return ns


def _cmd_job(args: argparse.Namespace) -> int:
    from lepton_ai.compute.api import DistributedTask
    from lepton_ai.monitor.estimate import (
        SAMPLE_BYTES_MAX_DEFAULT,
        SAMPLE_RUNS_DEFAULT,
        calibrate,
        load_dataset,
    )
    from lepton_ai.monitor.estimate_report import CALIBRATION_EVENT

    workers = parse_workers(args.workers)
    cluster = _connect(args)
    try:
        nodes = sum(1 for m in cluster.status()["members"] if m["role"] == "worker")
        ds = load_dataset(args.target, DistributedTask(cluster, progress=False))
        est = calibrate(
            ds,
            max(nodes, 1),
            runs=SAMPLE_RUNS_DEFAULT if args.runs is None else args.runs,
            sample_bytes_max=args.sample_bytes or SAMPLE_BYTES_MAX_DEFAULT,
        )
        # Kept in the timeline: Job.report() of a later run predicts from it.
        cluster.record_event(CALIBRATION_EVENT, json.dumps(est.calibration.to_json()))
    finally:
        cluster.close()
    cal = est.calibration
    rows = [(n, cal.predict(est.N, n)) for n in workers]
    lines = [
        f"input: N={est.N:,.0f} items in {est.partitions} partitions; sampled "
        f"{est.sample_fraction:.0%} on {cal.nodes} node(s)",
        f"  b = {cal.b:,.1f} items/s per node   ({cal.b_how})",
        f"  c = {cal.c:,.1f} items/s per node   ({cal.c_how})",
        f"  r = {cal.r:.3f} s   ({cal.r_how})",
        f"{'n':>6}{'transfer s':>12}{'compute s':>12}{'reduce s':>10}{'T s':>10}",
    ]
    lines += [
        f"{n:>6}{t.transfer_s:>12.3f}{t.compute_s:>12.3f}{t.reduce_s:>10.3f}{t.total_s:>10.3f}"
        for n, t in rows
    ]
    obj = {
        "N": est.N,
        "partitions": est.partitions,
        "sample_fraction": est.sample_fraction,
        "calibration": cal.to_json(),
        "predictions": [
            {
                "n": n,
                "T_s": t.total_s,
                "transfer_s": t.transfer_s,
                "compute_s": t.compute_s,
                "reduce_s": t.reduce_s,
            }
            for n, t in rows
        ],
    }
    return _emit(args, obj, lines)


def register(subparsers: Any) -> None:
    # The defaults are ``monitor.estimate``'s, resolved when a command runs: that
    # module imports the compute layer, which ``lepton --help`` need not load.
    from lepton_ai.node.cli import add_connect_args

    est = subparsers.add_parser("estimate", help="the seed's cost models, given or measured")
    sub = est.add_subparsers(dest="estimate_command", metavar="SUBCOMMAND", required=True)

    jt = sub.add_parser("job-time", help="T = N/(n·b) + N/(n·c) + r from numbers")
    for flag, text in (
        ("--N", "input items"),
        ("--n", "worker nodes"),
        ("--b", "transfer rate per node, items/s"),
        ("--c", "compute rate per node, items/s"),
        ("--r", "reduce time, s"),
    ):
        jt.add_argument(flag, type=float, required=True, help=text)
    jt.add_argument("--json", action="store_true")
    jt.set_defaults(func=_cmd_job_time)

    co = sub.add_parser(
        "consensus", help="T' = p + d + m·u + e; terms not given are measured on the cluster"
    )
    for flag, text in (
        ("--m", "replicas"),
        ("--p", "propose time, s"),
        ("--d", "decide time, s"),
        ("--u", "per-replica update time, s"),
        ("--e", "election time, s"),
    ):
        co.add_argument(flag, type=float, default=None, help=text)
    co.add_argument(
        "--measure-election",
        action="store_true",
        help="kill the leader and time the new election (e)",
    )
    co.add_argument("--writes", type=int, default=None, help="timed writes (default 20)")
    co.add_argument("--json", action="store_true")
    add_connect_args(co)
    co.set_defaults(func=_cmd_consensus)

    jb = sub.add_parser("job", help="calibrate b, c, r for a job file and predict T per n")
    jb.add_argument("target", metavar="FILE[:FUNC]", help="FUNC(task) returns a Dataset")
    jb.add_argument("--workers", default="1,2,4,8", help="node counts to predict for")
    jb.add_argument("--runs", type=int, default=None, help="runs per sample size (default 3)")
    jb.add_argument(
        "--sample-bytes",
        type=int,
        default=None,
        help="largest sample of a text input, bytes (default 16 MiB)",
    )
    jb.add_argument("--json", action="store_true")
    add_connect_args(jb)
    jb.set_defaults(func=_cmd_job)
