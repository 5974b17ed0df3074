"""A real LocalCluster on loopback: exact results, user errors, detached jobs, clean exit."""

from __future__ import annotations

import collections
import operator
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import pytest

import lepton_ai as lep
from lepton_ai.node.cluster import LocalCluster
from lepton_ai.node.process import pid_alive

# Functions defined here travel by value: executors cannot import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def all_pids(cluster: LocalCluster) -> list[int]:
    """Every process of the cluster: the ones it started and their executors."""
    pids = set(cluster.pids())
    pids.update(m["pid"] for m in cluster.status()["members"] if m["pid"] > 0)
    return sorted(pids)


def wait_all_dead(pids: list[int], timeout_s: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if pid_alive(p)]
        time.sleep(0.02)
    return alive


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    c = LocalCluster(workers=2)
    pids = all_pids(c)
    try:
        yield c
    finally:
        c.close()
        left = wait_all_dead(pids)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"processes left running: {left}"


def make_corpus(seed: int, lines: int) -> list[str]:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(500)]
    weights = [1.0 / (i + 1) for i in range(500)]
    return [" ".join(rng.choices(vocab, weights, k=rng.randint(0, 12))) for _ in range(lines)]


@pytest.mark.timeout(60)
def test_word_count_equals_counter(cluster: LocalCluster, tmp_path: Path) -> None:
    lines = make_corpus(7, 20_000)
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    task = lep.DistributedTask(cluster, progress=False)
    counts = (
        task.read_text(str(path), partitions=6)
        .flat_map(str.split)
        .map(lambda w: (w, 1))
        .reduce_by_key(operator.add, partitions=4)
        .collect()
    )
    expected = collections.Counter(w for line in lines for w in line.split())
    assert dict(counts) == dict(expected)
    assert len(counts) == len(expected)  # no key twice
    # The same through parallelize, and the scalar actions.
    ds = task.parallelize(range(10_000), partitions=7)
    assert ds.map(lambda x: x * 2).reduce(operator.add) == sum(range(10_000)) * 2
    assert ds.filter(lambda x: x % 3 == 0).count() == len(range(0, 10_000, 3))


def _boom(x: int) -> int:
    if x == 37:
        raise ZeroDivisionError(f"bad item {x}")
    return x


@pytest.mark.timeout(60)
def test_user_exception_is_task_error_with_remote_traceback(cluster: LocalCluster) -> None:
    task = lep.DistributedTask(cluster, progress=False)
    with pytest.raises(lep.TaskError) as info:
        task.parallelize(range(100), partitions=4).map(_boom).collect(timeout=30)
    err = info.value
    assert err.partition == 1  # items 25..49
    assert "ZeroDivisionError" in str(err) and "bad item 37" in str(err)
    assert "_boom" in err.remote_traceback  # the frame of the user's function
    # The cluster is fine afterwards.
    assert task.parallelize(range(10), partitions=2).count() == 10


@pytest.mark.timeout(60)
def test_detached_submit_then_job_handle_from_elsewhere(cluster: LocalCluster) -> None:
    task = lep.DistributedTask(cluster, progress=False)
    job = task.parallelize(range(1000), partitions=5).map(lambda x: x + 1).submit()
    assert isinstance(job.id, str) and job.id
    # A different process fetches the result by id, through the CLI.
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "lepton_ai.cli",
            "job",
            "result",
            job.id,
            "--json",
            "--address",
            cluster.address,
            "--timeout",
            "30",
        ],
        env=dict(os.environ, LEPTON_TOKEN=cluster.token),
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert '"result": [1, 2, 3' in out.stdout
    # And a fresh handle in this process.
    other = lep.connect(cluster.address, token=cluster.token)
    try:
        again = lep.Job(other, job.id)
        assert again.result(timeout=30) == list(range(1, 1001))
        assert again.status() == "finished"
        kinds = [e["kind"] for e in again.events()]
        assert "job_submitted" in kinds and "job_finished" in kinds
    finally:
        other.close()
    with pytest.raises(TimeoutError):
        slow = task.parallelize(range(2), partitions=2).map(lambda x: time.sleep(1)).submit()
        slow.result(timeout=0.2)


