"""`lepton cluster up|status|down` and `lepton chaos` against a background cluster."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from helpers import lepton
from lepton_ai.node.process import pid_alive


@pytest.mark.timeout(120)
def test_up_status_chaos_down(tmp_path: Path) -> None:
    env = dict(os.environ, LEPTON_STATE_FILE=str(tmp_path / "state.json"))
    env.pop("LEPTON_TOKEN", None)
    # One coordinator (the default, 3, is test_ha_cli's): its pids are
    # [supervisor, coordinator, w0, w1].
    up = lepton("cluster", "up", "--workers", "2", "--coordinators", "1", "--json", env=env)
    assert up.returncode == 0, up.stderr
    state = json.loads(up.stdout)
    pids: list[int] = list(state["pids"])
    try:
        assert len(pids) == 4 and all(pid_alive(p) for p in pids)
        assert state["supervisor"] == pids[0]
        again = lepton("cluster", "up", env=env)
        assert again.returncode != 0 and "already up" in again.stderr

        st = lepton("cluster", "status", "--json", env=env)
        assert st.returncode == 0, st.stderr
        members = json.loads(st.stdout)["members"]
        executors = [m for m in members if m["role"] == "executor"]
        pids += [m["pid"] for m in executors]
        pids += [m["pid"] for m in members]
        roles = {m["role"] for m in members} - {"spare"}  # spares: warm replacements
        assert roles == {"coordinator", "worker", "executor"}

        killed = lepton("chaos", "kill", "executor", "0", "--json", env=env)
        assert killed.returncode == 0, killed.stderr
        victim = json.loads(killed.stdout)["pid"]
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # the agent replaces its executor
            members = json.loads(lepton("cluster", "status", "--json", env=env).stdout)["members"]
            fresh = [m for m in members if m["role"] == "executor" and m["health"] == "idle"]
            if len(fresh) == 2 and victim not in [m["pid"] for m in fresh]:
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"executor {victim} was not replaced: {members}")
        pids += [m["pid"] for m in members]

        bad = lepton("chaos", "kill", "worker", "9", env=env)
        assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1

        # The supervisor dies: the members live on, unsupervised, and say so; down
        # still stops every one of them.
        os.kill(state["supervisor"], signal.SIGKILL)
        time.sleep(0.3)
        st = json.loads(lepton("cluster", "status", "--json", env=env).stdout)
        assert st["supervisor"] == {"pid": state["supervisor"], "alive": False}, st
        assert all(pid_alive(p) for p in pids[1:4])
        down = lepton("cluster", "down", "--json", env=env)
        assert down.returncode == 0, down.stderr
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
            time.sleep(0.05)
        assert not [p for p in pids if pid_alive(p)]
        gone = lepton("cluster", "status", env=env)
        assert gone.returncode != 0 and "no running cluster" in gone.stderr
    finally:
        for pid in pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
