"""examples/iris_forest.py on a real LocalCluster: merged forest, accuracy, under 30 s."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from helpers import kill_marked

ROOT = Path(__file__).resolve().parents[2]
MARKER = "LEPTON_TEST_EXAMPLE_MARKER"


@pytest.mark.timeout(120)
def test_iris_forest_trains_merges_and_scores() -> None:
    marker = uuid.uuid4().hex
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "examples" / "iris_forest.py"),
            "--json",
            "--trees",
            "120",
            "--shares",
            "6",
        ],
        env=dict(os.environ, **{MARKER: marker}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=100)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        leftovers = kill_marked(MARKER, marker)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, err[-3000:]
    assert leftovers == []
    res = json.loads(out)
    assert res["trees"] == res["trees_fitted"] == 120
    assert res["map_tasks"] == 6
    assert res["matches_serial_forest"] is True
    assert res["accuracy"] >= 0.9
    assert wall < 60, f"took {wall:.1f} s (target: under 30 s on an idle machine)"


def test_iris_serve_caches_its_model_in_a_private_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not in a shared /tmp: another local user could plant a pickle there."""
    import importlib.util

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = Path(__file__).resolve().parents[2] / "examples" / "iris_serve.py"
    spec = importlib.util.spec_from_file_location("iris_serve_cache_check", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cache = module.cache_path()
    assert cache.parent == tmp_path / "cache" / "lepton"
    assert cache.parent.stat().st_mode & 0o777 == 0o700
