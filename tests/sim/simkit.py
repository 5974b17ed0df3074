"""The simulated cluster every Paxos sim test builds: ``from simkit import make``.

Importable from the test files of this directory (pytest puts a test file's directory
on ``sys.path`` when it is not in a package). One place for the name (the test's node
id, so a failure's hint says which test and seed) and for the variations.
"""

from __future__ import annotations

import pytest

from lepton_ai.sim.cluster import DiskConfig, SimCluster
from lepton_ai.sim.network import NetConfig


def make(
    n: int,
    seed: int,
    request: pytest.FixtureRequest,
    *,
    net: NetConfig | None = None,
    drift: float = 0.0,
    paxos: dict[str, object] | None = None,
    disk: DiskConfig | None = None,
    learners: bool = False,
) -> SimCluster:
    """``n`` nodes from ``seed``, named after the running test.

    ``learners``: the test adds learner replicas. They persist accepted entries too,
    and the checker's acceptor-level quorum check assumes every acceptor votes, so it
    is off (the learner-level checks stay).
    """
    c = SimCluster(n, seed, name=request.node.nodeid, net=net, drift=drift, paxos=paxos, disk=disk)
    if learners:
        c.checker.static_membership = False
    return c
