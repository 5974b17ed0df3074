"""The dashboard app and ``lepton top`` over a real cluster (3 coordinators, 2 workers)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import cloudpickle
import pytest
from starlette.testclient import TestClient

import lepton_ai as lep
from helpers import lepton, wait_until
from lepton_ai.monitor.dashboard import dashboard_app
from lepton_ai.monitor.dashboard_auth import cookie_name
from lepton_ai.monitor.dashboard_source import ClusterSource

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster() -> Iterator[lep.LocalCluster]:
    with lep.LocalCluster(workers=2) as c:
        yield c


def _login(client: TestClient, token: str) -> int:
    reply = client.post("/login", data={"token": token}, follow_redirects=False)
    return reply.status_code


@pytest.mark.timeout(120)
def test_login_guards_the_data(cluster: lep.LocalCluster) -> None:
    app = dashboard_app(ClusterSource(cluster), cluster.token)
    with TestClient(app) as client:
        assert client.get("/api/snapshot").status_code == 401
        page = client.get("/", follow_redirects=False)
        assert page.status_code == 303 and page.headers["location"].endswith("/login")

        wrong = client.post("/login", data={"token": "not-the-token"}, follow_redirects=False)
        assert wrong.status_code == 401
        assert "set-cookie" not in wrong.headers
        assert "Wrong token" in wrong.text and cluster.address not in wrong.text
        assert client.get("/api/snapshot").status_code == 401

        assert _login(client, cluster.token) == 303
        cookie = client.cookies.get(cookie_name(cluster.token))
        assert cookie and cluster.token not in cookie
        snap = client.get("/api/snapshot")
        assert snap.status_code == 200, snap.text
        data = snap.json()
    members = {(m["role"], m["id"]) for m in data["members"]}
    assert {("coordinator", "0"), ("coordinator", "1"), ("coordinator", "2")} <= members
    assert {("worker", "0"), ("worker", "1")} <= members
    assert data["leader"] and data["paxos"]["leader"] == data["leader"]
    assert data["paxos"]["quorum"] == 2 and data["paxos"]["elections"] >= 1
    assert data["storage"] is not None and len(data["storage"]["nodes"]) == 2
    assert data["errors"] == {}


@pytest.mark.timeout(120)
def test_jobs_events_and_deployments_show(cluster: lep.LocalCluster) -> None:
    task = lep.DistributedTask(cluster)
    total = (
        task.parallelize(range(1000), partitions=4).map(lambda x: x * 2).reduce(lambda a, b: a + b)
    )
    assert total == 999_000
    cluster.storage.put("dash/one", b"x" * 4096, replicas=2)
    app = dashboard_app(ClusterSource(cluster), cluster.token)
    with TestClient(app) as client:
        assert _login(client, cluster.token) == 303
        data = client.get("/api/snapshot").json()
    finished = [j for j in data["jobs"] if j["status"] == "finished"]
    assert finished and finished[0]["percent"] == 100.0
    kinds = {e["kind"] for e in data["events"]}
    assert {"leader_elected", "worker_joined", "job_finished"} <= kinds
    assert data["storage"]["objects"] >= 1 and data["storage"]["healthy"]
    assert data["deployments"] == []


@pytest.mark.timeout(120)
def test_top_once_shows_the_members(cluster: lep.LocalCluster) -> None:
    env = dict(os.environ, LEPTON_ADDRESS=cluster.address, LEPTON_TOKEN=cluster.token)

    def top_once() -> subprocess.CompletedProcess[str]:
        out = lepton("top", "--once", env=env)
        assert out.returncode == 0, out.stderr
        return out

    # A failure (with its stderr) counts as "not yet": the leader may be changing.
    out = wait_until(top_once, 30.0, "lepton top --once succeeding", ignore=(AssertionError,))
    assert "members" in out.stdout and "coordinator" in out.stdout
    for m in cluster.status()["members"]:
        if m["role"] in ("coordinator", "worker"):
            assert str(m["pid"]) in out.stdout, (m, out.stdout)
    assert "recent events" in out.stdout and "leader_elected" in out.stdout

    url = lepton("dashboard", env=env)
    if hasattr(cluster, "dashboard_url"):
        assert url.returncode == 0 and url.stdout.strip() == cluster.dashboard_url
    else:
        assert url.returncode == 1 and "--serve" in url.stderr


@pytest.mark.timeout(120)
def test_dashboard_serve_command(cluster: lep.LocalCluster) -> None:
    import json
    import subprocess

    import httpx

    env = dict(os.environ, LEPTON_ADDRESS=cluster.address, LEPTON_TOKEN=cluster.token)
    cmd = [sys.executable, "-m", "lepton_ai.cli", "dashboard", "--serve", "--json"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = json.loads(proc.stdout.readline())["url"]
        assert url.startswith("http://127.0.0.1:")
        with httpx.Client(base_url=url, timeout=30.0) as client:
            assert client.get("api/snapshot").status_code == 401
            assert client.post("login", data={"token": cluster.token}).status_code == 303
            members = client.get("api/snapshot").json()["members"]
        assert {m["role"] for m in members} >= {"coordinator", "worker", "executor"}
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=15)
    # uvicorn shuts down cleanly on SIGTERM, then re-raises it: death by SIGTERM.
    assert proc.returncode == -signal.SIGTERM, err
    assert "Traceback" not in err, err
