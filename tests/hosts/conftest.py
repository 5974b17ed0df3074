"""The bed fixture: one 5-host bed (3 coordinators, 2 workers) per test module.

Skipped, with the reason, when this process is not root or ``ip netns`` does not work.
After every test the bed is healed (links restored, paused hosts resumed, killed hosts
started again) so a failing test does not leave the next one a broken cluster.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from .bedcluster import BedCluster, converged
from .netbed import NetBed, available
from .workload import Run

HOSTS = 5


@pytest.fixture(scope="module")
def bed_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BedCluster]:
    why = available()
    if why:
        pytest.skip(why)
    with NetBed(HOSTS) as bed:
        cluster = BedCluster(bed, tmp_path_factory.mktemp("bed"))
        try:
            cluster.wait_ready()
            yield cluster
        finally:
            cluster.close()


@pytest.fixture
def cluster(bed_cluster: BedCluster) -> Iterator[BedCluster]:
    """The module's bed cluster, restored to health after the test."""
    yield bed_cluster
    restore(bed_cluster)


def restore(cluster: BedCluster) -> None:
    """Heal every link, resume every host, start any host whose program died."""
    bed = cluster.bed
    bed.heal()
    for i in range(len(bed.hosts)):
        bed.resume_host(i)
        if not any(p.poll() is None for p in bed.hosts[i].procs):
            cluster.start_host(i)
    with contextlib.suppress(TimeoutError):
        converged(cluster)
        cluster.wait_ready()


@pytest.fixture
def run(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Run]:
    """The test's record (KV history, faults, notes), written to ``tmp_path`` as JSON
    whatever the outcome; its path is printed (pytest shows it when the test fails)."""
    record = Run(request.node.name)
    try:
        yield record
    finally:
        path = record.dump(tmp_path)
        print(f"\nrecord of {record.name} (history + fault schedule): {path}")
