"""``lepton deploy create|status|update|rollback|scale|rm``: cluster deployments from the shell.

    lepton deploy create iris model.py:predict --replicas 3
    lepton deploy status iris --json
    lepton deploy update iris model_v2.py:predict
    lepton deploy rollback iris
    lepton deploy scale iris 5
    lepton deploy rm iris

The cluster is found like every other command's (``--address``/``--token``, else
the state file of ``lepton cluster up``). ``create``, ``update``, ``rollback`` and
``scale`` wait until the wanted replicas of the new version are ready (``--no-wait``:
return once the change is committed). A failure exits non-zero with one line.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from typing import Any

import msgspec

from lepton_ai.node.cli import _print, add_connect_args, connect_from_args
from lepton_ai.serve.cluster_deployment import ClusterDeployment, replica_dicts
from lepton_ai.serve.spec import Autoscale, DeploymentInfo, check_autoscale


@contextlib.contextmanager
def _cluster(args: argparse.Namespace) -> Iterator[Any]:
    cluster = connect_from_args(args)
    try:
        yield cluster
    except KeyError as exc:
        raise LookupError(str(exc.args[0]) if exc.args else "no such deployment") from None
    finally:
        cluster.close()


def _summary(info: DeploymentInfo) -> dict[str, Any]:
    """One deployment as the commands print it, from one status reply."""
    spec = info.spec
    return {
        "name": spec.name,
        "target": spec.target,
        "version": spec.version,
        "replicas": spec.replicas,
        "autoscale": None if spec.autoscale is None else msgspec.to_builtins(spec.autoscale),
        "ready": info.ready,
        "urls": info.urls,
        "status": replica_dicts(info),
    }


def _text(doc: dict[str, Any]) -> str:
    lines = [
        f"{doc['name']}: version {doc['version']}, {doc['ready']}/{doc['replicas']} ready, "
        f"target {doc['target']}"
    ]
    lines += [f"  url {u}" for u in doc["urls"]]
    for r in doc["status"]:
        where = f" on {r['node']}" if r["node"] else ""
        extra = f" ({r['error']})" if r["error"] else ""
        lines.append(
            f"  replica {r['id']}{where}: v{r['version']} {r['state']} "
            f"pid {r['pid']} restarts {r['restarts']}{extra}"
        )
    return "\n".join(lines)


def _show(args: argparse.Namespace, dep: ClusterDeployment) -> int:
    doc = _summary(dep.refresh())
    _print(args, doc, _text(doc))
    return 0


def _cmd_create(args: argparse.Namespace) -> int:
    with _cluster(args) as cluster:
        dep = ClusterDeployment.create(
            cluster,
            args.target,
            args.replicas,
            args.name,
            max_batch_size=args.max_batch_size,
            max_wait_ms=args.max_wait_ms,
            autoscale=_policy(args),
        )
        if not args.no_wait:
            dep.wait_ready(args.timeout_s)
        return _show(args, dep)


def _policy(args: argparse.Namespace) -> Autoscale | None:
    if args.max_replicas is None:
        if args.min_replicas is not None:
            raise ValueError("--min-replicas needs --max-replicas (which turns autoscaling on)")
        return None
    low = args.replicas if args.min_replicas is None else args.min_replicas
    policy = Autoscale(
        low, args.max_replicas, args.target_inflight, args.scale_up_delay_s, args.scale_down_delay_s
    )
    check_autoscale(policy)
    return policy


def _cmd_status(args: argparse.Namespace) -> int:
    with _cluster(args) as cluster:
        if args.name:
            return _show(args, ClusterDeployment.get(cluster, args.name))
        from lepton_ai.node.client import check_reply
        from lepton_ai.node.messages import Deployments, GetDeployments

        reply = check_reply(cluster.client.request(GetDeployments(""), 30.0))
        infos = reply.deployments if isinstance(reply, Deployments) else []
        docs = [_summary(info) for info in infos]
        _print(
            args,
            {"deployments": docs},
            "\n".join(_text(d) for d in docs) or "no deployments",
        )
        return 0


def _cmd_change(args: argparse.Namespace) -> int:
    with _cluster(args) as cluster:
        dep = ClusterDeployment.get(cluster, args.name)
        wait, timeout = not args.no_wait, args.timeout_s
        if args.deploy_command == "update":
            dep.update(args.target, wait=wait, timeout_s=timeout)
        elif args.deploy_command == "rollback":
            dep.rollback(wait=wait, timeout_s=timeout)
        else:
            dep.scale(args.replicas, wait=wait, timeout_s=timeout)
        return _show(args, dep)


def _cmd_rm(args: argparse.Namespace) -> int:
    with _cluster(args) as cluster:
        ClusterDeployment.get(cluster, args.name).delete()
        _print(args, {"deleted": args.name}, f"deleted {args.name}")
        return 0


def _common(p: argparse.ArgumentParser, waits: bool = True) -> None:
    add_connect_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    if waits:
        p.add_argument("--no-wait", action="store_true", help="return once committed")
        p.add_argument("--timeout-s", type=float, default=300.0, help="how long to wait")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "deploy",
        help="model deployments on the cluster (outlive the caller)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    sub = p.add_subparsers(dest="deploy_command", metavar="ACTION", required=True)
    c = sub.add_parser("create", help="deploy TARGET as NAME")
    c.add_argument("name")
    c.add_argument("target", help="module:callable, path/file.py:callable or model.pkl/.joblib")
    c.add_argument("--replicas", type=int, default=1)
    c.add_argument("--max-batch-size", type=int, default=0, help="micro-batch size (0 = off)")
    c.add_argument("--max-wait-ms", type=float, default=5.0, help="micro-batch wait")
    c.add_argument("--min-replicas", type=int, default=None, help="autoscaling lower bound")
    c.add_argument(
        "--max-replicas", type=int, default=None, help="autoscaling upper bound (turns it on)"
    )
    c.add_argument("--target-inflight", type=float, default=4.0, help="requests per replica")
    c.add_argument("--scale-up-delay-s", type=float, default=3.0)
    c.add_argument("--scale-down-delay-s", type=float, default=30.0)
    _common(c)
    c.set_defaults(func=_cmd_create)
    s = sub.add_parser("status", help="one deployment, or all")
    s.add_argument("name", nargs="?", default="")
    _common(s, waits=False)
    s.set_defaults(func=_cmd_status)
    u = sub.add_parser("update", help="roll out a new TARGET, one replica at a time")
    u.add_argument("name")
    u.add_argument("target")
    _common(u)
    u.set_defaults(func=_cmd_change)
    r = sub.add_parser("rollback", help="serve the previous version again")
    r.add_argument("name")
    _common(r)
    r.set_defaults(func=_cmd_change)
    n = sub.add_parser("scale", help="change the replica count")
    n.add_argument("name")
    n.add_argument("replicas", type=int)
    _common(n)
    n.set_defaults(func=_cmd_change)
    d = sub.add_parser("rm", help="delete the deployment (its replicas drain and stop)")
    d.add_argument("name")
    _common(d, waits=False)
    d.set_defaults(func=_cmd_rm)
