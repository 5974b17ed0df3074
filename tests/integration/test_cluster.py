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
from helpers import lepton, pids_left, wait_until
from lepton_ai.node.local_cluster import LocalCluster
from lepton_ai.node.process import pid_alive

# Functions defined here travel by value: executors cannot import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def all_pids(cluster: LocalCluster) -> list[int]:
    """Every process of the cluster: the ones it started and their executors."""
    pids = set(cluster.pids())
    pids.update(m["pid"] for m in cluster.status()["members"] if m["pid"] > 0)
    return sorted(pids)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    c = LocalCluster(workers=2)
    pids = all_pids(c)
    try:
        yield c
    finally:
        c.close()
        left = pids_left(pids, 5.0)
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
    # (Other tests on this cluster failed tasks too: count the executor deaths.)
    events = [
        e for e in cluster.events() if e["kind"] == "task_failed" and "executor" in e["detail"]
    ]
    assert len(events) >= parts // 5


def _sleepy(slow: int):  # type: ignore[no-untyped-def]
    def fn(x: int) -> int:
        time.sleep(3.0 if x == slow else 0.05)
        return x

    return fn


@pytest.mark.timeout(60)
def test_work_waiting_behind_a_slow_task_moves_to_the_idle_node(cluster: LocalCluster) -> None:
    """Each node lines up several attempts per executor (pipeline depth); when the
    other node runs dry, the scheduler steals the ones not started yet."""
    n = 32
    task = lep.DistributedTask(cluster, progress=False)
    job = task.parallelize(range(n), partitions=n).map(_sleepy(20)).submit()
    assert job.result(timeout=50) == list(range(n))
    events = job.events()
    moved = [e for e in events if e["kind"] == "task_moved"]
    assert moved, events
    assert all("partition 20 " not in e["detail"] for e in moved)  # the running one stays
    # Nothing failed, so nothing is reported as failed or retried.
    assert not [e for e in events if e["kind"] in ("task_failed", "task_rescheduled")], events


def _hang_once(marker: str):  # type: ignore[no-untyped-def]
    def fn(x: int) -> int:
        if x == 7 and not os.path.exists(marker):
            Path(marker).touch()
            time.sleep(1e9)  # a hung task: only the task timeout ends it
        return x * 2

    return fn


def _hang_always(x: int) -> int:
    time.sleep(1e9)
    return x


@pytest.mark.timeout(90)
def test_task_timeout_kills_a_hung_task_and_retries_it(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    """A single-task stage has no median to speculate against: only the timeout helps."""
    task = lep.DistributedTask(cluster, progress=False)
    marker = str(tmp_path / "hung-once")
    start = time.monotonic()
    job = (
        task.parallelize(range(20), partitions=1)
        .map(_hang_once(marker))
        .submit("reduce", task_timeout_s=2.0)
    )
    assert job.result(timeout=60) == sum(x * 2 for x in range(20))
    assert os.path.exists(marker) and time.monotonic() - start >= 2.0
    timed_out = [e for e in job.events() if e["kind"] == "task_timed_out"]
    assert len(timed_out) == 1 and "task_timeout_s=2" in timed_out[0]["detail"], job.events()
    start = time.monotonic()
    with pytest.raises(lep.JobFailed, match="task_timeout_s=1") as info:
        task.parallelize(range(4), partitions=1).map(_hang_always).collect(
            task_timeout_s=1.0, max_retries=1, timeout=60
        )
    assert not isinstance(info.value, lep.TaskError)
    assert "partition 0" in str(info.value) and "max_retries=1" in str(info.value)
    assert time.monotonic() - start < 20  # two ~1 s attempts, then the job fails
    # Every killed executor was replaced: the cluster still computes.
    assert task.parallelize(range(10), partitions=4).count() == 10


@pytest.mark.timeout(60)
def test_read_parquet_row_groups_across_workers(cluster: LocalCluster, tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    for i, (start, n) in enumerate([(0, 500), (500, 260)]):
        ids = list(range(start, start + n))
        table = pa.table(
            {"id": ids, "word": [f"w{x % 13}" for x in ids], "x": [x / 4 for x in ids]}
        )
        pq.write_table(table, tmp_path / f"part-{i}.parquet", row_group_size=50)
    task = lep.DistributedTask(cluster, progress=False)
    ds = task.read_parquet(str(tmp_path / "*.parquet"), partitions=6)
    assert ds.num_partitions >= 6
    rows = ds.collect()
    assert [r["id"] for r in rows] == list(range(760))
    assert rows[3] == {"id": 3, "word": "w3", "x": 0.75}
    counts = (
        task.read_parquet(str(tmp_path), partitions=4, columns=["word"])
        .map(lambda r: (r["word"], 1))
        .reduce_by_key(operator.add, partitions=3)
        .collect()
    )
    assert dict(counts) == collections.Counter(f"w{x % 13}" for x in range(760))
    with pytest.raises(FileNotFoundError):
        task.read_parquet(str(tmp_path / "missing" / "*.parquet"))


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

    def lepton_cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "lepton_ai.cli", *args, "--address", cluster.address],
            env=env,
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )

    out = lepton_cli("submit", str(script), "--wait", "--json")
    assert out.returncode == 0, out.stderr
    assert '"result": [0, 10, 20, 30, 40, 50]' in out.stdout
    bad = lepton_cli("job", "status", "nosuchjob")
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1
    bad_option = lepton_cli("submit", str(script), "--task-timeout", "0")
    assert bad_option.returncode != 0
    assert "task_timeout_s" in bad_option.stderr, bad_option.stderr


