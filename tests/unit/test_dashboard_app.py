"""The dashboard without a cluster: sessions, the login limit, the shared cache, the
views ``ClusterSource`` builds from a fake cluster, and ``lepton top``'s frame."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from rich.console import Console
from starlette.testclient import TestClient

from lepton_ai.errors import Unavailable
from lepton_ai.monitor.dashboard import SnapshotCache, SourceUnavailable, dashboard_app
from lepton_ai.monitor.dashboard_auth import (
    LoginLimiter,
    cookie_name,
    make_session,
    session_valid,
    token_matches,
)
from lepton_ai.monitor.dashboard_source import ClusterSource, stage_progress
from lepton_ai.monitor.top import render
from lepton_ai.node.messages import Deployments, GetDeployments
from lepton_ai.serve.spec import DeploymentInfo, DeploymentSpec, ReplicaInfo
from lepton_ai.storage.control import StorageReport, StorageUsage

TOKEN = "s3cret-token-for-tests"


# ---------------------------------------------------------------- a fake cluster


class FakeClient:
    def request(self, msg: Any, timeout_s: float) -> Any:
        assert isinstance(msg, GetDeployments)
        spec = DeploymentSpec("iris", "/m.py:predict", 2, version=3)
        replicas = [
            ReplicaInfo("iris.3.1", "0-aa", 3, "ready", "http://r1"),
            ReplicaInfo("iris.3.2", "1-bb", 3, "starting"),
        ]
        return Deployments([DeploymentInfo(spec, replicas, ["http://lb0/iris"])])


class FakeStorage:
    def fsck(self, limit: int, *, quick: bool = False) -> StorageReport:
        usage = StorageUsage(used_bytes=2048, capacity_bytes=10**9, objects=2)
        return StorageReport(
            objects=2, bytes=4096, under_replicated=[], lost=[], nodes={"0-aa": usage}
        )


class FakeCluster:
    """What ``ClusterSource`` reads of a ``Cluster``; ``fail`` makes one call raise."""

    address = "127.0.0.1:7400"

    def __init__(self, tasks: list[dict[str, Any]] | None = None, fail: str = "") -> None:
        self.client = FakeClient()
        self.storage = FakeStorage()
        self.fail = fail
        self.calls = 0
        self._tasks = tasks
        if tasks is not None:
            self.job_tasks = lambda job_id: self._tasks

    def _maybe_fail(self, name: str) -> None:
        if self.fail == name:
            raise Unavailable(f"{name}: no leader")

    def status(self) -> dict[str, Any]:
        self.calls += 1
        self._maybe_fail("status")
        members = [
            {"role": "coordinator", "id": "0", "pid": 10, "address": "a:1", "health": "leader"},
            {"role": "coordinator", "id": "1", "pid": 11, "address": "a:2", "health": "follower"},
            {"role": "coordinator", "id": "2", "pid": 12, "address": "a:3", "health": "down"},
            {"role": "worker", "id": "0", "pid": 20, "address": "a:4", "health": "alive",
             "node": "0-aa", "restarts": 2, "last_exit": "killed by SIGKILL"},
        ]  # fmt: skip
        return {"leader": "a:1", "members": members}

    def events(self) -> list[dict[str, Any]]:
        self._maybe_fail("events")
        return [
            {"t": 100.0, "kind": "leader_elected", "detail": "a:1 epoch 1", "job_id": ""},
            {"t": 101.0, "kind": "job_submitted", "detail": "", "job_id": "j1"},
            {"t": 103.5, "kind": "job_finished", "detail": "", "job_id": "j1"},
        ]

    def jobs(self) -> list[dict[str, Any]]:
        self._maybe_fail("jobs")
        return [
            # finished_at on another clock than submitted_at: the duration comes from events
            {"job_id": "j1", "status": "finished", "done": 6, "total": 6,
             "submitted_at": 101.0, "finished_at": 5.0},
            {"job_id": "j2", "status": "running", "done": 1, "total": 4,
             "submitted_at": 104.0, "finished_at": 0.0},
        ]  # fmt: skip


TASKS = [
    {"stage": 0, "partition": 0, "attempt": 1, "worker": "0-aa", "started": 1.0,
     "ended": 2.0, "outcome": "failed", "speculative": False},
    {"stage": 0, "partition": 0, "attempt": 5, "worker": "1-bb", "started": 2.1,
     "ended": 3.0, "outcome": "succeeded", "speculative": False},
    {"stage": 0, "partition": 1, "attempt": 2, "worker": "0-aa", "started": 1.0,
     "ended": 0.0, "outcome": "running", "speculative": False},
    {"stage": 0, "partition": 1, "attempt": 6, "worker": "1-bb", "started": 2.5,
     "ended": 0.0, "outcome": "running", "speculative": True},
    {"stage": 1, "partition": 0, "attempt": 7, "worker": "1-bb", "started": 3.0,
     "ended": 0.0, "outcome": "running", "speculative": False},
]  # fmt: skip


def test_snapshot_views() -> None:
    snap = ClusterSource(FakeCluster(TASKS)).snapshot()
    assert snap["errors"] == {}
    assert snap["leader"] == "a:1" and len(snap["members"]) == 4
    worker = snap["members"][3]
    assert worker["restarts"] == 2 and worker["last_exit"] == "killed by SIGKILL"
    assert snap["paxos"]["quorum"] == 2 and snap["paxos"]["up"] == 2
    assert snap["paxos"]["elections"] == 1
    j2, j1 = snap["jobs"]  # newest first
    assert j1["percent"] == 100.0 and j1["duration_s"] == 2.5
    assert j2["percent"] == 25.0 and j2["duration_s"] is None
    assert j2["stages"] == [
        {"stage": 0, "done": 1, "seen": 2, "failed": 1, "running": 2},
        {"stage": 1, "done": 0, "seen": 1, "failed": 0, "running": 1},
    ]
    dep = snap["deployments"][0]
    assert (dep["name"], dep["version"], dep["replicas"], dep["ready"]) == ("iris", 3, 2, 1)
    assert dep["urls"] == ["http://lb0/iris"]
    storage = snap["storage"]
    assert storage["healthy"] and storage["nodes"][0]["worker"] == "0"
    assert snap["features"] == {"job_tasks": True}


def test_a_failing_section_hides_only_itself() -> None:
    snap = ClusterSource(FakeCluster(fail="events")).snapshot()
    assert set(snap["errors"]) == {"events"} and "no leader" in snap["errors"]["events"]
    assert snap["events"] == [] and len(snap["members"]) == 4 and snap["jobs"]
    assert snap["features"] == {"job_tasks": False}  # no job_tasks on this cluster
    down = ClusterSource(FakeCluster(fail="status")).snapshot()
    assert down["members"] == [] and "members" in down["errors"]


def test_retries_and_backups_are_told_apart() -> None:
    tasks = ClusterSource(FakeCluster(TASKS)).job_tasks("j2")
    assert tasks is not None
    by_attempt = {t["attempt"]: t for t in tasks}
    assert not by_attempt[1]["retry"] and by_attempt[5]["retry"]  # re-ran after a failure
    assert not by_attempt[6]["retry"] and by_attempt[6]["speculative"]  # a backup
    assert by_attempt[2]["ended"] is None and by_attempt[2]["outcome"] == "running"
    assert ClusterSource(FakeCluster()).job_tasks("j2") is None
    assert stage_progress([]) == []


def test_top_frame_shows_everything() -> None:
    console = Console(width=160, record=True)
    console.print(render(ClusterSource(FakeCluster(fail="jobs")).snapshot()))
    text = console.export_text()
    for want in ("members", "coordinator", "leader", "down", "iris", "v3", "1/2", "a:4"):
        assert want in text, want
    assert "jobs: Unavailable: jobs: no leader" in text  # the failed section says so
    assert "leader_elected" in text and "recent events" in text


# ---------------------------------------------------------------- sessions


def test_sessions() -> None:
    now = 1_000_000.0
    value = make_session(TOKEN, now, max_age_s=60)
    assert TOKEN not in value and session_valid(TOKEN, value, now + 59)
    assert not session_valid(TOKEN, value, now + 61)  # expired
    assert not session_valid("another-token", value, now)
    expiry, mac = value.split(".")
    assert not session_valid(TOKEN, f"{int(expiry) + 3600}.{mac}", now)  # extended by hand
    for junk in (None, "", "x", "1.2.3", f"{expiry}.{mac[:-1]}0", f"-1.{mac}", f"{expiry}.é"):
        assert not session_valid(TOKEN, junk, now), junk
    assert token_matches(TOKEN, TOKEN) and not token_matches(TOKEN, TOKEN[:-1])
    assert cookie_name(TOKEN) != cookie_name("another") and TOKEN not in cookie_name(TOKEN)


def test_login_limiter() -> None:
    limiter = LoginLimiter(failures_max=3, total_max=5, window_s=10.0, clients_max=2)
    for _ in range(3):
        assert limiter.allowed("a", 0.0)
        limiter.failed("a", 0.0)
    assert not limiter.allowed("a", 1.0) and limiter.allowed("b", 1.0)
    assert limiter.allowed("a", 10.5)  # the window moved on
    limiter.failed("b", 11.0)
    limiter.failed("c", 11.0)  # a third client: the oldest ("a") is forgotten
    assert limiter.allowed("a", 11.0)
    for _ in range(5):
        limiter.failed("d", 12.0)
    assert not limiter.allowed("e", 12.0)  # everyone together is over the bound


# ---------------------------------------------------------------- the app


class CountingSource:
    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.calls = 0
        self.closed = False
        self.lock = threading.Lock()

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            self.calls += 1
            n = self.calls
        time.sleep(self.delay_s)
        return {"n": n, "members": [{"role": "worker", "id": "7"}]}

    def job_tasks(self, job_id: str) -> list[dict[str, Any]] | None:
        return None

    def close(self) -> None:
        self.closed = True


def test_app_login_and_data() -> None:
    app = dashboard_app(CountingSource(), TOKEN)
    with TestClient(app) as client:
        assert client.get("/api/snapshot").status_code == 401
        assert client.get("/api/jobs/j1/tasks").status_code == 401
        assert client.get("/", follow_redirects=False).status_code == 303
        assert client.get("/login").status_code == 200
        assert client.get("/static/app.js").status_code == 200

        wrong = client.post("/login", data={"token": "nope"}, follow_redirects=False)
        assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
        assert client.get("/api/snapshot").status_code == 401
        bad = client.post("/login", content=b'{"token": 1}', follow_redirects=False)
        assert bad.status_code == 400

        ok = client.post("/login", data={"token": TOKEN}, follow_redirects=False)
        assert ok.status_code == 303
        cookie = ok.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
        assert TOKEN not in cookie
        assert client.get("/api/snapshot").json()["members"] == [{"role": "worker", "id": "7"}]
        assert client.get("/api/jobs/j1/tasks").json() == {"job_id": "j1", "tasks": None}
        assert client.get("/api/jobs/j1;x/tasks").status_code == 400
        page = client.get("/")
        assert (
            page.status_code == 200
            and "script-src 'self'" in page.headers["content-security-policy"]
        )

        client.post("/logout")
        assert client.get("/api/snapshot").status_code == 401


def test_login_attempts_are_bounded() -> None:
    app = dashboard_app(CountingSource(), TOKEN)
    with TestClient(app) as client:
        codes = [client.post("/login", data={"token": f"guess{i}"}).status_code for i in range(12)]
        assert codes[:10] == [401] * 10 and codes[10:] == [429, 429]
        # Over the bound even the right token is refused: no oracle for a guesser.
        right = client.post("/login", data={"token": TOKEN}, follow_redirects=False)
        assert right.status_code == 429 and "set-cookie" not in right.headers


def test_cache_shares_one_fetch_among_viewers() -> None:
    source = CountingSource(delay_s=0.05)

    async def main() -> list[bytes]:
        cache = SnapshotCache(source, max_age_s=10.0)
        bodies = await asyncio.gather(*(cache.snapshot() for _ in range(100)))
        await cache.aclose()
        return list(bodies)

    bodies = asyncio.run(main())
    assert source.calls == 1 and len(set(bodies)) == 1


def test_cache_serves_the_last_snapshot_while_a_fetch_is_slow() -> None:
    source = CountingSource()

    async def main() -> tuple[bytes, bytes, bool]:
        cache = SnapshotCache(source, max_age_s=0.0, wait_s=0.05)
        first = await cache.snapshot()
        source.delay_s = 0.5  # the cluster stalls (a leader election)
        stale = await cache.snapshot()
        fresh_cache = SnapshotCache(source, max_age_s=0.0, wait_s=0.05)
        try:
            await fresh_cache.snapshot()
            nothing_yet = False
        except SourceUnavailable:
            nothing_yet = True
        await asyncio.sleep(0.6)
        await cache.aclose()
        await fresh_cache.aclose()
        return first, stale, nothing_yet

    first, stale, nothing_yet = asyncio.run(main())
    assert first == stale and b'"n":1' in first
    assert nothing_yet


def test_the_app_closes_its_source_when_it_stops() -> None:
    source = CountingSource()
    with TestClient(dashboard_app(source, TOKEN)):
        assert not source.closed
    assert source.closed  # its kept-alive scrape connections go with it
