"""Self-healing with real processes: members that die come back by themselves.

The default cluster (3 coordinators) runs a supervisor (``heal.restarts`` in a
thread): a SIGKILLed worker agent or coordinator is started again at once, from
its data directory, and rejoins. A hung voter (SIGSTOP) is replaced by a standby
after ``replace_after_s``, so the group survives a further failure.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

import lepton_ai as lep
from helpers import pids_left, strength_gap, wait_full_strength, wait_until
from lepton_ai.node.local_cluster import LocalCluster
from lepton_ai.node.process import pid_alive

# The tasks' functions travel by value: the executors cannot import this module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

ITEMS = 4_000
MAPS = 8
REDUCERS = 4


def slow_pairs(part: Any) -> list[tuple[int, int]]:
    time.sleep(0.2)  # long enough that the kills land mid-job
    return [(x % 97, x) for x in part]


def expected() -> dict[int, int]:
    out: dict[int, int] = {}
    for x in range(ITEMS):
        out[x % 97] = out.get(x % 97, 0) + x
    return out


def shuffle_job(cluster: LocalCluster) -> lep.Job:
    ds = lep.DistributedTask(cluster).parallelize(range(ITEMS), partitions=MAPS)
    return ds.map_partitions(slow_pairs).reduce_by_key(_add, partitions=REDUCERS).submit()


def _add(a: int, b: int) -> int:
    return a + b


def where(_: int) -> str:
    """The worker agent that ran this task (name-pid-suffix)."""
    time.sleep(0.05)
    return os.environ["LEPTON_EXEC_WORKER"]


def until(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    # Status calls fail with Unavailable between leaders: not yet, not a failure.
    return wait_until(check, timeout_s, what, interval_s=0.02, ignore=(lep.Unavailable,))


def member(cluster: LocalCluster, role: str, id: str) -> dict[str, Any]:
    return next(m for m in cluster.status()["members"] if m["role"] == role and m["id"] == id)


@pytest.fixture
def cleanup() -> Iterator[list[LocalCluster]]:
    """Closes the clusters a test made and checks no process of theirs lives on."""
    made: list[LocalCluster] = []
    yield made
    seen: set[int] = set()
    for c in made:
        for pid in c.pids():
            if pid_alive(pid):
                os.kill(pid, signal.SIGCONT)  # a paused one must not outlive the test
        seen |= set(c.pids())
        c.close()
    assert not pids_left(seen, 5.0), "processes left running"


@pytest.mark.timeout(60)
def test_a_killed_worker_agent_is_back_and_running_tasks_within_3s(
    cleanup: list[LocalCluster],
) -> None:
    c = LocalCluster(workers=2)
    cleanup.append(c)
    old = c.procs[("worker", "0")].pid
    node = member(c, "worker", "0")["node"]
    c.kill("worker", "0")
    killed_at = time.monotonic()

    def back() -> bool:
        m = member(c, "worker", "0")
        idle = [
            e
            for e in c.status()["members"]
            if e["role"] == "executor" and e["node"] == node and e["health"] == "idle"
        ]
        return m["pid"] not in (0, old) and m["health"] == "alive" and bool(idle)

    until(back, 3.0, "worker 0 back with a ready executor")
    new = c.procs[("worker", "0")].pid
    ran = lep.DistributedTask(c).parallelize(range(16), partitions=16).map(where)
    agents = set(ran.collect(timeout=30))
    assert any(a.startswith(f"0-{new}-") for a in agents), agents
    assert time.monotonic() - killed_at < 30
    m = member(c, "worker", "0")
    assert m["restarts"] == 1 and m["last_exit"] == "killed by SIGKILL", m
    assert m["node"] == node  # the same node: its store (and objects) came back with it
    kinds = [e["kind"] for e in c.events()]
    assert "member_restarted" in kinds


@pytest.mark.timeout(120)
def test_the_leader_killed_twice_5s_apart_both_come_back_and_no_job_is_lost(
    cleanup: list[LocalCluster],
) -> None:
    c = LocalCluster(workers=2)
    cleanup.append(c)
    first = shuffle_job(c)
    time.sleep(0.3)
    killed = [c.leader_id()]
    c.kill("leader")
    second = shuffle_job(c)  # submitted between the two kills
    time.sleep(5.0)
    killed.append(c.leader_id())
    assert killed[1] != killed[0]
    c.kill("leader")
    third = shuffle_job(c)
    for job in (first, second, third):
        assert dict(job.result(timeout=60)) == expected(), job.id
    wait_full_strength(c, 20.0)
    coords = {m["id"]: m for m in c.status()["members"] if m["role"] == "coordinator"}
    for id in killed:
        assert coords[id]["restarts"] >= 1, coords[id]
        assert coords[id]["last_exit"] == "killed by SIGKILL", coords[id]
    # Every job the cluster accepted is still known, finished, with its result.
    assert [j.status() for j in (first, second, third)] == ["finished"] * 3


@pytest.mark.timeout(120)
def test_a_hung_voter_is_replaced_by_a_standby_and_the_group_survives_another(
    cleanup: list[LocalCluster],
) -> None:
    c = LocalCluster(workers=2, standbys=1, replace_after_s=2.0)
    cleanup.append(c)
    leader = c.leader_id()
    hung, other = (i for i in ("0", "1", "2") if i != leader)
    c.pause("coordinator", hung)

    def replaced() -> bool:
        kinds = [(e["kind"], e["detail"]) for e in c.events()]
        return any(k == "standby_promoted" and d.startswith("standby 100 ") for k, d in kinds)

    until(replaced, 30.0, "standby 100 promoted in place of the hung voter")
    removed = [e["detail"] for e in c.events() if e["kind"] == "coordinator_removed"]
    assert removed and removed[0].startswith(f"coordinator {hung} removed"), removed
    # A second voter hangs: the leader and the promoted standby are still 2 of 3.
    c.pause("coordinator", other)
    job = shuffle_job(c)
    assert dict(job.result(timeout=60)) == expected()
    c.kv.put("after-two-hung", 1)
    assert c.kv.get("after-two-hung") == 1
    # The first one resumes, learns it was removed and exits (3): not restarted,
    # and a fresh standby takes the place of the promoted one.
    c.resume("coordinator", hung)
    gone = until(
        lambda: member(c, "coordinator", hung)["health"] == "gone", 20.0, "the removed one gone"
    )
    assert gone
    m = member(c, "coordinator", hung)
    assert m["restarts"] == 0 and "removed from the coordinator group" in m["last_exit"], m
    assert not c.procs[("coordinator", hung)].alive()
    until(lambda: ("coordinator", "101") in c.procs, 10.0, "a fresh standby 101")
    c.resume("coordinator", other)
    job = shuffle_job(c)
    assert dict(job.result(timeout=60)) == expected()


@pytest.mark.timeout(90)
def test_a_crash_looping_agent_is_reported_and_left_down_until_restarted(
    cleanup: list[LocalCluster],
) -> None:
    c = LocalCluster(workers=2)
    cleanup.append(c)
    # Worker 1 cannot start: its store directory is now a file.
    store = Path(c.data_dir) / "workers" / "1"
    shutil.rmtree(store)
    store.write_text("not a directory")
    c.kill("worker", "1")
    # Restarts at once, then after 0.5, 1, 2, 4, 8 s: 6 restarts, the 7th death
    # is a crash loop.
    until(lambda: member(c, "worker", "1")["health"] == "crashloop", 40.0, "worker 1 in crashloop")
    m = member(c, "worker", "1")
    assert m["restarts"] == 6 and m["last_exit"] == "exit 1", m
    events = [e for e in c.events() if e["kind"] in ("member_restarted", "crash_loop")]
    assert [e["kind"] for e in events] == ["member_restarted"] * 6 + ["crash_loop"], events
    pid = c.procs[("worker", "1")].pid
    time.sleep(1.0)
    assert c.procs[("worker", "1")].pid == pid  # left down: no more restarts
    # The operator fixes the cause and restarts it by hand: it runs and is supervised.
    store.unlink()
    c.restart("worker", "1")
    until(lambda: strength_gap(c) == "", 20.0, "both workers back")
    assert lep.DistributedTask(c).parallelize(range(100), partitions=4).count() == 100
