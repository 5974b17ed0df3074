"""``lepton submit FILE[:FUNC]`` and ``lepton job status|result|events ID``.

``FUNC`` (default ``main``) in ``FILE`` takes a ``DistributedTask`` and returns a
``Dataset`` (submitted as ``collect``) or a ``Job``. ``submit`` prints the job id
and returns at once unless ``--wait``; anyone with the id can fetch the result.
"""

from __future__ import annotations

import argparse
import json
import runpy
from typing import Any


def _connect(args: argparse.Namespace) -> Any:
    from lepton_ai.node.cli import connect_from_args

    return connect_from_args(args)


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
    return value


def _cmd_submit(args: argparse.Namespace) -> int:
    from lepton_ai.compute.api import Dataset, DistributedTask
    from lepton_ai.compute.job import Job

    path, _, func_name = args.target.partition(":")
    namespace = runpy.run_path(path, run_name="lepton_submit")
    func = namespace.get(func_name or "main")
    if not callable(func):
        raise ValueError(f"{path} has no function {func_name or 'main'}(task)")
    cluster = _connect(args)
    try:
        task = DistributedTask(
            cluster,
            max_retries=args.max_retries,
            retry_exceptions=args.retry_exceptions,
            task_timeout_s=args.task_timeout,
        )
        out = func(task)
        if isinstance(out, Dataset):
            job = out.submit(progress=False)
        elif isinstance(out, Job):
            job = out
        else:
            raise TypeError(
                f"{func_name or 'main'}(task) must return a Dataset or a Job, "
                f"got {type(out).__name__}"
            )
        if not args.wait:
            print(json.dumps({"job_id": job.id}) if args.json else job.id)
            return 0
        result = job.result(timeout=args.timeout)
    finally:
        cluster.close()
    if args.json:
        print(json.dumps({"job_id": job.id, "result": _jsonable(result)}))
    else:
        print(f"{job.id}: {result!r}")
    return 0


def _cmd_job(args: argparse.Namespace) -> int:
    from lepton_ai.compute.job import Job

    cluster = _connect(args)
    try:
        job = Job(cluster, args.job_id, progress=False)
        if args.job_command == "status":
            info = cluster.job_info(args.job_id, 0.0)
            obj = {
                "job_id": info.job_id,
                "status": info.status,
                "done": info.done,
                "total": info.total,
            }
            text = f"{info.job_id}: {info.status} ({info.done}/{info.total} tasks)"
        elif args.job_command == "rm":
            cluster.delete_job(args.job_id)
            obj = {"job_id": args.job_id, "deleted": True}
            text = f"{args.job_id}: deleted"
        elif args.job_command == "cancel":
            cluster.cancel_job(args.job_id)
            obj = {"job_id": args.job_id, "cancelled": True}
            text = f"{args.job_id}: cancelled"
        elif args.job_command == "events":
            from lepton_ai.monitor.timeline import format_event

            cluster.job_info(args.job_id, 0.0)  # KeyError for a job the cluster never had
            events = job.events()
            obj = {"job_id": args.job_id, "events": events}
            text = "\n".join(format_event(e) for e in events)
        else:
            value = job.result(timeout=args.timeout)
            obj = {"job_id": args.job_id, "result": _jsonable(value)}
            text = repr(value)
    except KeyError as exc:
        raise ValueError(f"unknown job {args.job_id}") from exc
    finally:
        cluster.close()
    print(json.dumps(obj) if args.json else text)
    return 0


def register(subparsers: Any) -> None:
    from lepton_ai.node.cli import add_connect_args

    p = subparsers.add_parser("submit", help="submit a job defined in a Python file")
    p.add_argument("target", metavar="FILE[:FUNC]", help="FUNC(task) returns a Dataset")
    p.add_argument("--wait", action="store_true", help="wait for the result and print it")
    p.add_argument("--timeout", type=float, default=None, help="with --wait: seconds to wait")
    p.add_argument("--max-retries", type=int, default=3, help="infrastructure retries per task")
    p.add_argument("--retry-exceptions", action="store_true", help="retry user exceptions too")
    p.add_argument(
        "--task-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="kill and retry an attempt running longer than this",
    )
    p.add_argument("--json", action="store_true")
    add_connect_args(p)
    p.set_defaults(func=_cmd_submit)

    job = subparsers.add_parser("job", help="list jobs; status, result, events, cancel or rm")
    sub = job.add_subparsers(dest="job_command", metavar="SUBCOMMAND", required=True)
    for name, text in (
        ("status", "running/finished/failed and progress"),
        ("result", "wait for the result and print it"),
        ("events", "the job's timeline"),
        ("cancel", "stop a running job (its result raises JobCancelled)"),
        ("rm", "forget a finished or failed job and its result"),
    ):
        q = sub.add_parser(name, help=text)
        q.add_argument("job_id")
        if name == "result":
            q.add_argument("--timeout", type=float, default=None)
        q.add_argument("--json", action="store_true")
        add_connect_args(q)
        q.set_defaults(func=_cmd_job)
    listing = sub.add_parser("list", help="every job the cluster keeps, oldest first")
    listing.add_argument("--json", action="store_true")
    add_connect_args(listing)
    listing.set_defaults(func=_cmd_job_list)


def _cmd_job_list(args: argparse.Namespace) -> int:
    from lepton_ai.monitor.timeline import clock

    cluster = _connect(args)
    try:
        jobs = cluster.jobs()
    finally:
        cluster.close()
    lines = [
        f"{j['job_id']}  {j['status']:<9} {j['done']}/{j['total']} tasks  "
        f"submitted {clock(j['submitted_at'])}  {j['name']}".rstrip()
        for j in jobs
    ]
    print(json.dumps({"jobs": jobs}) if args.json else "\n".join(lines) or "no jobs")
    return 0
