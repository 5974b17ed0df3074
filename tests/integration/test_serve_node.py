"""A worker node's serving shell with real replica processes on 127.0.0.1: assignment,
readiness, routing by deployment, restarts, stopping, failures, limits, a switch of
the endpoint table under load, and that no child outlives ``run()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from helpers import wait_until_async
from lepton_ai.node.process import pid_alive
from lepton_ai.serve.config import ServeConfig, SupervisorConfig
from lepton_ai.serve.node_balancer import NODE_DEPLOYMENTS_MAX
from lepton_ai.serve.node_serve import NodeServing
from lepton_ai.serve.replica import build_app
from lepton_ai.serve.spec import Endpoint, ReplicaAssignment, ReplicaReport
from lepton_ai.serve.target import Target

REPLICAS_MAX = 3


def _models(tmp_path: Path) -> tuple[str, str]:
    (tmp_path / "v1.py").write_text(
        "def predict(instances):\n    return [sum(x) for x in instances]\n"
    )
    (tmp_path / "v2.py").write_text(
        "def predict(instances):\n    return [100 + sum(x) for x in instances]\n"
    )
    return f"{tmp_path}/v1.py:predict", f"{tmp_path}/v2.py:predict"


def _assignment(replica_id: str, target: str, version: int = 1) -> ReplicaAssignment:
    return ReplicaAssignment(replica_id, replica_id.partition(".")[0], version, target)


def _endpoints(reports: list[ReplicaReport]) -> list[Endpoint]:
    return [
        Endpoint(r.deployment, r.version, r.replica_id, r.url)
        for r in reports
        if r.state == "ready"
    ]


class _Node:
    """A running ``NodeServing`` plus every replica pid it ever reported."""

    def __init__(self, config: ServeConfig, stop_grace_s: float) -> None:
        self.node = NodeServing(
            "127.0.0.1", config, on_change=self.on_change, stop_grace_s=stop_grace_s
        )
        self.pids: set[int] = set()
        self.changes = 0

    def on_change(self) -> None:
        self.changes += 1
        self.pids.update(r.pid for r in self.node.reports() if r.pid)

    def report(self, replica_id: str) -> ReplicaReport | None:
        return next((r for r in self.node.reports() if r.replica_id == replica_id), None)

    def state(self, replica_id: str) -> str:
        r = self.report(replica_id)
        return "gone" if r is None else r.state

    async def until(self, check: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
        try:
            await wait_until_async(check, timeout_s, what, interval_s=0.05)
        except AssertionError as exc:  # what the node saw is the useful part
            raise AssertionError(f"{exc}: {self.node.reports()}") from None


@contextlib.asynccontextmanager
async def _running(
    stop_grace_s: float = 0.3, replicas_max: int = REPLICAS_MAX
) -> AsyncIterator[_Node]:
    """Start a node, run it, and on the way out cancel it and check no child is left."""
    config = ServeConfig(supervisor=SupervisorConfig(replicas_max=replicas_max))
    harness = _Node(config, stop_grace_s)
    node = harness.node
    await node.start()
    runner = asyncio.create_task(node.run(), name="test-node-run")
    try:
        yield harness
    finally:
        harness.pids.update(node.pids())
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
    left = [p for p in harness.pids if pid_alive(p)]
    assert harness.pids and not left, f"replica processes left behind: {left}"


async def _lifecycle(tmp_path: Path) -> None:
    v1, _ = _models(tmp_path)
    async with _running() as h, httpx.AsyncClient(timeout=10.0) as http:
        node = h.node
        assert node.url.startswith("http://127.0.0.1:")
        # Nothing routed yet: alive, not ready, every deployment unknown.
        assert (await http.get(f"{node.url}/healthz")).status_code == 200
        assert (await http.get(f"{node.url}/readyz")).status_code == 503

        node.assign([_assignment("adder.1.0", v1), _assignment("adder.1.1", v1)])
        node.assign([_assignment("adder.1.0", v1), _assignment("adder.1.1", v1)])  # idempotent
        assert {r.state for r in node.reports()} == {"starting"}
        await h.until(lambda: all(r.state == "ready" for r in node.reports()), "2 ready")
        reports = node.reports()
        assert [r.replica_id for r in reports] == ["adder.1.0", "adder.1.1"]
        assert all(r.url.startswith("http://127.0.0.1:") and pid_alive(r.pid) for r in reports)
        assert all(r.restarts == 0 and r.error == "" for r in reports)
        assert h.changes >= 4  # each went starting (with its url), then ready

        node.set_endpoints(_endpoints(reports))
        resp = await http.post(f"{node.url}/adder/predict", json={"instances": [[1, 2]]})
        assert resp.status_code == 200 and resp.json() == {"predictions": [3]}
        assert resp.headers["x-lepton-version"] == "1"
        assert resp.headers["x-lepton-replica"] in {"adder.1.0", "adder.1.1"}
        # The query string travels with the request.
        resp = await http.post(f"{node.url}/adder/predict?trace=1", json={"instances": [[2, 2]]})
        assert resp.json() == {"predictions": [4]}
        assert (await http.get(f"{node.url}/readyz")).status_code == 200
        status = (await http.get(f"{node.url}/status")).json()
        listed = status["deployments"]["adder"]["endpoints"]
        assert sorted(e["replica_id"] for e in listed) == ["adder.1.0", "adder.1.1"]
        assert {e["url"] for e in listed} == {r.url for r in reports}
        metrics = (await http.get(f"{node.url}/metrics")).text
        assert 'lepton_lb_requests_total{code="200",deployment="adder"}' in metrics
        missing = await http.post(f"{node.url}/nope/predict", json={"instances": [[1]]})
        assert missing.status_code == 404
        assert missing.json() == {"error": "no deployment named 'nope'"}

        await _restart_after_kill(h, http)
        await _kill_when_hung(h)
        await _stop_unlisted(h, v1)
        await _refuse_too_many(h, v1)
        # A new leader re-sends what it adopted without a target: the replica runs on.
        kept = h.report("adder.1.0")
        node.assign([_assignment("adder.1.0", "")])
        await asyncio.sleep(0.2)
        assert h.node.reports() == [kept]


async def _restart_after_kill(h: _Node, http: httpx.AsyncClient) -> None:
    before = h.report("adder.1.0")
    assert before is not None
    os.kill(before.pid, signal.SIGKILL)

    def back() -> bool:
        r = h.report("adder.1.0")
        return r is not None and r.state == "ready" and r.restarts == 1 and r.pid != before.pid

    await h.until(back, "adder.1.0 restarted")
    assert not pid_alive(before.pid)
    after = h.report("adder.1.0")
    assert after is not None and pid_alive(after.pid) and after.url != before.url
    other = h.report("adder.1.1")
    assert other is not None and other.restarts == 0 and other.state == "ready"
    # The leader's next table names the new url; traffic flows to both again.
    h.node.set_endpoints(_endpoints(h.node.reports()))
    seen = set()
    for _ in range(10):
        resp = await http.post(f"{h.node.url}/adder/predict", json={"instances": [[1, 2]]})
        assert resp.json() == {"predictions": [3]}
        seen.add(resp.headers["x-lepton-replica"])
    assert seen <= {"adder.1.0", "adder.1.1"}


async def _kill_when_hung(h: _Node) -> None:
    """A local replica in the table that stops answering fails the balancer's liveness
    probes and is killed, then restarted like any exit."""
    hung = h.report("adder.1.0")
    assert hung is not None and hung.restarts == 1
    os.kill(hung.pid, signal.SIGSTOP)

    def back() -> bool:
        r = h.report("adder.1.0")
        return r is not None and r.state == "ready" and r.restarts == 2

    await h.until(back, "hung adder.1.0 replaced")
    assert not pid_alive(hung.pid)


async def _stop_unlisted(h: _Node, v1: str) -> None:
    going = h.report("adder.1.1")
    assert going is not None
    h.node.assign([_assignment("adder.1.0", v1)])
    assert h.state("adder.1.1") == "stopping"
    assert pid_alive(going.pid)  # still serving through the grace period
    # Listed again while stopping: it stops, then starts afresh.
    h.node.assign([_assignment("adder.1.0", v1), _assignment("adder.1.1", v1)])
    assert h.state("adder.1.1") == "stopping"

    def fresh() -> bool:
        r = h.report("adder.1.1")
        return r is not None and r.state == "ready" and r.pid != going.pid

    await h.until(fresh, "adder.1.1 started again")
    assert not pid_alive(going.pid)
    again = h.report("adder.1.1")
    assert again is not None
    h.node.assign([_assignment("adder.1.0", v1)])
    assert h.state("adder.1.1") == "stopping"
    await h.until(lambda: h.state("adder.1.1") == "gone", "adder.1.1 gone")
    assert not pid_alive(again.pid)
    assert [r.replica_id for r in h.node.reports()] == ["adder.1.0"]


async def _refuse_too_many(h: _Node, v1: str) -> None:
    before = h.node.reports()
    too_many = [_assignment(f"adder.1.{i}", v1) for i in range(REPLICAS_MAX + 1)]
    with pytest.raises(ValueError, match="at most 3"):
        h.node.assign(too_many)
    await asyncio.sleep(0.2)
    assert h.node.reports() == before


@pytest.mark.timeout(120)
def test_node_runs_routes_restarts_and_stops_replicas(tmp_path: Path) -> None:
    asyncio.run(_lifecycle(tmp_path))


async def _bad_target(tmp_path: Path) -> None:
    v1, _ = _models(tmp_path)
    (tmp_path / "broken.py").write_text("raise RuntimeError('model weights missing')\n")
    async with _running() as h, httpx.AsyncClient(timeout=10.0) as http:
        node = h.node
        node.assign(
            [_assignment("adder.1.0", v1), _assignment("broken.1.0", f"{tmp_path}/broken.py:f")]
        )
        await h.until(lambda: h.state("adder.1.0") == "ready", "adder ready")
        await h.until(lambda: h.state("broken.1.0") == "failed", "broken failed")
        broken = h.report("broken.1.0")
        assert broken is not None and "model weights missing" in broken.error
        assert broken.pid == 0 and broken.url == ""
        node.set_endpoints(_endpoints(node.reports()))
        resp = await http.post(f"{node.url}/adder/predict", json={"instances": [[5, 5]]})
        assert resp.json() == {"predictions": [10]}
        # Retried at the back-off (at once, then 1 s, 2 s, ...), not in a tight loop.
        await asyncio.sleep(2.5)
        broken = h.report("broken.1.0")
        assert broken is not None and broken.state == "failed" and 1 <= broken.restarts <= 3
        good = h.report("adder.1.0")
        assert good is not None and good.state == "ready" and good.restarts == 0
        # Taking the broken one away leaves the good one serving.
        node.assign([_assignment("adder.1.0", v1)])
        await h.until(lambda: h.state("broken.1.0") == "gone", "broken gone")
        assert h.state("adder.1.0") == "ready"


@pytest.mark.timeout(90)
def test_a_bad_target_fails_alone_and_is_retried_at_the_backoff(tmp_path: Path) -> None:
    asyncio.run(_bad_target(tmp_path))


async def _switch(tmp_path: Path) -> None:
    v1, v2 = _models(tmp_path)
    a = [_assignment("adder.1.0", v1, 1), _assignment("adder.1.1", v1, 1)]
    b = [_assignment("adder.2.0", v2, 2), _assignment("adder.2.1", v2, 2)]
    async with (
        _running(stop_grace_s=1.0, replicas_max=4) as h,
        httpx.AsyncClient(timeout=10.0) as http,
    ):
        node = h.node
        node.assign(a)
        await h.until(lambda: all(r.state == "ready" for r in node.reports()), "A ready")
        node.set_endpoints(_endpoints(node.reports()))
        versions: Counter[str] = Counter()
        failures: list[str] = []
        switched = asyncio.Event()

        async def load() -> None:
            sent = 0
            while sent < 200 or not switched.is_set():
                resp = await http.post(f"{node.url}/adder/predict", json={"instances": [[1, 2]]})
                sent += 1
                if resp.status_code != 200:
                    failures.append(f"{resp.status_code} {resp.text}")
                    continue
                versions[resp.headers["x-lepton-version"]] += 1
                if resp.json() not in ({"predictions": [3]}, {"predictions": [103]}):
                    failures.append(resp.text)

        async def switch() -> None:
            node.assign(b + a)
            b_ids = {x.replica_id for x in b}
            ready = {r.replica_id for r in node.reports() if r.state == "ready"}
            await h.until(lambda: b_ids <= _ready_ids(node), "B ready")
            assert {x.replica_id for x in a} <= ready
            node.set_endpoints(_endpoints([r for r in node.reports() if r.replica_id in b_ids]))
            node.assign(b)
            await h.until(lambda: {r.replica_id for r in node.reports()} == b_ids, "A gone")
            switched.set()

        async with asyncio.TaskGroup() as tg:
            tg.create_task(load())
            tg.create_task(switch())
        assert failures == []
        assert versions["1"] > 0 and versions["2"] > 0
        last = await http.post(f"{node.url}/adder/predict", json={"instances": [[1, 2]]})
        assert last.json() == {"predictions": [103]} and last.headers["x-lepton-version"] == "2"


def _ready_ids(node: NodeServing) -> set[str]:
    return {r.replica_id for r in node.reports() if r.state == "ready"}


@pytest.mark.timeout(120)
def test_requests_keep_succeeding_while_the_table_switches_versions(tmp_path: Path) -> None:
    asyncio.run(_switch(tmp_path))


@pytest.mark.timeout(30)
def test_identity_headers_only_when_given() -> None:
    """What ``--version``/``--replica-id`` turn on; a local ``lepton serve`` has neither."""
    target = Target("t", lambda xs: [sum(x) for x in xs], None)
    ids = {"x-lepton-version": "7", "x-lepton-replica": "adder.7.0"}
    with TestClient(build_app(target, headers=ids)) as client:
        for resp in (client.post("/predict", json={"instances": [[1]]}), client.get("/nope")):
            assert {k: resp.headers.get(k) for k in ids} == ids
    with TestClient(build_app(target)) as client:
        resp = client.post("/predict", json={"instances": [[1]]})
        assert resp.json() == {"predictions": [1]}
        assert not any(k.startswith("x-lepton") for k in resp.headers)


async def _known_but_not_ready() -> None:
    node = NodeServing("127.0.0.1")
    await node.start()
    runner = asyncio.create_task(node.run())
    try:
        node.set_endpoints([], ["ghost"])  # it exists; none of its replicas is ready yet
        async with httpx.AsyncClient(timeout=5.0) as http:
            known = await http.post(f"{node.url}/ghost/predict", json={"instances": [[1]]})
            unknown = await http.post(f"{node.url}/nobody/predict", json={"instances": [[1]]})
        # 503: try another entry point or later (ServeClient does); 404: no such thing.
        assert known.status_code == 503, known.text
        assert unknown.status_code == 404 and "no deployment named" in unknown.text
        with pytest.raises(ValueError, match="at most"):
            node.set_endpoints([], [f"d{i}" for i in range(NODE_DEPLOYMENTS_MAX + 1)])
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner


@pytest.mark.timeout(30)
def test_a_deployment_with_no_ready_replica_is_503_not_404() -> None:
    asyncio.run(_known_but_not_ready())
