"""The explicit task states agree with the data they summarise, under every fault.

Runs the seeded scheduler simulation (``test_scheduler.World``: executor and
node deaths, lost blocks, pauses, failovers) with a scheduler that checks, after
every step, each task's state against its outcome and live attempts and each
stage's counters against the states (the module docstring of
``compute/scheduler/task_state.py`` has the table).
"""

from __future__ import annotations

import pytest
import test_scheduler  # the simulation next door (tests/sim is on sys.path)

from lepton_ai.compute.plan import JobOptions
from lepton_ai.compute.scheduler import Scheduler, SchedulerAction, SchedulerEvent, TaskState
from lepton_ai.sim.fuzz import seeds_from_env

S = TaskState


class _CheckedScheduler(Scheduler):
    steps = 0

    def step(self, event: SchedulerEvent) -> list[SchedulerAction]:
        out = super().step(event)
        _CheckedScheduler.steps += 1
        for job in self._jobs.values():
            for s, stage in enumerate(job.tasks):
                for task in stage:
                    has_outcome = task.outcome is not None
                    where = f"{job.job_id}/{s}/{task.partition} {task.state.name} {task.recent()}"
                    assert has_outcome == (task.state in (S.DONE, S.LOST)), where
                    assert bool(task.runs) == (task.state is S.RUNNING) or (
                        task.state is S.COMMITTING
                    ), where
                assert job.done_count[s] == sum(t.state is S.DONE for t in stage)
                assert job.proposed_count[s] == sum(t.state is S.COMMITTING for t in stage)
        return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", seeds_from_env(range(64))[:12])
def test_states_match_outcomes_runs_and_counters_under_faults(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(test_scheduler, "Scheduler", _CheckedScheduler)
    world = test_scheduler.World(seed, test_scheduler._plans(), JobOptions(max_retries=8))
    world.run(faults=True)
    assert world.done(), test_scheduler._explain(world)
    assert _CheckedScheduler.steps > 0
