"""Five namespace hosts (3 coordinators, 2 workers): KV histories and jobs through partitions.

Every test runs the same workload, three KV clients (put/get/cas, recorded) and a
two-stage word count whose answer is known, through one kind of fault, then heals
and checks: the history is linearizable (with a final read of every key), the job
finished exactly once with exactly the serial answer, and the coordinators converged
(same leader and ballot, each applied past everything of the fault). Where a side of
a partition must not serve, the test cuts the client off from the other side and
checks that what it asks there gets no answer (only unknown outcomes).
Each run's history and fault schedule is written as JSON (path printed on failure).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

import pytest

from helpers import wait_until
from lepton_ai.consensus.client import KvClientConfig
from lepton_ai.consensus.client_sync import KV
from lepton_ai.errors import Unavailable
from lepton_ai.node.client import CoordinatorClient
from lepton_ai.node.messages import ListJobs

from .bedcluster import BedCluster, converged
from .netbed import CLIENT_HOST
from .workload import (
    KvLoad,
    Run,
    check_linearizable,
    check_wordcount,
    corpus,
    final_reads,
    one_op,
    submit_wordcount,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

TEXT = corpus(600, seed=13)
PARTITIONS = 6  # map partitions, each PAUSE_S long: ~2 s on the 2 executors
PAUSE_S = 0.6
WARMUP_S = 0.8  # KV traffic before the job and the fault
POST_HEAL_S = 1.0
HOLD_S = 4.0  # how long a fault lasts: several election timeouts (0.2-0.4 s)
JOB_TIMEOUT_S = 60.0
LEADER_TIMEOUT_S = 10.0  # a majority side elects within this
MIN_ACKED = 20  # acknowledged writes a run must have, else it tested nothing
PROBE_OPS = 3  # operations sent to a side that must not serve
PROBE_DEADLINE_S = 1.0
PROBE_CLIENT = 50  # the probe's client id in the history

Faults = Callable[[BedCluster, Run], None]


def _scenario(cluster: BedCluster, run: Run, faults: Faults) -> None:
    """KV load + a job through ``faults`` (which heals at its end), then every check."""
    with cluster.connect() as lc:
        with KvLoad(run, cluster.paxos_addresses, cluster.token):
            time.sleep(WARMUP_S)
            started = time.monotonic()
            job = submit_wordcount(lc, TEXT, PARTITIONS, PAUSE_S, run.name)
            run.notes["job"] = job.id
            faults(cluster, run)
            healed = run.now()
            result = job.result(timeout=JOB_TIMEOUT_S)
            run.notes["job_s"] = round(time.monotonic() - started, 3)
            time.sleep(POST_HEAL_S)  # KV traffic after healing: a rejoining node's effect
        run.notes["post_heal_write_gap_s"] = _longest_write_gap(run, healed)
        check_wordcount(result, TEXT)
        final_reads(run, cluster.paxos_addresses, cluster.token)
        check_linearizable(run, MIN_ACKED)
        run.notes["converged"] = converged(cluster)
        _check_jobs_once(lc, job.id)


def _longest_write_gap(run: Run, after: float) -> float:
    """The longest time without an acknowledged write after ``after`` (a rejoining node
    that deposes the leader shows here)."""
    acks = sorted(op.ret or 0.0 for op in run.acked_writes() if (op.ret or 0.0) >= after)
    points = [after, *acks]
    return round(max(b - a for a, b in itertools.pairwise(points)) if acks else -1.0, 3)


def _check_jobs_once(lc: object, job_id: str) -> None:
    jobs = lc.jobs()  # type: ignore[attr-defined]
    ids = [j["job_id"] for j in jobs]
    assert ids.count(job_id) == 1, f"job {job_id} listed {ids.count(job_id)} times"
    assert len(ids) == len(set(ids)), f"a job listed twice: {ids}"
    assert all(j["status"] == "finished" for j in jobs), jobs


def _others(cluster: BedCluster, host: int) -> list[int]:
    return [h for h in range(len(cluster.bed.hosts)) if h != host]


def _note_failover(cluster: BedCluster, run: Run, old: int, t_fault: float) -> int:
    """Wait for a new leader among the other coordinators; note how long it took and
    when the first write invoked after the fault was acknowledged."""
    majority = [c for c in cluster.coordinator_hosts if c != old]
    new = cluster.wait_leader(majority, LEADER_TIMEOUT_S)
    run.notes["new_leader_s"] = round(run.now() - t_fault, 3)
    acked = wait_until(
        lambda: run.acked_writes(after=t_fault),
        LEADER_TIMEOUT_S,
        "a write committed after the fault while a majority was connected",
        interval_s=0.02,
    )
    run.notes["next_write_s"] = round(min(op.ret or 0.0 for op in acked) - t_fault, 3)
    return new


def _probe_no_service(cluster: BedCluster, run: Run, host: int) -> None:
    """The client reaches only coordinator ``host`` (cut off from the other side): KV
    calls and job queries through it must get no answer, only unknown outcomes."""
    side = [h for h in cluster.coordinator_hosts + cluster.worker_hosts if h != host]
    run.fault("client_cut_off", reachable=host, cut=side)
    cluster.bed.isolate_client(*side)
    config = KvClientConfig(deadline_s=PROBE_DEADLINE_S, attempt_timeout_s=0.5)
    with KV([cluster.paxos_addresses[host]], token=cluster.token, config=config) as kv:
        kinds = ("get", "put", "cas")[:PROBE_OPS]
        ops = [one_op(run, kv, PROBE_CLIENT, kind, run.keys[0], expected=None) for kind in kinds]
    served = [op for op in ops if op.ret is not None]
    assert not served, f"coordinator on host {host} served without a quorum: {served}"
    client = CoordinatorClient(cluster.client_addresses[host], cluster.token)
    try:
        with pytest.raises(Unavailable):
            client.request(ListJobs(), PROBE_DEADLINE_S)
    finally:
        client.close()
    for h in side:
        cluster.bed.unblock(CLIENT_HOST, h)
    run.fault("client_reconnected")


# -- the faults ------------------------------------------------------------------------


def _leader_isolated(cluster: BedCluster, run: Run) -> None:
    old = cluster.wait_leader(cluster.coordinator_hosts, LEADER_TIMEOUT_S)
    cluster.bed.partition([old], _others(cluster, old))
    t = run.fault("isolate_leader", host=old)  # recorded once in effect: times count from it
    _note_failover(cluster, run, old, t)
    _wait_stepped_down(cluster, run, old, t)
    _probe_no_service(cluster, run, old)
    time.sleep(max(0.0, HOLD_S - (run.now() - t)))
    cluster.bed.heal()
    run.fault("heal")


def _wait_stepped_down(cluster: BedCluster, run: Run, old: int, t_fault: float) -> None:
    """The isolated leader (which the client still reaches) must stop calling itself
    leader once it hears no quorum (check-quorum)."""

    def stepped_down() -> bool:
        status = cluster.paxos_status(old)
        return status is not None and status.role != "leader"

    wait_until(stepped_down, LEADER_TIMEOUT_S, f"the isolated leader on host {old} stepped down")
    run.notes["old_leader_stepped_down_s"] = round(run.now() - t_fault, 3)


def _majority_minority(cluster: BedCluster, run: Run) -> None:
    """The leader and one worker on the minority side; the job must go on without them."""
    old = cluster.wait_leader(cluster.coordinator_hosts, LEADER_TIMEOUT_S)
    minority = [old, cluster.worker_hosts[0]]
    majority = [h for h in _others(cluster, old) if h not in minority]
    cluster.bed.partition(minority, majority)
    t = run.fault("partition", minority=minority, majority=majority)
    _note_failover(cluster, run, old, t)
    _probe_no_service(cluster, run, old)
    time.sleep(max(0.0, HOLD_S - (run.now() - t)))
    cluster.bed.heal()
    run.fault("heal")


def _leader_cannot_send(cluster: BedCluster, run: Run) -> None:
    """One way: nothing the leader sends arrives (it still hears everyone)."""
    old = cluster.wait_leader(cluster.coordinator_hosts, LEADER_TIMEOUT_S)
    for h in _others(cluster, old):
        cluster.bed.block(old, h)
    t = run.fault("drop_from", host=old)
    _note_failover(cluster, run, old, t)
    time.sleep(max(0.0, HOLD_S - (run.now() - t)))
    cluster.bed.heal()
    run.fault("heal")


def _leader_cannot_hear(cluster: BedCluster, run: Run) -> None:
    """One way: nothing sent to the leader arrives (its heartbeats still go out)."""
    old = cluster.wait_leader(cluster.coordinator_hosts, LEADER_TIMEOUT_S)
    for h in _others(cluster, old):
        cluster.bed.block(h, old)
    t = run.fault("drop_to", host=old)
    _note_failover(cluster, run, old, t)
    time.sleep(max(0.0, HOLD_S - (run.now() - t)))
    cluster.bed.heal()
    run.fault("heal")


def _leader_host_killed(cluster: BedCluster, run: Run) -> None:
    """The leader's host and then a worker's host die (SIGKILL, all processes) and return."""
    old = cluster.wait_leader(cluster.coordinator_hosts, LEADER_TIMEOUT_S)
    pids = cluster.kill_host(old)
    t = run.fault("kill_host", host=old, pids=pids)
    _note_failover(cluster, run, old, t)
    worker = cluster.worker_hosts[-1]
    run.fault("kill_host", host=worker, pids=cluster.kill_host(worker))
    time.sleep(max(0.0, HOLD_S - (run.now() - t)))
    run.fault("start_host", host=old, pid=cluster.start_host(old))
    run.fault("start_host", host=worker, pid=cluster.start_host(worker))


def _leader_host_paused(cluster: BedCluster, run: Run) -> None:
    """The leader's host hangs (SIGSTOP, all processes), then wakes up deposed."""
    old = cluster.wait_leader(cluster.coordinator_hosts, LEADER_TIMEOUT_S)
    pids = cluster.bed.pause_host(old)
    t = run.fault("pause_host", host=old, pids=pids)
    _note_failover(cluster, run, old, t)
    time.sleep(max(0.0, HOLD_S - (run.now() - t)))
    run.fault("resume_host", host=old, pids=cluster.bed.resume_host(old))


