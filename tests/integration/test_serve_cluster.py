"""Deployments as cluster state, with real processes (3 coordinators, 2 worker nodes).

A deployment created by a driver that is then SIGKILLed is found by another
process and keeps serving; a node with replicas, the leader, and a rolling update
cost no request through ``lep.ServeClient`` (which fails over between the nodes'
balancers); a delete stops every replica process.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import lepton_ai as lep
from helpers import wait_until
from lepton_ai.node.process import pid_alive

MODEL_V1 = "def predict(instances):\n    return [sum(x) for x in instances]\n"
MODEL_V2 = "def predict(instances):\n    return [10 * sum(x) for x in instances]\n"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    with lep.LocalCluster(workers=2) as c:
        c.wait_ready(2)
        yield c


@pytest.fixture
def models(tmp_path: Path) -> tuple[str, str]:
    (tmp_path / "m1.py").write_text(MODEL_V1)
    (tmp_path / "m2.py").write_text(MODEL_V2)
    return f"{tmp_path / 'm1.py'}:predict", f"{tmp_path / 'm2.py'}:predict"


class Load:
    """Requests back to back through a ``ServeClient`` on a thread: answers by version,
    failures with their reason."""

    def __init__(self, urls: list[str]) -> None:
        self.client = lep.ServeClient(urls)
        self.versions: Counter[str] = Counter()
        self.answers: Counter[int] = Counter()
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                r = self.client.post("/predict", {"instances": [[1, 2]]})
                self.answers[r.json()["predictions"][0]] += 1
                self.versions[r.headers.get("x-lepton-version", "?")] += 1
            except Exception as exc:  # every failure is a finding
                self.failures.append(f"{type(exc).__name__}: {exc}"[:300])

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        self.client.close()

    @property
    def done(self) -> int:
        return sum(self.answers.values()) + len(self.failures)


@pytest.mark.timeout(120)
def test_a_deployment_outlives_its_driver_and_keeps_serving(
    cluster: Any, models: tuple[str, str]
) -> None:
    v1, _ = models
    script = textwrap.dedent(
        f"""
        import os, lepton_ai as lep
        c = lep.connect({cluster.address!r}, token={cluster.token!r})
        dep = lep.Deployment({v1!r}, replicas=2, cluster=c, name="outlive")
        dep.wait_ready(60)
        print("ready", flush=True)
        os.kill(os.getpid(), 9)  # the driver dies without closing anything
        """
    )
    driver = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=90, check=False
    )
    assert driver.returncode == -9 and "ready" in driver.stdout, driver.stderr[-2000:]
    dep = lep.Deployment.get(cluster, "outlive")
    assert dep.version == 1 and sorted(r["state"] for r in dep.status()) == ["ready"] * 2
    nodes = {r["node"] for r in dep.status()}
    assert len(nodes) == 2, dep.status()  # spread over both nodes
    with lep.ServeClient(dep.urls) as client:
        for url in dep.urls:  # every node's balancer serves it
            assert lep.ServeClient(url).predict([[1, 2], [3, 4]]) == [3, 7]
        assert client.predict([[5, 5]]) == [10]
    dep.delete()
    with pytest.raises(KeyError):
        lep.Deployment.get(cluster, "outlive")


@pytest.mark.timeout(180)
def test_node_kill_leader_kill_and_rolling_update_fail_no_request(
    cluster: Any, models: tuple[str, str]
) -> None:
    v1, v2 = models
    dep = lep.Deployment(v1, replicas=2, cluster=cluster, name="steady").wait_ready(60)
    try:
        with Load(dep.urls) as load:
            wait_until(lambda: load.done >= 50, 30, "first answers")
            # A node with a replica: its replica (and balancer) die with it.
            victim = dep.status()[0]
            node = victim["node"]
            cluster.kill("worker", node)
            wait_until(lambda: not pid_alive(victim["pid"]), 10, "the replica gone with its node")
            dep.wait_ready(60)  # the count is restored (on a new incarnation or the other)
            assert victim["id"] not in {r["id"] for r in dep.status()}
            before = load.done
            wait_until(lambda: load.done >= before + 50, 30, "answers after the node kill")
            # The leader.
            cluster.kill("leader")
            time.sleep(1.0)
            before = load.done
            wait_until(lambda: load.done >= before + 50, 30, "answers after the leader kill")
            # A rolling update: every answer from v1 or v2, never an error.
            assert dep.update(v2, timeout_s=120) == 2
            before = load.done
            wait_until(lambda: load.done >= before + 50, 30, "answers after the update")
        print(f"answers {dict(load.answers)} versions {dict(load.versions)}")
        assert not load.failures, load.failures[:5]
        assert set(load.answers) <= {3, 30} and load.answers[30] > 0, load.answers
        assert set(load.versions) <= {"1", "2"}, load.versions
        assert {r["version"] for r in dep.status()} == {2}
        # Rollback: version 3 serves the first target again.
        assert dep.rollback(timeout_s=120) == 3
        assert lep.ServeClient(dep.urls).predict([[1, 2]]) == [3]
    finally:
        pids = dep.pids()
        dep.delete()
    wait_until(lambda: not any(pid_alive(p) for p in pids), 30, "every replica stopped")


@pytest.mark.timeout(60)
def test_bad_input_is_refused_at_once_and_changes_nothing(
    cluster: Any, models: tuple[str, str], tmp_path: Path
) -> None:
    v1, _ = models
    with pytest.raises(ValueError, match="deployment name"):
        lep.Deployment(v1, cluster=cluster, name="Not A Name")
    with pytest.raises(ValueError, match="replicas"):
        lep.Deployment(v1, replicas=65, cluster=cluster, name="toomany")
    with pytest.raises(ValueError, match="does not exist"):
        lep.Deployment(str(tmp_path / "nope.py:predict"), cluster=cluster, name="nofile")
    with pytest.raises(KeyError):
        lep.Deployment.get(cluster, "never-made")
    dep = lep.Deployment(v1, replicas=1, cluster=cluster, name="once").wait_ready(60)
    try:
        with pytest.raises(FileExistsError):
            lep.Deployment(v1, replicas=3, cluster=cluster, name="once")
        assert len(dep.status()) == 1
        # A target that cannot load: the error is reported, the old version serves on.
        (tmp_path / "broken.py").write_text("raise RuntimeError('no model here')\n")
        with pytest.raises(lep.DeploymentFailed, match="no model here"):
            dep.update(f"{tmp_path / 'broken.py'}:predict", timeout_s=60)
        assert lep.ServeClient(dep.urls).predict([[2, 2]]) == [4]
    finally:
        dep.delete()


SLOW_MODEL = """import time

