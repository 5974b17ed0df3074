"""Smoke test of ``benchmarks/sim_scale_bench.py``: its quick mode and its worlds at a
small size, checked for correctness (every job finished, every result accepted exactly
once, one log on every replica), never for speed."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "sim_scale_bench.py"


def _load() -> ModuleType:
    name = "sim_scale_bench"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


bench = _load()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", [1, 2])
def test_single_job_with_node_failures_is_correct(seed: int) -> None:
    spec = bench.single_job("smoke", nodes=8, tasks=600, seed=seed)
    result = bench.run_sched(spec)  # raises unless every result was accepted exactly once
    assert result["tasks"] == 600 and result["dispatches"] >= 600
    assert result["steps"] > 2 * 600  # a report and an Applied per task at least
    assert result["speculative"] > 0  # the straggler fraction made backups run
    assert result["cancelled"] > 0  # losing backups (or originals) were cancelled


@pytest.mark.timeout(60)
def test_job_mix_is_correct() -> None:
    spec = bench.job_mix("smoke mix", nodes=6, tasks=800, seed=3)
    assert len(spec.jobs) > 1 and spec.tasks == 800
    result = bench.run_sched(spec)
    assert result["jobs"] == len(spec.jobs)


def test_a_lost_result_fails_the_check() -> None:
    """The check is not vacuous: a run whose result vanished from the state fails it."""
    world = bench.SchedWorld(bench.single_job("broken", nodes=4, tasks=100, seed=1))
    world.run()
    world.check()
    world.accepted[("j0", 1, 0)] = 0
    with pytest.raises(AssertionError, match="exactly once"):
        world.check()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["batched", "slot_per_command", "one_at_a_time"])
@pytest.mark.parametrize("crashed", [0, 1])
def test_paxos_modes_agree(mode: str, crashed: int) -> None:
    spec = bench.PaxosSpec(3, mode, crashed, commands=200 if mode != "one_at_a_time" else 30)
    result = bench.run_paxos(spec, bench.wrapper_cost(1_000))  # checks agreement itself
    assert result["commands"] == spec.commands
    if mode == "batched":
        assert result["commands_per_slot"] > 1
    else:
        assert result["commands_per_slot"] == pytest.approx(1.0, abs=0.05)


@pytest.mark.timeout(120)
def test_quick_mode_writes_its_tables(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sim_scale.json"
    assert bench.main(["--quick", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["quick"] is True
    assert [r["nodes"] for r in data["scheduler"]["by_nodes"]] == list(bench.QUICK.node_sweep)
    assert [r["tasks"] for r in data["scheduler"]["by_tasks"]] == list(bench.QUICK.task_sweep)
    assert data["scheduler_profile"]  # cProfile saw the core's functions
    assert len(data["paxos"]) == 3 * 3 * 2  # replica counts x modes x (none, one) crashed
    printed = capsys.readouterr().out
    assert "## Scheduler core, by nodes" in printed and "## Paxos core" in printed
