"""The coordinator addresses a worker agent remembers stay bounded."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from lepton_ai.node.agent_leader import LeaderFollower, LeaderWatchConfig
from lepton_ai.node.worker import WorkerConfig


def test_learned_coordinators_are_bounded_and_keep_the_joined_one() -> None:
    closed: list[tuple[str, int]] = []
    given = [("h", 1), ("h", 2)]
    probes = {
        a: SimpleNamespace(writer=SimpleNamespace(close=lambda a=a: closed.append(a)))
        for a in given
    }
    agent: Any = SimpleNamespace(
        coordinators=list(given),
        join=("h", 2),
        _probes=probes,
        config=WorkerConfig(leader_watch=LeaderWatchConfig(known_max=3)),
    )
    for port in range(3, 8):
        LeaderFollower._learn_coordinator(agent, ("h", port))
        LeaderFollower._learn_coordinator(agent, ("h", port))  # known already: no change
    assert len(agent.coordinators) == 3
    assert ("h", 2) in agent.coordinators and ("h", 7) in agent.coordinators
    assert closed == [("h", 1)]  # a forgotten address's probe connection is closed
    with pytest.raises(ValueError):
        LeaderWatchConfig(known_max=1)
