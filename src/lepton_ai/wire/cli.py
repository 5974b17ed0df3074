"""``lepton certs create``, and the ``--tls-dir``/``--http-token-file`` options of
every ``lepton`` command.

The two options are handled where they are parsed: they set ``$LEPTON_TLS_DIR``
and ``$LEPTON_HTTP_TOKEN`` in the command's environment, which is where every
program and client of the process (and every child it starts: coordinators,
workers, executors, replicas) looks. So one flag switches TLS on for a whole
``lepton cluster up``, and the HTTP token never sits in an argument list.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from lepton_ai.wire.http_auth import HTTP_TOKEN_ENV, read_token_file
from lepton_ai.wire.tls import TLS_DIR_ENV

_NO_GLOBAL_OPTIONS = frozenset({"certs"})  # commands that do not talk to a cluster


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("certs", help="TLS certificates of a cluster")
    sub = p.add_subparsers(dest="certs_command", metavar="COMMAND", required=True)
    c = sub.add_parser("create", help="make a cluster CA and a node certificate signed by it")
    c.add_argument("--dir", required=True, help="directory to write ca.pem, node.pem, node.key")
    c.add_argument(
        "--hosts",
        default="",
        metavar="H1,H2,...",
        help="host names and IPs the node certificate is valid for "
        "(127.0.0.1 and localhost always are)",
    )
    c.add_argument("--days", type=int, default=825, help="validity of the node certificate")
    c.add_argument(
        "--ca",
        default=None,
        metavar="CA_DIR",
        help="sign with the CA in CA_DIR (its ca.pem, ca.key) instead of making a new one",
    )
    c.set_defaults(func=_cmd_create)


def _cmd_create(args: argparse.Namespace) -> int:
    from lepton_ai.wire.certs import create

    hosts = [h for h in args.hosts.split(",") if h.strip()]
    for path in create(args.dir, hosts, args.days, args.ca):
        print(path)
    return 0


class _TlsDirAction(argparse.Action):
    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        # Absolute: children run from other directories.
        path = os.path.abspath(str(values))
        os.environ[TLS_DIR_ENV] = path
        setattr(namespace, self.dest, path)


class _TokenFileAction(argparse.Action):
    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        os.environ[HTTP_TOKEN_ENV] = read_token_file(str(values))
        setattr(namespace, self.dest, str(values))


def add_global_options(parser: argparse.ArgumentParser) -> None:
    """Add the options to every leaf command under ``parser``."""
    for name, leaf in _leaves(parser):
        if name in _NO_GLOBAL_OPTIONS:
            continue
        leaf.add_argument(
            "--tls-dir",
            action=_TlsDirAction,
            default=os.environ.get(TLS_DIR_ENV),
            metavar="DIR",
            help=f"mutual TLS with the certificates in DIR (default: ${TLS_DIR_ENV})",
        )
        leaf.add_argument(
            "--http-token-file",
            action=_TokenFileAction,
            default=None,
            metavar="FILE",
            help=f"bearer token of serving and /metrics, read from FILE (or ${HTTP_TOKEN_ENV})",
        )


def _leaves(
    parser: argparse.ArgumentParser, top: str = ""
) -> list[tuple[str, argparse.ArgumentParser]]:
    found: list[tuple[str, argparse.ArgumentParser]] = []
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [(top, parser)]
    for action in subs:
        for name, child in action.choices.items():
            found.extend(_leaves(child, top or name))
    return found
