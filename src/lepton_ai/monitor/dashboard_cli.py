"""``lepton dashboard`` and ``lepton top``.

``lepton dashboard`` prints the running cluster's dashboard URL (``--open``: in a
browser too). ``--serve`` runs the dashboard here instead, against the cluster
found the usual way (``--address``/``$LEPTON_ADDRESS``, else the cluster ``lepton
cluster up`` started): useful for a cluster reached remotely, or one whose
coordinators serve no dashboard. ``lepton top`` shows the same overview in the
terminal (``--once``: one frame, for scripts).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from lepton_ai.errors import LeptonError
from lepton_ai.node.cli import add_connect_args

DEFAULT_HOST = "127.0.0.1"  # nothing listens beyond this host unless asked


def _connect(args: argparse.Namespace) -> tuple[Any, str | None]:
    """The cluster handle, and the state file it was found through (if any)."""
    from lepton_ai.node.cluster_handle import ADDRESS_ENV, connect, find_cluster
    from lepton_ai.node.state_file import default_state_file

    address, token = find_cluster(args.address, args.token, args.state_file)
    via_state = not (args.address or os.environ.get(ADDRESS_ENV))
    state_file = (args.state_file or str(default_state_file())) if via_state else None
    return connect(address, token), state_file


def _cmd_dashboard(args: argparse.Namespace) -> int:
    cluster, state_file = _connect(args)
    if args.serve:
        return _serve(args, cluster, state_file)
    try:
        url = getattr(cluster, "dashboard_url", None)
    except LeptonError as exc:  # e.g. no leader known right now
        raise LookupError(f"{exc}; `lepton dashboard --serve` serves one from here") from None
    finally:
        cluster.close()
    if not url:
        raise LookupError(
            "this cluster's coordinators serve no dashboard: run `lepton dashboard --serve`"
        )
    print(json.dumps({"url": url}) if args.json else url)
    if args.open:
        _open(str(url))
    return 0


def _open(url: str) -> None:
    import webbrowser

    if not webbrowser.open(url):
        print("no browser to open here: open the URL above by hand", file=sys.stderr)


def _serve(args: argparse.Namespace, cluster: Any, state_file: str | None) -> int:
    from lepton_ai.monitor.dashboard import dashboard_app
    from lepton_ai.monitor.dashboard_server import DashboardServer
    from lepton_ai.monitor.dashboard_source import ClusterSource

    try:
        app = dashboard_app(ClusterSource(cluster, state_file=state_file), cluster.token)
        server = DashboardServer(app, args.host, args.port)
        note = "log in with the cluster token"
        print(json.dumps({"url": server.url}) if args.json else f"{server.url}  ({note})")
        sys.stdout.flush()  # a script reading the URL must see it before we block
        if args.open:
            _open(server.url)
        server.serve_forever()
    finally:
        cluster.close()
    return 0


def _cmd_top(args: argparse.Namespace) -> int:
    from rich.console import Console

    from lepton_ai.monitor.dashboard_source import ClusterSource
    from lepton_ai.monitor.top import run_top

    cluster, state_file = _connect(args)
    # Piped output has no terminal width: wide enough that addresses are not cut.
    console = Console() if sys.stdout.isatty() else Console(width=args.width)
    try:
        source = ClusterSource(cluster, state_file=state_file)
        run_top(source, once=args.once, interval_s=args.interval_s, console=console)
    finally:
        cluster.close()
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    d = subparsers.add_parser(
        "dashboard",
        help="the live web dashboard: print its URL, or serve it here (--serve)",
        description="Print the running cluster's dashboard URL, or serve the dashboard "
        "from here (--serve) for the cluster found the usual way; log in with its token.",
    )
    add_connect_args(d)
    d.add_argument("--open", action="store_true", help="open it in a web browser too")
    d.add_argument("--serve", action="store_true", help="serve the dashboard from here")
    d.add_argument("--host", default=DEFAULT_HOST, help="with --serve: address to listen on")
    d.add_argument("--port", type=int, default=0, help="with --serve: port (0: a free one)")
    d.add_argument("--json", action="store_true", help='print {"url": ...}')
    d.set_defaults(func=_cmd_dashboard)

    t = subparsers.add_parser(
        "top",
        help="members, jobs, deployments and events, live in the terminal",
        description="The dashboard's overview in the terminal; Ctrl-C leaves.",
    )
    add_connect_args(t)
    t.add_argument("--once", action="store_true", help="print one frame and exit")
    t.add_argument("--interval-s", type=float, default=1.0, help="seconds between frames")
    t.add_argument("--width", type=int, default=160, help="columns when not on a terminal")
    t.set_defaults(func=_cmd_top)