@pytest.mark.timeout(60)
def test_status_lists_members_and_close_leaves_nothing() -> None:
    t0 = time.perf_counter()
    c = LocalCluster(workers=2, coordinators=1, slots_per_worker=2)
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
    assert not pids_left(pids, 5.0), "processes survived close()"
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
        left = pids_left(pids, 10.0)
        assert not left, f"children outlived their parent: {left}"
    finally:
        if owner.poll() is None:
            owner.kill()
        for pid in pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(60)
def test_errors_no_retry_can_fix_are_reported_at_once(cluster: LocalCluster) -> None:
    """A wrong token, a host that does not resolve, and nobody listening: each is
    certain at the first try, so the caller hears it at once, not after retries."""
    import socket
    import time

    import lepton_ai as lep
    from lepton_ai.errors import AuthError, Unavailable

    with socket.socket() as s:  # a port nobody listens on (bound, never listening)
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
        cases = [
            (cluster.address, "not-the-token", AuthError, "token"),
            ("no-such-host.invalid:7400", "t", Unavailable, "cannot resolve"),
            (dead, "t", Unavailable, "no coordinator listens"),
        ]
        for address, token, error, words in cases:
            t0 = time.monotonic()
            with pytest.raises(error, match=words), lep.connect(address, token=token) as c:
                c.status()
            # Each used to take the 10 s of retries; a loaded machine still stays far below.
            assert time.monotonic() - t0 < 5.0, (address, time.monotonic() - t0)
    # A cluster that answered once rides out a refusal (a restarting coordinator).
    assert cluster.status()["leader"]


@pytest.mark.timeout(60)
def test_connect_finds_the_cluster_and_an_unclosed_handle_exits_quietly(
    cluster: LocalCluster,
) -> None:
    """``lep.connect()`` with no address uses ``$LEPTON_ADDRESS``/``$LEPTON_TOKEN``; a
    script that never closes its handle (nor its KV) ends without asyncio noise."""
    import subprocess
    import sys

    script = (
        "import lepton_ai as lep\n"
        "c = lep.connect()\n"
        "c.kv.put('unclosed', 1)\n"
        "print(c.kv.get('unclosed'), bool(c.status()['leader']))\n"
    )
    env = dict(os.environ, LEPTON_ADDRESS=cluster.address, LEPTON_TOKEN=cluster.token)
    out = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert out.returncode == 0 and out.stdout.split() == ["1", "True"], out.stderr
    assert "Task was destroyed" not in out.stderr and "Traceback" not in out.stderr, out.stderr
    env.pop("LEPTON_ADDRESS")
    env["LEPTON_STATE_FILE"] = "/nonexistent/lepton-state.json"
    none = subprocess.run(
        [sys.executable, "-c", "import lepton_ai as lep; lep.connect()"],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert none.returncode == 1 and "no cluster to connect to" in none.stderr, none.stderr
    assert "--token" not in none.stderr and "--address" not in none.stderr


def _nap(x: int) -> int:
    time.sleep(2.0)
    return x


@pytest.mark.timeout(90)
def test_a_running_job_is_cancelled_and_frees_its_executors(cluster: LocalCluster) -> None:
    import json

    task = lep.DistributedTask(cluster, progress=False)
    job = task.parallelize(range(40), partitions=40).map(_nap).submit()  # ~40 s of work
    wait_until(lambda: job.progress()[0] > 0, 20.0, "the job really started")
    on = ("--address", cluster.address, "--token", cluster.token)
    listed = lepton("job", "list", "--json", *on)
    assert listed.returncode == 0, listed.stderr
    mine = [j for j in json.loads(listed.stdout)["jobs"] if j["job_id"] == job.id]
    assert mine and mine[0]["status"] == "running", listed.stdout
    cancelled = lepton("job", "cancel", job.id, *on)
    assert cancelled.returncode == 0, cancelled.stderr
    t0 = time.monotonic()
    with pytest.raises(lep.JobCancelled, match="cancelled by the user"):
        job.result(timeout=30)
    assert time.monotonic() - t0 < 10, "the cancel did not end the job at once"
    assert [j["status"] for j in cluster.jobs() if j["job_id"] == job.id] == ["failed"]
    assert any(e["kind"] == "job_cancelled" for e in job.events())
    with pytest.raises(ValueError, match="nothing to cancel"):
        job.cancel()
    with pytest.raises(KeyError):
        cluster.cancel_job("no-such-job")
    # Its attempts were killed: the executors take a new job at once.
    t0 = time.monotonic()
    assert task.parallelize(range(8), partitions=4).count() == 8
    assert time.monotonic() - t0 < 10
