"""Every process's /metrics, the service-discovery list and the per-job task timeline,
on a real default cluster (3 coordinators, 2 workers)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import cloudpickle
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import lepton_ai as lep
from helpers import wait_until

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster() -> Iterator[lep.LocalCluster]:
    with lep.LocalCluster(workers=2) as c:
        c.wait_ready()
        yield c


def scrape(url: str) -> dict[str, list[Any]]:
    """The samples of ``url`` by metric family, parsed by prometheus-client's parser
    (which raises on anything that is not the exposition format)."""
    reply = httpx.get(url, timeout=10.0)
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain")
    return {f.name: f.samples for f in text_string_to_metric_families(reply.text)}


def value(samples: dict[str, list[Any]], name: str, **labels: str) -> float:
    """The sum of the family's samples named ``name`` (or ``name_total``: a counter)
    with these labels."""
    return sum(
        s.value
        for s in samples.get(name, [])
        if s.name in (name, f"{name}_total")
        and all(s.labels.get(k) == v for k, v in labels.items())
    )


def word_count(cluster: lep.LocalCluster, n: int) -> lep.Job:
    task = lep.DistributedTask(cluster)
    words = task.parallelize([f"w{i % 7}" for i in range(n)], partitions=6)
    return words.map(lambda w: (w, 1)).reduce_by_key(lambda a, b: a + b, partitions=2).submit()


def every_process_url(cluster: lep.LocalCluster) -> list[str]:
    """Coordinators and agents by their metrics port, the nodes' serving balancers by
    their URL (the agents run one each by default)."""
    members = [m for m in cluster.status()["members"] if m["role"] in ("coordinator", "worker")]
    urls = {f"http://{m['metrics']}/metrics" for m in members}
    urls |= {f"{m['serve']}/metrics" for m in members if m["serve"]}
    return sorted(urls)


def test_every_coordinator_and_agent_serves_metrics_that_move_when_work_runs(
    cluster: lep.LocalCluster,
) -> None:
    # Every coordinator and worker shows its /metrics address (followers' once the
    # leader has asked them).
    wait_until(
        lambda: all(m["metrics"] for m in cluster.status()["members"] if m["role"] != "executor"),
        10.0,
        "every member's metrics address in status",
    )
    urls = cluster.metrics_urls
    assert urls == every_process_url(cluster)
    assert len(urls) == 7  # 3 coordinators + 2 agents + 2 node balancers
    before = {u: scrape(u) for u in urls}
    job = word_count(cluster, 7_000)
    assert dict(job.result(timeout=60)) == {f"w{i}": 1000 for i in range(7)}
    after = {u: scrape(u) for u in urls}
    leader = cluster.dashboard_url.rstrip("/") + "/metrics"
    assert value(after[leader], "lepton_coordinator_leading") == 1
    dispatched = value(after[leader], "lepton_task_dispatches", kind="first")
    assert dispatched - value(before[leader], "lepton_task_dispatches", kind="first") >= 8
    succeeded = value(after[leader], "lepton_task_attempts", outcome="succeeded")
    assert succeeded - value(before[leader], "lepton_task_attempts", outcome="succeeded") >= 8
    assert value(after[leader], "lepton_jobs_submitted") >= 1
    assert value(after[leader], "lepton_workers") == 2
    # Paxos: every coordinator applied the job's commands; exactly one leads.
    assert sum(value(after[u], "lepton_paxos_leader") for u in urls) == 1
    for u in urls:
        if "lepton_paxos_commit_index" in after[u]:
            assert value(after[u], "lepton_paxos_commit_index") > value(
                before[u], "lepton_paxos_commit_index"
            )
    # The agents ran the tasks (their executors' counts add up to what succeeded).
    agents = [u for u in urls if "lepton_executor_tasks" in after[u]]
    assert len(agents) == 2
    ran = sum(
        value(after[u], "lepton_executor_tasks", outcome="succeeded")
        - value(before[u], "lepton_executor_tasks", outcome="succeeded")
        for u in agents
    )
    assert ran >= 6
    balancers = [u for u in urls if "lepton_lb_requests" in after[u]]
    assert len(balancers) == 2
    processes = [u for u in urls if u not in balancers]  # each its own process registry
    assert all("process_resident_memory_bytes" in after[u] for u in processes)


def test_service_discovery_lists_every_process_from_any_coordinator(
    cluster: lep.LocalCluster, tmp_path: Path
) -> None:
    (tmp_path / "model.py").write_text("def predict(instances):\n    return instances\n")
    dep = lep.Deployment(
        str(tmp_path / "model.py:predict"), replicas=2, cluster=cluster, name="sd"
    ).wait_ready(60)
    try:
        wait_until(
            lambda: all(m["metrics"] for m in cluster.status()["members"]), 10.0, "addresses"
        )
        members = [m for m in cluster.status()["members"] if m["role"] in ("coordinator", "worker")]
        replicas = dep.status()
        expected = sorted(
            [(m["role"], m["id"], m["metrics"]) for m in members]
            + [("balancer", m["id"], urlsplit(m["serve"]).netloc) for m in members if m["serve"]]
            + [("replica", r["id"], urlsplit(r["url"]).netloc) for r in replicas]
        )
        assert len(expected) == 3 + 2 + 2 + 2
        for c in (m for m in members if m["role"] == "coordinator"):  # followers answer too
            groups = httpx.get(f"http://{c['metrics']}/sd", timeout=10.0).json()
            got = sorted(
                (g["labels"]["lepton_role"], g["labels"]["lepton_id"], g["targets"][0])
                for g in groups
            )
            assert got == expected
        for url in cluster.metrics_urls:  # every target answers with Prometheus text
            assert scrape(url)
    finally:
        dep.delete()


def test_job_tasks_show_which_worker_ran_each_attempt(cluster: lep.LocalCluster) -> None:
    job = word_count(cluster, 700)
    job.result(timeout=60)
    spans = cluster.job_tasks(job.id)
    workers = {m["id"] for m in cluster.status()["members"] if m["role"] == "worker"}
    assert sorted((s["stage"], s["partition"]) for s in spans if s["outcome"] == "succeeded") == [
        (0, p) for p in range(6)
    ] + [(1, p) for p in range(2)]
    for s in spans:
        assert s["worker"].split("-")[0] in workers  # incarnation ids start with the name
        assert 0 < s["started"] <= s["ended"] <= time.time()
    with pytest.raises(KeyError):
        cluster.job_tasks("no-such-job")
    # The job's end is wall-clock time (the scheduler's clock is monotonic).
    info = cluster.job_info(job.id)
    assert info.submitted_at <= info.finished_at <= time.time()
    assert min(s["started"] for s in spans) >= info.submitted_at


def test_the_dashboard_shows_live_request_rates_and_the_commit_index(
    cluster: lep.LocalCluster, tmp_path: Path
) -> None:
    from lepton_ai.monitor.dashboard_source import ClusterSource

    (tmp_path / "model.py").write_text("def predict(instances):\n    return instances\n")
    dep = lep.Deployment(
        str(tmp_path / "model.py:predict"), replicas=1, cluster=cluster, name="rates"
    ).wait_ready(60)
    try:
        source = ClusterSource(cluster)
        source.snapshot()  # the first reading: no rate yet
        client = lep.ServeClient(dep.urls)
        for _ in range(50):
            assert client.predict([[1, 2]]) == [[1, 2]]
        snap = source.snapshot()
        assert "rates" not in snap["errors"]
        (view,) = [d for d in snap["deployments"] if d["name"] == "rates"]
        assert view["requests_per_s"] > 0
        assert view["latency_ms"] > 0
        (leader,) = [m for m in snap["members"] if m.get("health") == "leader"]
        assert leader["commit_index"] > 0
    finally:
        dep.delete()


def test_status_says_liveness_executor_state_and_paxos_role_apart(
    cluster: lep.LocalCluster,
) -> None:
    members = cluster.status()["members"]
    by_role: dict[str, list[dict[str, Any]]] = {}
    for m in members:
        by_role.setdefault(m["role"], []).append(m)
    roles = sorted(m["paxos_role"] for m in by_role["coordinator"])
    assert roles == ["follower", "follower", "leader"]
    assert all(m["liveness"] == "alive" for m in members)
    assert {m["state"] for m in by_role["executor"]} <= {"idle", "busy"}
    assert all(m["state"] == "" and m["paxos_role"] == "" for m in by_role["worker"])
    # ``health`` keeps the one word it always showed, for scripts written against it.
    assert sorted(m["health"] for m in by_role["coordinator"]) == roles


def test_every_event_shows_once_after_a_leader_failover(cluster: lep.LocalCluster) -> None:
    """Last in the module: it kills the leader. A follower used to record a job's end
    itself when applying it, and the leader's replicated entry again."""
    jobs = [word_count(cluster, 70) for _ in range(3)]
    for job in jobs:
        job.result(timeout=60)
    old = cluster.dashboard_url
    cluster.kill("leader")
    wait_until(lambda: _new_leader(cluster, old), 20.0, "a new leader")
    events = cluster.events()
    for job in jobs:
        ends = [e for e in events if e["job_id"] == job.id and e["kind"] == "job_finished"]
        assert len(ends) == 1, ends


