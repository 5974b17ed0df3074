"""Serving under faults: real replica processes on 127.0.0.1, a bounded load, then
SIGKILL (crash), SIGSTOP (a hang) and a gray failure (500s while /healthz is fine).

Each test checks what a client sees (failed requests, worst latency) and what the
deployment does (ejection, restart), and that no process outlives the test.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

import lepton_ai as lep
from helpers import pids_left, wait_until
from lepton_ai.serve.config import BalancerConfig, ServeConfig
from lepton_ai.serve.loadgen import LoadResult, run_load_sync
from lepton_ai.serve.policy import RouterConfig

MODEL = """
import os, time
HERE = os.path.dirname(os.path.abspath(__file__))

def predict(instances):
    if os.path.exists(os.path.join(HERE, f"fail-{os.getpid()}")):
        raise RuntimeError("gray failure injected by the test")
    time.sleep(0.002)  # a little model time, so requests overlap
    return [sum(row) for row in instances]
"""

BODY = b'{"instances": [[1, 2, 3], [4, 5, 6]]}'
REQUEST_TIMEOUT_S = 3.0

# Faster than the defaults so a hang costs 1 s, and long ejections so the
# ejected replica stays out for the rest of the test.
CONFIG = replace(
    ServeConfig(),
    balancer=BalancerConfig(
        router=RouterConfig(ejection_base_s=60.0),
        attempt_timeout_s=1.0,
        request_timeout_s=REQUEST_TIMEOUT_S,
    ),
)


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[tuple[lep.Deployment, Path, list[int]]]:
    (tmp_path / "model.py").write_text(MODEL)
    seen: list[int] = []  # every replica PID the test saw, checked after shutdown
    dep = lep.Deployment(f"{tmp_path}/model.py:predict", replicas=3, config=CONFIG)
    try:
        dep.start()
        yield dep, tmp_path, seen
    finally:
        with contextlib.suppress(Exception):
            seen.extend(dep.pids())
        for pid in seen:  # a stopped process cannot exit; let it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        dep.stop()
    assert not pids_left(seen, 5.0), "replica processes left running"


class _Load:
    """The load generator on its own thread, bounded in requests and time."""

    def __init__(self, url: str, duration_s: float, concurrency: int = 8) -> None:
        self.result: LoadResult | None = None
        self._thread = threading.Thread(
            target=self._run, args=(url, duration_s, concurrency), daemon=True
        )
        self._thread.start()

    def _run(self, url: str, duration_s: float, concurrency: int) -> None:
        self.result = run_load_sync(
            f"{url}/predict",
            BODY,
            concurrency=concurrency,
            requests_max=200_000,
            duration_s_max=duration_s,
            timeout_s=REQUEST_TIMEOUT_S + 2.0,
        )

    def join(self) -> LoadResult:
        self._thread.join(30)
        assert self.result is not None, "load generator did not finish"
        return self.result


def _ready_count(dep: lep.Deployment) -> int:
    return sum(1 for r in dep.status() if r["ready"])


@pytest.mark.timeout(60)
def test_sigkill_one_replica_under_load(deployment: tuple[lep.Deployment, Path, list[int]]) -> None:
    dep, _, seen = deployment
    seen.extend(dep.pids())
    load = _Load(dep.url, duration_s=6.0)
    time.sleep(1.5)
    victim = dep.status()[1]
    os.kill(victim["pid"], signal.SIGKILL)
    killed_at = time.monotonic()
    restored_s = None
    while time.monotonic() - killed_at < 15:
        status = dep.status()
        if _ready_count(dep) == 3 and victim["pid"] not in [r["pid"] for r in status]:
            restored_s = time.monotonic() - killed_at
            break
        time.sleep(0.02)
    result = load.join()
    seen.extend(dep.pids())
    assert result.failed == 0, result.errors
    assert result.ok > 200
    assert restored_s is not None, dep.status()
    assert restored_s < 10.0
    status = dep.status()
    assert [r["ready"] for r in status] == [True, True, True]
    assert status[1]["restarts"] == 1
    print(f"\nSIGKILL: {result.ok} ok, 0 failed, restored in {restored_s:.2f}s")


@pytest.mark.timeout(60)
def test_sigstop_hang_is_ejected(deployment: tuple[lep.Deployment, Path, list[int]]) -> None:
    dep, _, seen = deployment
    seen.extend(dep.pids())
    load = _Load(dep.url, duration_s=6.0)
    time.sleep(1.0)
    victim = dep.status()[0]
    os.kill(victim["pid"], signal.SIGSTOP)
    stopped_at = time.monotonic()

    def out_of_rotation() -> bool:
        row = dep.status()[0]
        return row["ejections"] > 0 or not row["ready"] or row["pid"] != victim["pid"]

    try:
        wait_until(out_of_rotation, 10.0, "the stopped replica out of rotation", interval_s=0.02)
        out_after_s = time.monotonic() - stopped_at
        result = load.join()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim["pid"], signal.SIGCONT)
    seen.extend(dep.pids())
    # ~1-2 s by request outcomes (1 s attempt timeouts), 3 s by probes; margin for busy hosts.
    assert out_after_s <= 4.0, (out_after_s, dep.status())
    assert result.max_latency_s <= REQUEST_TIMEOUT_S + 0.5, result.max_latency_s
    assert result.failed == 0, result.errors
    # Liveness (3 failed probes) had it killed and replaced by a fresh process.
    row = wait_until(
        lambda: (r := dep.status()[0])["pid"] != victim["pid"] and r["ready"] and r,
        10.0,
        "a fresh, ready process in place of the stopped one",
    )
    assert row["restarts"] >= 1, row
    seen.extend(dep.pids())
    print(f"\nSIGSTOP: out of rotation after {out_after_s:.2f}s, worst {result.max_latency_s:.2f}s")


@pytest.mark.timeout(60)
def test_gray_failure_500s_is_ejected(deployment: tuple[lep.Deployment, Path, list[int]]) -> None:
    dep, model_dir, seen = deployment
    seen.extend(dep.pids())
    bad = dep.status()[2]
    (model_dir / f"fail-{bad['pid']}").write_text("")
    first = _Load(dep.url, duration_s=2.0).join()
    row = dep.status()[2]
    assert row["ejections"] >= 1, row
    assert row["pid"] == bad["pid"] and row["ready"], "health checks alone must not catch it"
    # Only the few requests before the ejection saw the 500s.
    assert 0 < first.failed <= 3 + 8, first.statuses
    second = _Load(dep.url, duration_s=2.0).join()
    assert second.failed == 0, second.errors
    assert second.ok > 100


SLOW_MODEL = """
import time
def setup():
    time.sleep(2.0)  # a model that takes seconds to load
