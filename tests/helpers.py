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
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, TypeVar

import psutil

from lepton_ai.compute.api import DistributedTask
from lepton_ai.compute.job_state import OutputRef, TaskFinished
from lepton_ai.compute.plan import JobOptions
from lepton_ai.consensus.driver import ReplicaDriver
from lepton_ai.node.process import pid_alive

CLI_TIMEOUT_S = 60.0
POLL_S = 0.05

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    timeout_s: float,
    what: str,
    *,
    interval_s: float = POLL_S,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Poll ``predicate`` until it returns something truthy and return that.

    ``AssertionError`` naming ``what``, the timeout and the last value (or exception)
    if it does not within ``timeout_s``. Exceptions of the types in ``ignore`` count as
    "not yet" (e.g. ``Unavailable`` between two leaders). The predicate runs at least
    once, also after the deadline passed during a slow call, so a wait never fails
    without a last look.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            last: Any = predicate()
        except ignore as exc:
            last = exc
        else:
            if last:
                return last  # type: ignore[no-any-return]
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout_s} s: {what} (last: {last!r})")
        time.sleep(interval_s)


async def wait_until_async(
    predicate: Callable[[], T],
    timeout_s: float,
    what: str,
    *,
    interval_s: float = 0.01,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """``wait_until`` inside an event loop: the predicate is checked between
    ``asyncio.sleep``s, so the code under test runs while the test waits."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            last: Any = predicate()
        except ignore as exc:
            last = exc
        else:
            if last:
                return last  # type: ignore[no-any-return]
        if loop.time() >= deadline:
            raise AssertionError(f"not within {timeout_s} s: {what} (last: {last!r})")
        await asyncio.sleep(interval_s)


def pids_left(pids: Iterable[int], timeout_s: float) -> list[int]:
    """Wait up to ``timeout_s`` for every one of ``pids`` to exit (zombies count as
    exited); returns those still alive then, for the caller to kill and report."""
    pids = list(pids)
    with contextlib.suppress(AssertionError):
        wait_until(lambda: not any(pid_alive(p) for p in pids), timeout_s, "processes exited")
    return [p for p in pids if pid_alive(p)]


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
    from lepton_ai.errors import Unavailable

    # A gap is a non-empty string: wait for the predicate "no gap", keeping the last
    # gap for the message. Unavailable: between leaders.
    gap = ["?"]

    def full() -> bool:
        gap[0] = strength_gap(cluster)
        return not gap[0]

    try:
        wait_until(full, timeout_s, "back to full strength", ignore=(Unavailable,))
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last gap: {gap[0]}") from None


def assert_mid_job(cluster: Any, job_id: str) -> tuple[int, int]:
    """Fail unless job ``job_id`` is still running with tasks left; (done, total).

    Called right before a chaos test injects its fault: a job that got fast enough to
    finish first would leave the test checking a fault that hit nothing, and passing.
    """
    info = cluster.job_info(job_id, 0.0)
    done, total = int(info.done), int(info.total)
    assert info.status == "running" and done < total, (
        f"job {job_id} is {info.status} with {done}/{total} tasks done before the fault:"
        " the fault would not land mid-job (make the job slower)"
    )
    return done, total
