"""``lepton kv put|get|delete|cas`` and the KV replicas' part of ``lepton cluster status``.

``register(subparsers)`` adds the top-level ``kv`` command. The ``cluster`` command
belongs to the node layer, which calls ``register_cluster_commands(cluster_subparsers)``
to add ``status`` (and reuses ``collect_status`` for its own view).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

from lepton_ai.consensus.client import KvClient, KvClientConfig, parse_addresses
from lepton_ai.errors import LeptonError
from lepton_ai.wire import resolve_token

PEERS_ENV = "LEPTON_PEERS"


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--peers",
        default=os.environ.get(PEERS_ENV),
        help=f"replica addresses: host:port,... or id=host:port,... (default ${PEERS_ENV})",
    )
    parser.add_argument("--token", default=None, help="cluster token (default $LEPTON_TOKEN)")
    parser.add_argument("--timeout", type=float, default=10.0, help="deadline in seconds")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    kv = subparsers.add_parser("kv", help="read and write the replicated KV store")
    kv_sub = kv.add_subparsers(dest="kv_command", metavar="OP", required=True)

    put = kv_sub.add_parser("put", help="set KEY to VALUE")
    put.add_argument("key")
    put.add_argument("value")
    put.add_argument("--value-json", action="store_true", help="parse VALUE as JSON")
    _add_common(put)
    put.set_defaults(func=cmd_kv)

    get = kv_sub.add_parser("get", help="print KEY's value (exit 1 if absent)")
    get.add_argument("key")
    _add_common(get)
    get.set_defaults(func=cmd_kv)

    delete = kv_sub.add_parser("delete", help="remove KEY")
    delete.add_argument("key")
    _add_common(delete)
    delete.set_defaults(func=cmd_kv)

    cas = kv_sub.add_parser("cas", help="set KEY to NEW iff it equals EXPECTED (exit 1 if not)")
    cas.add_argument("key")
    cas.add_argument("expected", help="expected value; use --absent for 'key must not exist'")
    cas.add_argument("new")
    cas.add_argument("--absent", action="store_true", help="expect KEY to be absent")
    cas.add_argument("--value-json", action="store_true", help="parse values as JSON")
    _add_common(cas)
    cas.set_defaults(func=cmd_kv)


def register_cluster_commands(
    cluster_subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    *,
    status_name: str | None = "status",
) -> None:
    """Add the replica commands to the node layer's ``lepton cluster`` parser.

    ``status_name``: the name of the replica-status command (``None`` to leave it out
    when the node layer has its own ``status`` and calls ``collect_status`` itself).
    """
    if status_name is not None:
        status = cluster_subparsers.add_parser(
            status_name, help="replicas: leader, ballot, commit index, lag and health"
        )
        _add_common(status)
        status.set_defaults(func=cmd_cluster_status)

    add = cluster_subparsers.add_parser(
        "add-coordinator",
        help="add a replica (start it first with `lepton coordinator --join ...`)",
    )
    add.add_argument("--id", type=int, required=True, help="the new replica's node id")
    add.add_argument("--address", required=True, help="the new replica's host:port")
    _add_common(add)
    add.set_defaults(func=cmd_change_members, add=True)

    remove = cluster_subparsers.add_parser(
        "remove-coordinator", help="remove a replica from the group (then stop it)"
    )
    remove.add_argument("--id", type=int, required=True, help="the node id to remove")
    _add_common(remove)
    remove.set_defaults(func=cmd_change_members, add=False, address="")


def _value(raw: str, as_json: bool) -> Any:
    if not as_json:
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--value-json given but {raw!r} is not JSON: {exc}") from exc


def _replicas(args: argparse.Namespace) -> tuple[str, str]:
    """(Paxos addresses, token): ``--peers``/``$LEPTON_PEERS``, else those of the
    cluster every other command finds ($LEPTON_ADDRESS, or `lepton cluster up`'s)."""
    if args.peers:
        return args.peers, resolve_token(args.token)
    from lepton_ai.node.cluster_handle import Cluster, find_cluster

    try:
        address, token = find_cluster(None, args.token)
    except ValueError as exc:
        raise ValueError(f"{exc}; or pass --peers (or set ${PEERS_ENV})") from None
    cluster = Cluster(address, token)
    try:
        members = cluster.status()["members"]
    finally:
        cluster.close()
    paxos = [m["paxos"] for m in members if m.get("paxos")]
    if not paxos:
        raise ValueError(
            f"the cluster at {address} has one coordinator on a local log: no KV replicas "
            "(start it with 3 coordinators)"
        )
    return ",".join(paxos), token


def _client(args: argparse.Namespace) -> KvClient:
    peers, token = _replicas(args)
    return KvClient(
        parse_addresses(peers), token=token, config=KvClientConfig(deadline_s=args.timeout)
    )


async def _kv(args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    async with _client(args) as client:
        op = args.kv_command
        if op == "put":
            await client.put(args.key, _value(args.value, args.value_json))
            return 0, {"key": args.key, "ok": True}
        if op == "get":
            result = await client.read(args.key)
            return (0 if result.found else 1), {
                "key": args.key,
                "found": result.found,
                "value": result.value,
            }
        if op == "delete":
            found = await client.delete(args.key)
            return 0, {"key": args.key, "found": found}
        expected = None if args.absent else _value(args.expected, args.value_json)
        ok = await client.cas(args.key, expected, _value(args.new, args.value_json))
        return (0 if ok else 1), {"key": args.key, "swapped": ok}


def cmd_kv(args: argparse.Namespace) -> int:
    code, out = asyncio.run(_kv(args))
    if args.json:
        print(json.dumps(out, default=repr))
    elif args.kv_command == "get":
        if out["found"]:
            value = out["value"]
            print(value if isinstance(value, str) else json.dumps(value, default=repr))
        else:
            print(f"lepton kv get: key {args.key!r} not found", file=sys.stderr)
    elif args.kv_command == "cas":
        print("swapped" if out["swapped"] else "not swapped: value differs")
    elif args.kv_command == "delete":
        print("deleted" if out["found"] else "not found (nothing to delete)")
    else:
        print("ok")
    return code


async def collect_status(
    addresses: list[str], token: str, timeout_s: float = 2.0
) -> dict[str, Any]:
    """Every replica's view: role, ballot, commit/applied index, lag behind the leader, health."""
    async with KvClient(addresses, token=token) as client:
        results = await asyncio.gather(
            *(client.status(a, timeout_s) for a in addresses), return_exceptions=True
        )
    replicas: list[dict[str, Any]] = []
    for address, res in zip(addresses, results, strict=True):
        if isinstance(res, BaseException):
            if not isinstance(res, OSError | TimeoutError | LeptonError):
                raise res
            replicas.append({"address": address, "health": "down", "error": str(res)})
            continue
        replicas.append(
            {
                "address": address,
                "health": "up",
                "node": res.node,
                "pid": res.pid,
                "role": res.role,
                "ballot": res.ballot,
                "leader": res.leader,
                "commit_index": res.commit_index,
                "applied_index": res.applied_index,
                "snapshot_index": res.snapshot_index,
                "wal_bytes": res.wal_bytes,
                "members": res.members,
            }
        )
    leaders = [r for r in replicas if r.get("role") == "leader"]
    leader = max(leaders, key=lambda r: r["commit_index"]) if leaders else None
    top = max((r.get("commit_index", 0) for r in replicas), default=0)
    for r in replicas:
        if r["health"] == "up":
            r["lag"] = top - r["applied_index"]
    return {
        "leader": leader["node"] if leader else None,
        "leader_address": leader["address"] if leader else None,
        "ballot": leader["ballot"] if leader else None,
        "commit_index": top,
        "replicas": replicas,
    }


def cmd_change_members(args: argparse.Namespace) -> int:
    """One membership change, acknowledged once the new configuration is committed."""

    async def change() -> None:
        async with _client(args) as client:
            await client.change_members(add=args.add, node=args.id, address=args.address)

    asyncio.run(change())
    verb = "added" if args.add else "removed"
    if args.json:
        print(json.dumps({"node": args.id, verb: True}))
    else:
        print(f"replica {args.id} {verb}")
    return 0


def cmd_cluster_status(args: argparse.Namespace) -> int:
    peers, token = _replicas(args)
    status = asyncio.run(collect_status(parse_addresses(peers), token, args.timeout))
    if args.json:
        print(json.dumps(status))
    else:
        print(
            f"leader: {status['leader']} ({status['leader_address']})  "
            f"ballot: {status['ballot']}  commit index: {status['commit_index']}"
        )
        print(f"{'node':>4}  {'address':<22} {'role':<9} {'health':<6} {'applied':>8} {'lag':>6}")
        for r in status["replicas"]:
            print(
                f"{r.get('node', '?')!s:>4}  {r['address']:<22} {r.get('role', '-'):<9} "
                f"{r['health']:<6} {r.get('applied_index', '-')!s:>8} {r.get('lag', '-')!s:>6}"
            )
    up = sum(1 for r in status["replicas"] if r["health"] == "up")
    return 0 if status["leader"] is not None and up * 2 > len(status["replicas"]) else 1