def _new_leader(cluster: lep.LocalCluster, old: str) -> bool:
    try:
        return cluster.dashboard_url != old
    except lep.LeptonError:
        return False  # no leader known right now


def test_metrics_off_leaves_jobs_running_and_metrics_empty(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # LEPTON_METRICS=0 reaches every process LocalCluster starts (they inherit it).
    monkeypatch.setenv("LEPTON_METRICS", "0")
    with lep.LocalCluster(workers=1) as off:
        job = word_count(off, 300)
        assert dict(job.result(timeout=60)) == {f"w{i}": 300 // 7 + (i < 300 % 7) for i in range(7)}

        def members() -> list[dict[str, Any]]:
            return [m for m in off.status()["members"] if m["role"] in ("coordinator", "worker")]

        wait_until(lambda: all(m["metrics"] for m in members()), 10.0, "metrics addresses")
        for m in members():
            samples = scrape(f"http://{m['metrics']}/metrics")
            assert not [name for name in samples if name.startswith("lepton_")], m["id"]
            assert "process_cpu_seconds" in samples  # the runtime's own metrics stay
        assert off.job_tasks(job.id) == []  # no task timeline kept


def test_a_bad_metrics_switch_is_refused_before_anything_starts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("LEPTON_METRICS", "yes")
    with pytest.raises(ValueError, match="LEPTON_METRICS must be 0"):
        lep.LocalCluster(workers=1, data_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # nothing written, nothing started
