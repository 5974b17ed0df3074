"""`lepton cluster up|status|down` and `lepton chaos` against a background cluster."""

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

        def replaced() -> list[dict[str, Any]] | None:
            members = json.loads(lepton("cluster", "status", "--json", env=env).stdout)["members"]
            fresh = [m for m in members if m["role"] == "executor" and m["health"] == "idle"]
            ok = len(fresh) == 2 and victim not in [m["pid"] for m in fresh]
            return list(members) if ok else None

        members = wait_until(replaced, 15.0, f"executor {victim} replaced by its agent")
        pids += [m["pid"] for m in members]

        bad = lepton("chaos", "kill", "worker", "9", env=env)
        assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1

        # The supervisor dies: the members live on, unsupervised, and say so; down
        # still stops every one of them.
        os.kill(state["supervisor"], signal.SIGKILL)
        wait_until(lambda: not pid_alive(state["supervisor"]), 5.0, "the supervisor gone")
        st = json.loads(lepton("cluster", "status", "--json", env=env).stdout)
        assert st["supervisor"] == {"pid": state["supervisor"], "alive": False}, st
        assert all(pid_alive(p) for p in pids[1:4])
        down = lepton("cluster", "down", "--json", env=env)
        assert down.returncode == 0, down.stderr
        assert not pids_left(pids, 10.0)
        gone = lepton("cluster", "status", env=env)
        assert gone.returncode != 0 and "no running cluster" in gone.stderr
    finally:
        for pid in pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def _loose(root: Path) -> list[str]:
    """Files and directories under ``root`` that anyone but their owner can read."""
    return [
        f"{p} {oct(p.stat().st_mode & 0o777)}"
        for p in [root, *root.rglob("*")]
        if p.stat().st_mode & 0o077 and not p.is_symlink()
    ]


@pytest.mark.timeout(120)
def test_files_are_private_from_the_start(tmp_path: Path) -> None:
    """State file (token), log, WAL, stored objects and shuffle files: 0600 files in
    0700 directories, also where the caller's umask is 022."""
    import lepton_ai as lep

    home = tmp_path / "home" / ".lepton"  # does not exist yet: `cluster up` makes it
    env = dict(os.environ, LEPTON_STATE_FILE=str(home / "cluster.json"))
    env.pop("LEPTON_TOKEN", None)
    old = os.umask(0o022)
    try:
        up = lepton("cluster", "up", "--workers", "1", "--coordinators", "1", "--json", env=env)
    finally:
        os.umask(old)
    assert up.returncode == 0, up.stderr
    state = json.loads(up.stdout)
    try:
        cluster = lep.connect(state["address"], token=state["token"])
        cluster.storage.put("private/x", b"secret" * 1000)
        task = lep.DistributedTask(cluster)
        pairs = task.parallelize(range(100), partitions=4).map(lambda x: (x % 3, x))
        assert dict(pairs.reduce_by_key(lambda a, b: a + b, partitions=2).collect()) == {
            0: sum(range(0, 100, 3)),
            1: sum(range(1, 100, 3)),
            2: sum(range(2, 100, 3)),
        }
        cluster.close()
        assert not _loose(home), _loose(home)
    finally:
        down = lepton("cluster", "down", env=env)
        assert down.returncode == 0, down.stderr


@pytest.mark.timeout(120)
def test_cli_version_unknown_job_events_and_a_closed_pipe(tmp_path: Path) -> None:
    import subprocess
    import sys

    version = lepton("--version")
    assert version.returncode == 0 and version.stdout.startswith("lepton_ai "), version
    env = dict(os.environ, LEPTON_STATE_FILE=str(tmp_path / "state.json"))
    env.pop("LEPTON_TOKEN", None)
    up = lepton("cluster", "up", "--workers", "1", "--coordinators", "1", env=env)
    assert up.returncode == 0, up.stderr
    try:
        nope = lepton("job", "events", "nope", env=env)
        assert nope.returncode == 1 and "unknown job nope" in nope.stderr, nope
        # `lepton cluster events | head -1`: the reader leaves early; no error, no noise.
        events = subprocess.Popen(
            [sys.executable, "-m", "lepton_ai.cli", "cluster", "events"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert events.stdout is not None and events.stderr is not None
        events.stdout.close()  # as `head` does once it has its line
        err = events.stderr.read().decode()
        assert events.wait(60) == 0 and "Broken pipe" not in err, err
        line = lepton("cluster", "events", "--last", "1", env=env).stdout
        assert line[2] == ":" and line[5] == ":" and line[8] == ".", line  # HH:MM:SS.mmm
    finally:
        assert lepton("cluster", "down", env=env).returncode == 0


@pytest.mark.timeout(120)
def test_a_new_cluster_up_starts_empty_unless_given_its_data_dir(tmp_path: Path) -> None:
    import lepton_ai as lep

    env = dict(os.environ, LEPTON_STATE_FILE=str(tmp_path / "state.json"))
    env.pop("LEPTON_TOKEN", None)

    def up_put_down(*extra: str, put: bool) -> bool:
        """Start a cluster, optionally store an object; whether it was there; stop it."""
        up = lepton(
            "cluster", "up", "--workers", "1", "--coordinators", "1", "--json", *extra, env=env
        )
        assert up.returncode == 0, up.stderr
        state = json.loads(up.stdout)
        try:
            with lep.connect(state["address"], token=state["token"]) as c:
                found = bool(c.storage.list("kept/"))
                if put:
                    c.storage.put("kept/x", b"data", replicas=1)
            return found
        finally:
            assert lepton("cluster", "down", env=env).returncode == 0

    assert not up_put_down(put=True)
    assert not up_put_down(put=False)  # the default directory was emptied
    keep = str(tmp_path / "mine")
    assert not up_put_down("--data-dir", keep, put=True)
    assert up_put_down("--data-dir", keep, put=False)  # an explicit one is kept