def _exit_on_first_attempt(marker_dir: str, size: int):  # type: ignore[no-untyped-def]
    def fn(chunk: range) -> list[int]:
        part = chunk[0] // size
        marker = os.path.join(marker_dir, f"p{part}")
        if part % 5 == 0 and not os.path.exists(marker):
            with open(marker, "w"):
                pass
            os._exit(1)  # the executor dies; the agent must survive and replace it
        return [x * x for x in chunk]

    return fn


@pytest.mark.timeout(90)
def test_os_exit_in_a_fifth_of_first_attempts_still_exact(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    parts, size = 20, 50
    task = lep.DistributedTask(cluster, progress=False)
    fn = _exit_on_first_attempt(str(tmp_path), size)
    before = {m["id"]: m["pid"] for m in cluster.status()["members"] if m["role"] == "worker"}
    out = task.parallelize(range(parts * size), partitions=parts).map_partitions(fn).collect()
    assert out == [x * x for x in range(parts * size)]
    assert len(list(tmp_path.iterdir())) == parts // 5  # each died exactly once
    after = {m["id"]: m["pid"] for m in cluster.status()["members"] if m["role"] == "worker"}
    assert after == before  # the agents survived every executor death
    events = [e for e in cluster.events() if e["kind"] == "task_failed"]
    assert len(events) >= parts // 5 and "executor" in events[0]["detail"]


@pytest.mark.timeout(60)
def test_lepton_submit_cli(cluster: LocalCluster, tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(
        textwrap.dedent("""
        def main(task):
            return task.parallelize(range(6), partitions=3).map(lambda x: x * 10)
    """)
    )
    env = dict(os.environ, LEPTON_TOKEN=cluster.token)
    base = [sys.executable, "-m", "lepton_ai.cli"]
    out = subprocess.run(
        [*base, "submit", str(script), "--wait", "--json", "--address", cluster.address],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert '"result": [0, 10, 20, 30, 40, 50]' in out.stdout
    bad = subprocess.run(
        [*base, "job", "status", "nosuchjob", "--address", cluster.address],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.timeout(60)
def test_status_lists_members_and_close_leaves_nothing() -> None:
    t0 = time.perf_counter()
    c = LocalCluster(workers=2, slots_per_worker=2)
    started_s = time.perf_counter() - t0
    try:
        st = c.status()
        roles = collections.Counter(m["role"] for m in st["members"])
        spares = roles.pop("spare", 0)  # warm replacements, started once the slots are up
        assert roles == {"coordinator": 1, "worker": 2, "executor": 4}
        assert spares <= 2
        assert all(m["pid"] > 0 and m["health"] for m in st["members"])
        assert st["leader"] == c.address
        pids = all_pids(c)
        assert all(pid_alive(p) for p in pids)
    finally:
        c.close()
    assert not wait_all_dead(pids), "processes survived close()"
    assert started_s < 30


@pytest.mark.timeout(60)
def test_parent_death_takes_the_cluster_down(tmp_path: Path) -> None:
    """SIGKILL the process that owns a LocalCluster: its children must exit too."""
    script = tmp_path / "owner.py"
    script.write_text(
        textwrap.dedent("""
        import json, sys, time
        import lepton_ai as lep
        c = lep.LocalCluster(workers=1)
        pids = [m["pid"] for m in c.status()["members"]]
        print(json.dumps(pids), flush=True)
        time.sleep(600)
    """)
    )
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    pids: list[int] = []
    try:
        import json

        assert owner.stdout is not None
        pids = json.loads(owner.stdout.readline())
        assert len(pids) >= 3  # coordinator, worker, executor (and maybe a spare)
        owner.kill()
        owner.wait(10)
        left = wait_all_dead(pids, 10.0)
        assert not left, f"children outlived their parent: {left}"
    finally:
        if owner.poll() is None:
            owner.kill()
        for pid in pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