def predict(instances):
    time.sleep(0.1)
    return [sum(x) for x in instances]
"""


@pytest.mark.timeout(120)
def test_autoscaling_follows_a_burst_up_and_back_down(cluster: Any, tmp_path: Path) -> None:
    (tmp_path / "slow.py").write_text(SLOW_MODEL)
    dep = lep.Deployment(
        f"{tmp_path / 'slow.py'}:predict",
        replicas=1,
        cluster=cluster,
        name="bursty",
        max_replicas=3,
        target_inflight=2,
        scale_up_delay_s=0.5,
        scale_down_delay_s=2.0,
    ).wait_ready(60)
    stop = threading.Event()
    failures: list[str] = []

    def caller() -> None:
        with lep.ServeClient(dep.urls) as client:
            while not stop.is_set():
                try:
                    assert client.predict([[1, 1]]) == [2]
                except Exception as exc:  # every failure is a finding
                    failures.append(repr(exc)[:200])

    threads = [threading.Thread(target=caller, daemon=True) for _ in range(8)]
    try:
        for t in threads:
            t.start()
        # 8 requests in flight, 2 wanted per replica: 4, capped at 3.
        wait_until(lambda: sum(r["ready"] for r in dep.status()) == 3, 60, "3 replicas under load")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not failures, failures[:5]
    # The burst is over: back to min_replicas (1) after the scale-down delay.
    wait_until(lambda: len(dep.status()) == 1, 60, "back to 1 replica")
    events = [e["detail"] for e in cluster.events() if e["kind"] == "autoscaled"]
    assert any("bursty: 1 -> 3" in d for d in events), events
    assert "-> 1 replicas (0 requests in flight" in events[-1], events  # maybe via 2
    dep.delete()


@pytest.mark.timeout(120)
def test_models_from_the_object_store_load_on_every_node(cluster: Any) -> None:
    """``lep://`` targets: a ``.py`` file and a pickled model put in the cluster's store
    are fetched by each replica wherever it runs; a missing one is refused at once."""
    import functools
    import pickle

    code = "def predict(instances):\n    return [2 * sum(x) for x in instances]\n"
    cluster.storage.put("models/double.py", code.encode())
    cluster.storage.put("models/sorter.pkl", pickle.dumps(functools.partial(sorted)))
    with pytest.raises(ValueError, match="no object"):
        lep.Deployment("lep://models/nope.pkl", cluster=cluster, name="nope")
    dep = lep.Deployment("lep://models/double.py:predict", replicas=2, cluster=cluster, name="lp")
    try:
        dep.wait_ready(60)
        assert len({r["node"] for r in dep.status()}) == 2
        for url in dep.urls:
            assert lep.ServeClient(url).predict([[1, 2], [3, 4]]) == [6, 14]
        assert dep.update("lep://models/sorter.pkl", timeout_s=60) == 2
        assert lep.ServeClient(dep.urls).predict([[3], [1], [2]]) == [[1], [2], [3]]
    finally:
        dep.delete()


@pytest.mark.timeout(180)
def test_the_deploy_command_drives_a_deployment_end_to_end(
    cluster: Any, models: tuple[str, str]
) -> None:
    import json

    from helpers import lepton

    v1, v2 = models
    on = ("--address", cluster.address, "--token", cluster.token, "--json")

    def deploy(*args: str) -> dict[str, Any]:
        out = lepton("deploy", *args, *on)
        assert out.returncode == 0, out.stderr
        doc: dict[str, Any] = json.loads(out.stdout)
        return doc

    doc = deploy("create", "cli-dep", v1, "--replicas", "1")
    assert (doc["version"], doc["replicas"], doc["ready"]) == (1, 1, 1)
    assert lep.ServeClient(doc["urls"]).predict([[1, 2]]) == [3]
    assert deploy("scale", "cli-dep", "2")["ready"] == 2
    doc = deploy("update", "cli-dep", v2)
    assert doc["version"] == 2 and {r["version"] for r in doc["status"]} == {2}
    assert lep.ServeClient(doc["urls"]).predict([[1, 2]]) == [30]
    assert deploy("rollback", "cli-dep")["version"] == 3
    listed = deploy("status")["deployments"]
    assert "cli-dep" in [d["name"] for d in listed], listed
    assert deploy("rm", "cli-dep") == {"deleted": "cli-dep"}
    gone = lepton("deploy", "status", "cli-dep", *on)
    assert gone.returncode == 1 and "no deployment named 'cli-dep'" in gone.stderr, gone
    bad = lepton("deploy", "create", "Bad_Name", v1, *on)
    assert bad.returncode == 1 and "deployment name" in bad.stderr, bad
