"""Entry point of a replica process: ``python -m lepton_ai.serve.replica_main``.

Protocol with the supervisor (one JSON line on stdout, then nothing):

* ``{"port": N, "pid": P}`` once the model is loaded and the socket is bound
  on ``--host`` (127.0.0.1 unless told; an ephemeral port), or
* ``{"error": "..."}`` and exit code 2 when the target cannot be loaded.

The supervisor keeps our stdin open; when it dies, stdin reaches EOF and this
process exits, so replicas never outlive their deployment (a parent-PID check
covers the case where stdin is not a pipe). SIGTERM drains: /readyz turns 503,
uvicorn stops accepting and finishes in-flight requests, then exits.

With ``--version`` and ``--replica-id`` every answer carries ``x-lepton-version`` and
``x-lepton-replica``: a client (or a test) of a cluster deployment sees which replica
of which version served it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import stat
import sys
import threading
import time
from types import FrameType
from typing import TextIO

import uvicorn

from lepton_ai.serve.config import ReplicaConfig
from lepton_ai.serve.replica import REPLICA_HEADER, VERSION_HEADER, ReplicaState, build_app
from lepton_ai.serve.target import TargetError, load_target
from lepton_ai.wire.tls import replica_tls, uvicorn_tls_options

_PARENT_POLL_S = 0.5
_EXIT_PARENT_GONE = 3


def _watch_parent(parent_pid: int) -> None:
    """Exit when the supervisor is gone (stdin EOF or re-parented)."""

    def on_stdin() -> None:
        # os.read on the raw fd: a daemon thread blocked in the buffered reader would
        # hold its lock and abort interpreter shutdown.
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        os._exit(_EXIT_PARENT_GONE)

    def on_ppid() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_PARENT_POLL_S)
        os._exit(_EXIT_PARENT_GONE)

    # Only a pipe means "the supervisor holds the other end"; /dev/null would read EOF at once.
    if stat.S_ISFIFO(os.fstat(0).st_mode):
        threading.Thread(target=on_stdin, name="lepton-stdin-watch", daemon=True).start()
    threading.Thread(target=on_ppid, name="lepton-ppid-watch", daemon=True).start()


class _Server(uvicorn.Server):
    """uvicorn that flips /readyz to 503 the moment a stop signal arrives."""

    def __init__(self, config: uvicorn.Config, state: ReplicaState) -> None:
        super().__init__(config)
        self._state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._state.draining = True
        super().handle_exit(sig, frame)


def _protocol_channel() -> TextIO:
    """Our stdout becomes a private channel to the supervisor; fd 1 goes to stderr.

    The model's own prints then cannot corrupt the hello line or fill a pipe
    nobody reads once the supervisor has its port.
    """
    channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    return channel


def _say(channel: TextIO, doc: dict[str, object]) -> None:
    channel.write(json.dumps(doc) + "\n")
    channel.close()


def _identity(version: str | None, replica_id: str | None) -> dict[str, str]:
    headers = {}
    if version is not None:
        headers[VERSION_HEADER] = version
    if replica_id is not None:
        headers[REPLICA_HEADER] = replica_id
    return headers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lepton-replica")
    parser.add_argument("--target", required=True)
    parser.add_argument("--config", default="{}", help="ReplicaConfig fields as JSON")
    parser.add_argument("--parent-pid", type=int, default=os.getppid())
    parser.add_argument("--drain-timeout-s", type=float, default=10.0)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--version", default=None, help="answer with x-lepton-version")
    parser.add_argument("--replica-id", default=None, help="answer with x-lepton-replica")
    args = parser.parse_args(argv)
    _watch_parent(args.parent_pid)
    channel = _protocol_channel()
    config = ReplicaConfig(**json.loads(args.config))
    try:
        target = load_target(args.target)
    except TargetError as exc:
        _say(channel, {"error": str(exc)})
        return 2
    state = ReplicaState(ready=True)
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted sockets only then;
    # without it uvicorn's two writes per response meet Nagle + delayed ACK (40 ms).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, 0))
    sock.listen(1024)
    uv_config = uvicorn.Config(
        build_app(target, config, state, headers=_identity(args.version, args.replica_id)),
        log_level="warning",
        access_log=False,
        timeout_keep_alive=config.keep_alive_s,
        timeout_graceful_shutdown=max(1, int(args.drain_timeout_s)),
        lifespan="on",
        # Off-host reachable: HTTPS, and only the cluster's balancers (their certificate).
        **uvicorn_tls_options(replica_tls(args.host), client_cert=True),
    )
    server = _Server(uv_config, state)
    _say(channel, {"port": sock.getsockname()[1], "pid": os.getpid()})
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