# -- the tests -------------------------------------------------------------------------


def test_no_fault_baseline(cluster: BedCluster, run: Run) -> None:
    _scenario(cluster, run, lambda c, r: None)


def test_leader_isolated_from_every_host(cluster: BedCluster, run: Run) -> None:
    _scenario(cluster, run, _leader_isolated)


def test_majority_minority_partition(cluster: BedCluster, run: Run) -> None:
    _scenario(cluster, run, _majority_minority)


def test_asymmetric_leader_cannot_send(cluster: BedCluster, run: Run) -> None:
    _scenario(cluster, run, _leader_cannot_send)


def test_asymmetric_leader_cannot_hear(cluster: BedCluster, run: Run) -> None:
    _scenario(cluster, run, _leader_cannot_hear)


def test_leader_and_worker_hosts_killed_and_restarted(cluster: BedCluster, run: Run) -> None:
    _scenario(cluster, run, _leader_host_killed)


def test_leader_host_paused(cluster: BedCluster, run: Run) -> None:
    _scenario(cluster, run, _leader_host_paused)


def test_probe_catches_a_coordinator_that_serves(cluster: BedCluster, run: Run) -> None:
    """The "must not serve" check is not vacuous: aimed at a leader with its quorum, it fails."""
    leader = cluster.wait_leader(cluster.coordinator_hosts, LEADER_TIMEOUT_S)
    with pytest.raises(AssertionError, match="served without a quorum"):
        _probe_no_service(cluster, run, leader)
