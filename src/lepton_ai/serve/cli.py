"""``lepton serve TARGET --replicas N --port P``: serve a model until Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from dataclasses import replace

from lepton_ai import eventloop
from lepton_ai.serve.config import ReplicaConfig, ServeConfig
from lepton_ai.serve.policy import Policy
from lepton_ai.serve.runtime import ServeRuntime, StartupError
from lepton_ai.serve.target import TargetError, check_target


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a model with replicas behind a load balancer",
        description=(
            "Serve TARGET ('module:callable', 'path/file.py:callable' or a pickled/joblib "
            "model) with N replica processes behind a load balancer on 127.0.0.1. "
            'POST {"instances": [...]} to /predict. Ctrl-C drains and stops everything.'
        ),
    )
    p.add_argument("target", help="module:callable, path/file.py:callable, or model.pkl/.joblib")
    p.add_argument("--replicas", type=int, default=1, help="replica processes (default 1)")
    p.add_argument("--port", type=int, default=8080, help="balancer port; 0 = ephemeral")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address the balancer listens on (default 127.0.0.1; 0.0.0.0: every interface)",
    )
    p.add_argument(
        "--spares", type=int, default=0, help="warm standby replicas (take over on a crash)"
    )
    p.add_argument("--max-batch-size", type=int, default=0, help="micro-batch size (0 = off)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="micro-batch wait")
    p.add_argument(
        "--policy",
        choices=[x.value for x in Policy],
        default=Policy.LEAST_OUTSTANDING.value,
        help="routing policy",
    )
    p.add_argument(
        "--request-timeout-s", type=float, default=10.0, help="per client request, all attempts"
    )
    p.add_argument(
        "--attempt-timeout-s", type=float, default=5.0, help="per attempt on one replica"
    )
    p.add_argument("--json", action="store_true", help="print the URL line as JSON")
    p.set_defaults(func=_run)


def _config(args: argparse.Namespace) -> ServeConfig:
    base = ServeConfig()
    replica = ReplicaConfig(
        **{
            **base.replica.__dict__,
            "max_batch_size": args.max_batch_size,
            "max_wait_ms": args.max_wait_ms,
        }
    )
    router = replace(base.balancer.router, policy=Policy(args.policy))
    balancer = replace(
        base.balancer,
        router=router,
        request_timeout_s=args.request_timeout_s,
        attempt_timeout_s=min(args.attempt_timeout_s, args.request_timeout_s),
    )
    return replace(base, replica=replica, balancer=balancer)


def _run(args: argparse.Namespace) -> int:
    if args.replicas < 1:
        print("lepton serve: error: --replicas must be >= 1", file=sys.stderr)
        return 2
    try:
        config = _config(args)
        # Before any port is bound: a TARGET that cannot be imported fails right here.
        check_target(args.target)
    except (TargetError, ValueError) as exc:
        print(f"lepton serve: error: {exc}", file=sys.stderr)
        return 1
    try:
        return eventloop.run(_serve(args, config))
    except (StartupError, OSError) as exc:
        print(f"lepton serve: error: {exc}", file=sys.stderr)
        return 1


async def _serve(args: argparse.Namespace, config: ServeConfig) -> int:
    runtime = ServeRuntime(
        args.target, args.replicas, args.port, config, spares=args.spares, host=args.host
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, runtime.request_stop)

    def ready(url: str) -> None:
        if args.json:
            print(json.dumps({"url": url, "replicas": runtime.status()}), flush=True)
        else:
            print(f"lepton serve: {args.replicas} replicas of {args.target} at {url}", flush=True)
            print(f"  curl -d '{{\"instances\": [...]}}' {url}/predict", flush=True)

    await runtime.run(ready)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m lepton_ai.serve.cli TARGET ...``: the same command without the other layers."""
    parser = argparse.ArgumentParser(prog="lepton")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