def predict(instances):
    return [sum(row) for row in instances]
"""


@pytest.mark.timeout(60)
def test_warm_spare_takes_over_at_once_when_a_slow_replica_dies(tmp_path: Path) -> None:
    (tmp_path / "slow_model.py").write_text(SLOW_MODEL)
    seen: list[int] = []
    with lep.Deployment(f"{tmp_path}/slow_model.py:predict", replicas=2, spares=1) as dep:
        rows = dep.status()
        seen.extend(dep.pids())
        assert [r["role"] for r in rows] == ["serving", "serving", "spare"]
        load = _Load(dep.url, duration_s=4.0)
        time.sleep(1.0)
        victim = rows[0]["pid"]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()

        def taken_over() -> bool:
            serving = [r for r in dep.status() if r["role"] == "serving" and r["ready"]]
            return len(serving) == 2 and victim not in [r["pid"] for r in serving]

        # Within 1.5 s: a restart alone takes > 2 s, so only the spare can be this fast.
        wait_until(taken_over, 1.5, "the spare serving in place of the dead one", interval_s=0.01)
        taken_over_s = time.monotonic() - killed_at
        result = load.join()
        assert result.failed == 0, result.errors
        # The dead slot restarts (2 s of setup) and becomes the new spare.
        wait_until(
            lambda: any(r["role"] == "spare" and r["ready"] for r in dep.status()),
            20.0,
            "the restarted slot ready as the new spare",
        )
        seen.extend(dep.pids())
    assert pids_left(seen, 5.0) == []
    print(f"\nspare took over {taken_over_s:.2f}s after the SIGKILL")
