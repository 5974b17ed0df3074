"""Deployments as real processes on 127.0.0.1: the Python API, `lepton serve`, the iris
example, a model file, scaling, start-up failures, and cleanup on every exit path.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

import lepton_ai as lep
from helpers import pids_left, wait_until
from lepton_ai.serve.target import TargetError

ROOT = Path(__file__).resolve().parents[2]
IRIS = f"{ROOT}/examples/iris_serve.py:predict"
ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]


@contextlib.contextmanager
def _lepton_serve(*args: str) -> Iterator[subprocess.Popen[str]]:
    cmd = [sys.executable, "-m", "lepton_ai.cli", "serve", *args]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


@pytest.mark.timeout(60)
def test_deployment_api_predicts_scales_and_cleans_up(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text("def predict(xs):\n    return [sum(x) for x in xs]\n")
    seen: set[int] = set()
    with lep.Deployment(f"{tmp_path}/m.py:predict", replicas=2) as dep:
        status = dep.status()
        seen.update(r["pid"] for r in status)
        assert [r["id"] for r in status] == [0, 1]
        assert all(r["ready"] and r["restarts"] == 0 for r in status)
        assert all(r["url"].startswith("http://127.0.0.1:") for r in status)
        assert dep.url.startswith("http://127.0.0.1:")
        resp = httpx.post(f"{dep.url}/predict", json={"instances": [[1, 2], [3, 4]]})
        assert resp.json() == {"predictions": [3, 7]}
        assert httpx.post(f"{dep.url}/predict", content=b"{").status_code == 400
        # A replica answers on its own URL too (what the balancer talks to).
        assert httpx.get(f"{status[0]['url']}/healthz").status_code == 200
        dep.scale(3)
        assert [r["ready"] for r in dep.status()] == [True, True, True]
        seen.update(dep.pids())
        dep.scale(1)
        assert [r["id"] for r in dep.status()] == [0]  # the newest were drained first
        assert httpx.post(f"{dep.url}/predict", json={"instances": [[1]]}).status_code == 200
        metrics = httpx.get(f"{dep.url}/metrics").text
        assert "lepton_lb_requests_total" in metrics
        with pytest.raises(ValueError):
            dep.scale(0)
    assert pids_left(sorted(seen), 10.0) == []


def _wait_in_flight(dep: lep.Deployment, n: int, timeout_s: float = 10.0) -> None:
    """Until the balancer has ``n`` requests at replicas (a fixed sleep flakes on a busy host)."""
    wait_until(
        lambda: sum(r["outstanding"] for r in dep.status()) >= n,
        timeout_s,
        f"{n} requests at the replicas",
        interval_s=0.01,
    )


@pytest.mark.timeout(60)
def test_scale_down_and_stop_drain_requests_in_flight(tmp_path: Path) -> None:
    (tmp_path / "slow.py").write_text(
        "import time\ndef predict(xs):\n    time.sleep(0.5)\n    return xs\n"
    )
    with lep.Deployment(f"{tmp_path}/slow.py:predict", replicas=3) as dep:
        pids = dep.pids()
        with ThreadPoolExecutor(6) as pool:
            calls = [
                pool.submit(httpx.post, f"{dep.url}/predict", json={"instances": [i]}, timeout=10)
                for i in range(6)
            ]
            _wait_in_flight(dep, 6)  # two per replica
            dep.scale(1)
            assert [c.result().status_code for c in calls] == [200] * 6
        with ThreadPoolExecutor(2) as pool:
            calls = [
                pool.submit(httpx.post, f"{dep.url}/predict", json={"instances": [i]}, timeout=10)
                for i in range(2)
            ]
            _wait_in_flight(dep, 2)
            dep.stop()  # leaving the block drains these too
            assert [c.result().status_code for c in calls] == [200] * 2
    assert pids_left(pids, 10.0) == []


@pytest.mark.timeout(60)
def test_crash_loop_restarts_with_growing_back_off(tmp_path: Path) -> None:
    (tmp_path / "crashy.py").write_text(
        "import os\ndef predict(xs):\n    if xs == ['crash']:\n        os._exit(1)\n    return xs\n"
    )
    with lep.Deployment(f"{tmp_path}/crashy.py:predict", replicas=1) as dep:
        pids = list(dep.pids())
        waits = []
        for _ in range(3):
            resp = httpx.post(f"{dep.url}/predict", json={"instances": ["crash"]}, timeout=10)
            assert resp.status_code == 502  # died mid-request; no other replica to retry on
            t0 = time.monotonic()
            wait_until(
                lambda: dep.status()[0]["ready"] and dep.pids()[0] not in pids,
                15.0,
                "a fresh replica ready",
                interval_s=0.02,
            )
            waits.append(time.monotonic() - t0)
            pids.extend(dep.pids())
        assert dep.status()[0]["restarts"] == 3
        # 0 s, then 1 s, then 2 s of back-off (plus the start-up time of each).
        assert waits[1] >= 0.9 and waits[2] >= 1.9 and waits[2] > waits[0] + 1.0, waits
        ok = httpx.post(f"{dep.url}/predict", json={"instances": ["fine"]}, timeout=10)
        assert ok.json() == {"predictions": ["fine"]}
    assert pids_left(pids, 10.0) == []


@pytest.mark.timeout(60)
def test_joblib_model_file_with_micro_batching(tmp_path: Path) -> None:
    import joblib
    from sklearn.datasets import load_iris
    from sklearn.ensemble import RandomForestClassifier

    iris = load_iris()
    model = RandomForestClassifier(n_estimators=10, random_state=0).fit(iris.data, iris.target)
    joblib.dump(model, tmp_path / "forest.joblib")
    with lep.Deployment(
        str(tmp_path / "forest.joblib"), replicas=1, max_batch_size=16, max_wait_ms=2
    ) as dep:
        resp = httpx.post(f"{dep.url}/predict", json={"instances": ROWS})
        assert resp.json() == {"predictions": model.predict(ROWS).tolist()}
        wrong = httpx.post(f"{dep.url}/predict", json={"instances": [[1.0, 2.0]]})
        assert wrong.status_code == 400 and "4 features" in wrong.json()["error"]
        pids = dep.pids()
    assert pids_left(pids, 10.0) == []


def test_deployment_with_bad_target_fails_before_starting_anything(tmp_path: Path) -> None:
    with pytest.raises(TargetError, match="No module named"):
        lep.Deployment("no_such_module_abc:predict", replicas=2).start()
    (tmp_path / "bad.py").write_text(
        "def setup():\n    raise OSError('weights missing')\ndef predict(xs):\n    return xs\n"
    )
    with pytest.raises(lep.LeptonError, match="weights missing"):
        lep.Deployment(f"{tmp_path}/bad.py:predict", replicas=2).start()
    with pytest.raises(TypeError):
        lep.Deployment(42)  # type: ignore[arg-type]


@pytest.mark.timeout(60)
def test_lepton_serve_iris_then_ctrl_c_stops_everything() -> None:
    with _lepton_serve(IRIS, "--replicas", "2", "--port", "0", "--json") as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        info = json.loads(line)
        pids = [r["pid"] for r in info["replicas"]]
        assert len(pids) == 2
        resp = httpx.post(f"{info['url']}/predict", json={"instances": ROWS}, timeout=10)
        assert resp.json() == {"predictions": ["setosa", "virginica"]}
        bad = httpx.post(f"{info['url']}/predict", json={"instances": [[1.0]]}, timeout=10)
        assert bad.status_code == 400
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
    assert pids_left(pids, 10.0) == []


@pytest.mark.timeout(60)
def test_replicas_exit_when_lepton_serve_is_killed(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text("def predict(xs):\n    return xs\n")
    with _lepton_serve(
        f"{tmp_path}/m.py:predict", "--replicas", "2", "--port", "0", "--json"
    ) as proc:
        assert proc.stdout is not None
        pids = [r["pid"] for r in json.loads(proc.stdout.readline())["replicas"]]
        proc.kill()  # no chance to clean up: the replicas' watchdog must notice
        proc.wait(10)
        assert pids_left(pids, 5.0) == []


def test_lepton_serve_unimportable_target_exits_nonzero_with_reason() -> None:
    t0 = time.monotonic()
    with _lepton_serve("no_such_module_abc:predict", "--port", "0") as proc:
        out, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert "No module named 'no_such_module_abc'" in err
    assert "127.0.0.1" not in out  # no URL: nothing was bound
    assert time.monotonic() - t0 < 20


def test_port_in_use_fails_clearly_and_leaves_nothing_running(tmp_path: Path) -> None:
    import psutil

    (tmp_path / "m.py").write_text("def predict(xs):\n    return xs\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
            lep.Deployment(f"{tmp_path}/m.py:predict", replicas=2, port=port).start()
    started = [p.pid for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert pids_left(started, 5.0) == []


@pytest.mark.timeout(60)
def test_lepton_serve_listens_where_told(tmp_path: Path) -> None:
    """``--host``: the balancer binds that address (127.0.0.2, another loopback one)
    and says so; 127.0.0.1 then has nothing on that port."""
    (tmp_path / "m.py").write_text("def predict(xs):\n    return xs\n")
    with _lepton_serve(
        f"{tmp_path}/m.py:predict", "--port", "0", "--host", "127.0.0.2", "--json"
    ) as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        url = json.loads(line)["url"]
        assert url.startswith("http://127.0.0.2:"), url
        assert httpx.post(f"{url}/predict", json={"instances": [7]}).json() == {"predictions": [7]}
        with pytest.raises(httpx.ConnectError):
            httpx.post(url.replace("127.0.0.2", "127.0.0.1") + "/predict", json={})
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
