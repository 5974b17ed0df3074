"""`lepton cluster up --coordinators 3`, `chaos kill leader`, `cluster events`, `job` and `down`."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from helpers import lepton, pids_left, wait_until
from lepton_ai.node.process import pid_alive


@pytest.mark.timeout(120)
def test_three_coordinators_from_the_cli_survive_a_leader_kill(tmp_path: Path) -> None:
    env = dict(os.environ, LEPTON_STATE_FILE=str(tmp_path / "state.json"))
    env.pop("LEPTON_TOKEN", None)
    up = lepton("cluster", "up", "--workers", "2", "--coordinators", "3", "--json", env=env)
    assert up.returncode == 0, up.stderr
    state = json.loads(up.stdout)
    pids: list[int] = list(state["pids"])
    try:
        # [supervisor, 3 coordinators, 2 workers]
        assert len(pids) == 6 and len(state["address"].split(",")) == 3
        st = json.loads(lepton("cluster", "status", "--json", env=env).stdout)
        coordinators = [m for m in st["members"] if m["role"] == "coordinator"]
        assert sorted(m["health"] for m in coordinators) == ["follower", "follower", "leader"]
        pids += [m["pid"] for m in st["members"] if m["pid"]]

        # Every coordinator's real pid (a remote status: each replica reports its own).
        def status() -> dict[str, Any]:
            return dict(json.loads(lepton("cluster", "status", "--json", env=env).stdout))

        def real_pids() -> list[dict[str, Any]] | None:
            coords = [m for m in status()["members"] if m["role"] == "coordinator"]
            return coords if all(m["pid"] in state["pids"] for m in coords) else None

        coordinators = wait_until(real_pids, 10.0, "every coordinator's real pid")

        # The KV and replica commands find the cluster like every other (no --peers).
        put = lepton("kv", "put", "greeting", "hello", env=env)
        assert put.returncode == 0, put.stderr
        got = lepton("kv", "get", "greeting", "--json", env=env)
        assert got.returncode == 0 and json.loads(got.stdout)["value"] == "hello", got
        replicas = lepton("cluster", "replicas", "--json", env=env)
        assert replicas.returncode == 0 and len(json.loads(replicas.stdout)["replicas"]) == 3

        killed = lepton("chaos", "kill", "leader", "0", "--json", env=env)
        assert killed.returncode == 0, killed.stderr
        old = json.loads(killed.stdout)["pid"]

        def new_leader() -> bool:
            members = status()["members"]
            leaders = [m for m in members if m["health"] == "leader"]
            workers = [m for m in members if m["role"] == "worker"]
            return bool(leaders) and leaders[0]["pid"] != old and len(workers) == 2

        wait_until(new_leader, 20.0, "a new leader and both workers", interval_s=0.2)
        # The supervisor started the killed one again: it is back as a follower,
        # and status says it was restarted once and why.
        killed_id = next(m["id"] for m in coordinators if m["pid"] == old)

        def restarted() -> tuple[dict[str, Any], dict[str, Any]] | None:
            st = status()
            back = next(
                m for m in st["members"] if m["id"] == killed_id and m["role"] == "coordinator"
            )
            return (st, back) if back["health"] == "follower" and back["restarts"] == 1 else None

        st, back = wait_until(
            restarted, 20.0, f"coordinator {killed_id} back as a follower", interval_s=0.2
        )
        assert back["last_exit"] == "killed by SIGKILL" and back["pid"] != old, back
        assert st["supervisor"]["alive"], st
        pids.append(back["pid"])
        ev = lepton("cluster", "events", "--json", env=env)
        assert ev.returncode == 0, ev.stderr
        kinds = [e["kind"] for e in json.loads(ev.stdout)["events"]]
        assert kinds.count("leader_elected") >= 2, kinds
        # The joins the first leader saw are still there, beside the re-registrations.
        assert kinds.count("worker_joined") >= 4, kinds
        text = lepton("cluster", "events", "--last", "3", env=env)
        assert text.returncode == 0 and len(text.stdout.strip().splitlines()) == 3

        down = lepton("cluster", "down", "--json", env=env)
        assert down.returncode == 0, down.stderr
        assert not pids_left(pids, 10.0)
    finally:
        for pid in pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
