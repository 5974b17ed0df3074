"""Seeded random fault schedules against the real Paxos core (see ``lepton_ai.sim.fuzz``).

CI runs a fixed range of seeds; ``LEPTON_SIM_SEEDS=5000`` (or ``=1000-5999``) runs more,
``LEPTON_SIM_SEED=<n>`` replays one. A failure message carries the replay command.
"""

from __future__ import annotations

import pytest

from lepton_ai.sim.fuzz import run_seed, seeds_from_env

CI_SEEDS = range(800)
AGGREGATE_SEEDS_MIN = 50
"""Totals over fewer seeds (a one-seed replay) prove nothing either way: not checked."""


@pytest.mark.timeout(600)
def test_paxos_fuzz_seeds(request: pytest.FixtureRequest) -> None:
    seeds = seeds_from_env(CI_SEEDS)
    name = request.node.nodeid
    total_committed = total_crashes = early = lost = 0
    for seed in seeds:
        report = run_seed(seed, name=name)
        total_committed += report.committed
        total_crashes += report.crashes
        early += report.early_delivered_in_sync
        lost += report.early_entries_lost
    if len(seeds) < AGGREGATE_SEEDS_MIN:
        return
    # The schedules really exercise the core: commands flow and replicas crash, and
    # leaders' early messages overtake their own fdatasync, which some leaders die in.
    assert total_committed > 100 * len(seeds)
    assert total_crashes > 5 * len(seeds)
    assert early > 10 * len(seeds)
    assert lost > 0


@pytest.mark.timeout(600)
def test_paxos_fuzz_membership_seeds(request: pytest.FixtureRequest) -> None:
    """Every seed here also adds and removes replicas while faults run."""
    seeds = seeds_from_env(range(100))
    changes = 0
    for seed in seeds:
        changes += run_seed(seed, name=request.node.nodeid, membership=True).membership_changes
    if len(seeds) >= AGGREGATE_SEEDS_MIN:
        assert changes > len(seeds)
