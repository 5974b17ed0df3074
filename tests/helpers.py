"""Helpers shared by several test files: ``from helpers import lepton``.

Importable because ``tests/conftest.py`` exists: pytest (default ``prepend`` import
mode) puts the directory of a rootdir-level conftest that is not in a package,
``tests/``, on ``sys.path``, under ``pytest -q tests`` from the repo root as well as
for a single file or from any working directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import operator
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import psutil

from lepton_ai.compute.api import DistributedTask
from lepton_ai.compute.plan import JobOptions
from lepton_ai.compute.state import OutputRef, TaskFinished
from lepton_ai.consensus.driver import ReplicaDriver

CLI_TIMEOUT_S = 60.0


def lepton(
    *args: str, env: dict[str, str] | None = None, timeout_s: float = CLI_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    """Run the ``lepton`` command (``python -m lepton_ai.cli``) with this interpreter and
    capture its text output; ``env=None`` inherits this process's environment. A nonzero
    exit is returned, not raised: tests assert on ``returncode`` and ``stderr``."""
    return subprocess.run(
        [sys.executable, "-m", "lepton_ai.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


class NoRunner:
    """A ``JobRunner`` for building plans only: submitting one is a test bug."""

    def submit_plan(self, plan: bytes, options: JobOptions) -> str:
        raise AssertionError("this runner only builds plans")


PLAN = (
    DistributedTask(NoRunner())
    .parallelize(range(10), 2)
    .map(lambda x: (x % 2, x))
    .reduce_by_key(operator.add, 2)
    .plan_bytes()
)
"""A two-stage job (2 map partitions -> 2 reduce partitions) for the job state machines."""


def map_done(job: str, p: int, attempt: int, worker: str = "w1") -> TaskFinished:
    """Map task ``p`` of ``PLAN`` (stage 0) finished by ``worker``: one block per reducer."""
    refs = [OutputRef(worker, f"b{p}.{attempt}.{b}", 10) for b in range(2)]
    return TaskFinished(job, 0, p, 1, attempt, worker, refs, 0.1)


@contextlib.asynccontextmanager
async def running(driver: ReplicaDriver) -> AsyncIterator[ReplicaDriver]:
    """Run ``driver`` (its loop, ticker and links) for the body; then stop and close it,
    also when the body fails."""
    runner = asyncio.create_task(driver.run())
    try:
        yield driver
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        await driver.close()


def kill_marked(var: str, marker: str) -> list[int]:
    """SIGKILL every process whose environment has ``var=marker`` (a test starts its
    processes with a fresh marker, so this finds exactly what they left behind, by PID);
    returns their pids."""
    found: list[int] = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.environ().get(var) == marker:
                found.append(p.pid)
                p.kill()
        except psutil.Error:
            continue
    return found


def strength_gap(cluster: Any, coordinators: int = 3, workers: int = 2) -> str:
    """What a LocalCluster lacks of full strength ("" at full strength): one leader
    and its followers, every agent alive with an idle executor."""
    members = cluster.status()["members"]
    coords = sorted(m["health"] for m in members if m["role"] == "coordinator")
    want = ["follower"] * (coordinators - 1) + ["leader"]
    ready = {m["node"] for m in members if m["role"] == "executor" and m["health"] == "idle"}
    agents = [m for m in members if m["role"] == "worker" and m["health"] == "alive"]
    if coords == want and len(agents) == workers and len(ready) == workers:
        return ""
    return repr([(m["role"], m["id"], m["health"]) for m in members])


def wait_full_strength(cluster: Any, timeout_s: float) -> None:
    import time

    from lepton_ai.errors import Unavailable

    gap = "?"
    deadline = time.monotonic() + timeout_s
    while gap and time.monotonic() < deadline:
        try:
            gap = strength_gap(cluster)
        except Unavailable as exc:  # between leaders
            gap = str(exc)
        time.sleep(0.05)
    assert not gap, f"not back to full strength within {timeout_s} s: {gap}"
