"""Starting a replica process (``python -m lepton_ai.serve.replica_main``) and reading its hello.

Shared by the local supervisor (``serve/runtime.py``) and a worker node's serving
shell (``serve/node_serve.py``), so both speak the one protocol ``serve/replica_main.py``
documents: one JSON line on stdout, ``{"port": N, "pid": P}`` or ``{"error": "..."}``.
The caller owns the process from the moment it is spawned (it stops and reaps it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import sys
from typing import Any

from lepton_ai.errors import LeptonError
from lepton_ai.serve.config import ReplicaConfig

LOOPBACK = "127.0.0.1"


class StartupError(LeptonError):
    """A replica could not start (its reason is in the message)."""


async def spawn_replica(
    target: str,
    config: ReplicaConfig,
    *,
    drain_timeout_s: float,
    host: str = LOOPBACK,
    version: int | None = None,
    replica_id: str | None = None,
) -> asyncio.subprocess.Process:
    """Start one replica child; its stdin stays a pipe to us (EOF: we are gone)."""
    args = [
        "--target",
        target,
        "--config",
        json.dumps(dataclasses.asdict(config)),
        "--parent-pid",
        str(os.getpid()),
        "--drain-timeout-s",
        str(drain_timeout_s),
        "--host",
        host,
    ]
    # Identity headers only when asked: a local ``lepton serve`` answers as before.
    if version is not None:
        args += ["--version", str(version)]
    if replica_id is not None:
        args += ["--replica-id", replica_id]
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "lepton_ai.serve.replica_main",
        *args,
        stdin=asyncio.subprocess.PIPE,  # kept open: EOF tells the child we are gone
        stdout=asyncio.subprocess.PIPE,
        start_new_session=True,  # Ctrl-C reaches us only; we drain, then stop them
    )


async def read_port(proc: asyncio.subprocess.Process, timeout_s: float) -> int:
    """The port from the child's hello; StartupError (the child reaped) if none comes."""
    if proc.stdout is None:
        raise AssertionError("child stdout is not a pipe")
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await reap(proc)
        raise StartupError(f"no port reported within {timeout_s}s") from None
    doc = parse_hello(line)
    if "port" not in doc:
        code = await reap(proc)
        reason = doc.get("error") or f"exited with code {code} before reporting its port"
        raise StartupError(str(reason))
    return int(doc["port"])


def parse_hello(line: bytes) -> dict[str, Any]:
    """The child's one JSON line; anything else means it died before saying hello."""
    try:
        doc = json.loads(line)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


async def reap(proc: asyncio.subprocess.Process) -> int:
    """Wait for an exiting child and close our end of its stdin pipe (no fd leak)."""
    code = await proc.wait()
    if proc.stdin is not None:
        proc.stdin.close()
    return code
