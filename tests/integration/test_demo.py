"""`lepton demo` end to end: a real LocalCluster, two SIGKILLs, the exact answer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from helpers import kill_marked

MARKER = "LEPTON_TEST_DEMO_MARKER"


@pytest.fixture
def run_lepton() -> Iterator[object]:
    """Run `lepton ...` in its own session; afterwards kill (by PID) anything it left behind."""
    marker = uuid.uuid4().hex
    leftovers: list[int] = []

    def run(*args: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, **{MARKER: marker})
        proc = subprocess.Popen(
            [sys.executable, "-m", "lepton_ai.cli", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"lepton {' '.join(args)} timed out\n{err[-3000:]}")
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    try:
        yield run
    finally:
        leftovers += kill_marked(MARKER, marker)
    assert leftovers == [], f"processes left running after the demo: {leftovers}"


@pytest.mark.timeout(300)
def test_demo_small_survives_both_kills_with_exact_result(run_lepton) -> None:  # type: ignore[no-untyped-def]
    # One coordinator: the leader kill of the default (3) is test_ha_demo's.
    res = run_lepton("demo", "--size-mb", "10", "--coordinators", "1", "--json", timeout_s=280)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    assert out["ok"] is True
    checks = out["checks"]
    assert checks["fault_free_matches_serial"] and checks["with_faults_matches_serial"]
    assert checks["faults_injected"] == 2, out["timeline"]
    kinds = [ev["kind"] for ev in out["timeline"]]
    assert kinds.count("fault") == 2 and "completed" in kinds
    for fault in out["faults"]:
        assert fault["detected_s"] is not None, fault
        assert fault["detected_s"] >= fault["injected_s"]
    executor = next(f for f in out["faults"] if f["role"] == "executor")
    assert executor["replaced_s"] is not None and executor["replacement_pid"] != executor["pid"]
    result = out["result"]
    assert result["total_requests"] == out["corpus"]["lines"] > 80_000
    assert len(result["services"]) == 8 and len(result["top_urls"]) == 10
    assert out["timings_s"]["with_faults"] > 0 and out["timings_s"]["fault_free"] > 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "1"], "--workers must be >= 2"),
        (["--size-mb", "0"], "--size-mb must be in"),
        (["--seed", "-3"], "--seed must be >= 0"),
    ],
)
def test_demo_bad_arguments_fail_fast_with_one_line(
    run_lepton, args: list[str], message: str
) -> None:  # type: ignore[no-untyped-def]
    res = run_lepton("demo", *args, timeout_s=50)
    assert res.returncode != 0
    assert message in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_condense_folds_bursts_of_task_events() -> None:
    from lepton_ai.demo import Event, condense

    events = [
        Event(0.1, "fault", "SIGKILL worker 1"),
        *[Event(0.2 + i / 1000, "output_lost", f"stage 0 partition {i}") for i in range(15)],
        Event(0.3, "detected", "worker 1: health 'down'"),
        Event(0.4, "task_rescheduled", "stage 0 partition 3 (run 2) on w0"),
    ]
    out = condense(events)
    assert [e.kind for e in out] == ["fault", "output_lost", "detected", "task_rescheduled"]
    assert out[1].detail.startswith("15 tasks: partitions 0, 1, 2") and "..." in out[1].detail
    assert out[3].detail == events[-1].detail
