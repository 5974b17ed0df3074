"""The ``lepton`` command.

Each layer owns its subcommands: a module listed in ``_COMMAND_MODULES`` has
``register(subparsers)`` which adds parsers whose ``func(args) -> int`` runs the
command. A command exits non-zero with a one-line reason on failure.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

# Modules that contribute subcommands; a module that does not exist yet is skipped
# so that one layer's command set never breaks another's.
_COMMAND_MODULES = (
    "lepton_ai.node.programs",  # lepton coordinator, lepton worker
    "lepton_ai.node.cli",
    "lepton_ai.consensus.cli",
    "lepton_ai.serve.cli",
    "lepton_ai.serve.deploy_cli",
    "lepton_ai.compute.cli",
    "lepton_ai.storage.cli",
    "lepton_ai.monitor.cli",
    "lepton_ai.monitor.dashboard_cli",
    "lepton_ai.demo",
    "lepton_ai.wire.cli",  # lepton certs
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lepton",
        description="lepton_ai: fault-tolerant MapReduce, replicated KV and model serving.",
    )
    parser.add_argument("--version", action="version", version=f"lepton_ai {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(subparsers)
    from lepton_ai.wire.cli import add_global_options

    add_global_options(parser)  # --tls-dir, --http-token-file on every command
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lepton_ai")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        code = func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `lepton cluster events | head`: the reader left; that is not an error. Point
        # stdout at /dev/null so the interpreter's final flush does not complain.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # the CLI's edge: one line, non-zero exit.
        if getattr(args, "debug", False):
            raise
        print(f"lepton {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
