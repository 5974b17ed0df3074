"""Ray Serve as a peer of ``serve_bench.py``: its venv, and a child that runs it.

Ray is not a project dependency: it lives in ``benchmarks/.venv-serve``, which
``ensure_venv()`` creates on first use (``python3 -m venv``, then ``pip install
'ray[serve]' psutil``). The benchmark (in the project's venv) starts

    benchmarks/.venv-serve/bin/python benchmarks/serve_peers.py ray --replicas 2 --temp-dir D

which starts a one-node Ray (2 CPUs, no dashboard) with its session files under
``D``, deploys the benchmark's model (``sum(row)`` per instance, ``{"instances":
...}`` in, ``{"predictions": ...}`` out, as lepton's replicas) with ``num_replicas``
replicas behind Ray Serve's HTTP proxy on 127.0.0.1, and prints one JSON line
``{"url": ..., ...status}``. Then, one JSON line per command on stdin:
``status`` -> ``{"running": N, "replica_pids": [...]}``; ``stop`` (or EOF) ->
``serve.shutdown()``, ``ray.shutdown()``, ``{"stopped": true}`` and exit.

``RayServe`` is the benchmark's handle on that child: it records every process of
the child's tree as it goes (with its start time, so a reused PID is never hit),
and ``stop()`` SIGKILLs by PID whatever of it is still alive after the shutdown,
plus any process whose command line names the run's own ``--temp-dir``.

This file must import with the standard library alone: the project's venv has no
Ray, and the peers' venv no lepton_ai.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

from peer_venv import ensure_peer_venv

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / "benchmarks" / ".venv-serve"
VENV_PY = VENV / "bin" / "python"
PEER_PACKAGES = ("ray[serve]", "psutil")
RAY_CPUS = 2  # the host's cores; Serve's replicas ask for 1 CPU each (its default)
APP = "bench"
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0


def predict(instances: list[list[float]]) -> list[float]:
    """The benchmark's model (the same one-liner lepton serves)."""
    return [sum(row) for row in instances]


# -- the benchmark's side (project venv) --------------------------------------------------
def ensure_venv() -> None:
    """Create or repair the peers' venv; a no-op when Ray Serve imports."""
    ensure_peer_venv(VENV, list(PEER_PACKAGES), "import ray, ray.serve, psutil", "ray[serve]")


class RayServe:
    """The Ray Serve child, started at once; ``wait_started()`` for its first line."""

    def __init__(self, replicas: int, log_path: Path) -> None:
        import psutil  # the project's venv has it

        self._psutil = psutil
        self.temp_dir = tempfile.mkdtemp(prefix="lbray-")  # short: Ray's socket paths
        env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        cmd = [str(VENV_PY), __file__, "ray", "--replicas", str(replicas)]
        self.proc = subprocess.Popen(
            [*cmd, "--temp-dir", self.temp_dir],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            start_new_session=True,  # a Ctrl-C of the benchmark does not reach it
        )
        self.started = time.monotonic()
        self._lines: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()
        self.seen: dict[int, float] = {}  # pid -> create_time of every process of its tree
        self.url = ""
        self.version = "?"
        self.start_s = 0.0

    def _read(self, stream: IO[bytes] | None) -> None:
        if stream is None:
            return
        for line in stream:
            self._lines.put(line)
        self._lines.put(b"")

    def _reply(self, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self._lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"ray child: no answer in {timeout_s:g} s") from None
            if not line:
                raise RuntimeError(f"ray child exited; log {self.log_path}: {self._tail()}")
            if line.startswith(b"{"):
                doc: dict[str, Any] = json.loads(line)
                return doc

    def _tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-1500:]
        return ""

    def wait_started(self) -> RayServe:
        doc = self._reply(START_TIMEOUT_S)
        if "error" in doc:
            raise RuntimeError(f"ray serve did not start: {doc['error']}")
        self.url = doc["url"]
        self.version = str(doc.get("ray_version", "?"))
        self.start_s = time.monotonic() - self.started
        self.record_tree()
        return self

    def status(self) -> dict[str, Any]:
        """``{"running": N, "replica_pids": [...]}`` (Serve's view, and the processes)."""
        if self.proc.stdin is None:
            raise AssertionError("no stdin pipe")
        self.proc.stdin.write(b"status\n")
        self.proc.stdin.flush()
        return self._reply(30.0)

    def record_tree(self) -> list[int]:
        """Every process now under the child (Ray's GCS, raylet, workers, proxy...)."""
        psutil = self._psutil
        pids = []
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.proc.pid)
            for p in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    self.seen.setdefault(p.pid, p.create_time())
                    pids.append(p.pid)
        return pids

    def tree_pids(self) -> list[int]:
        return self.record_tree()

    def stop(self) -> dict[str, Any]:
        """``ray.shutdown()`` in the child, then SIGKILL by PID what of it is left.

        Returns what was found: the processes still alive after the shutdown (and
        killed), and those left after that (should be none)."""
        self.record_tree()
        clean = False
        if self.proc.poll() is None and self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.write(b"stop\n")
                self.proc.stdin.flush()
            with contextlib.suppress(TimeoutError, RuntimeError):
                clean = bool(self._reply(STOP_TIMEOUT_S).get("stopped"))
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        time.sleep(1.0)  # Ray's own processes exit on their own after the shutdown
        survivors = self._alive_ours()
        for pid in survivors:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        left = self._alive_ours()
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = self._alive_ours()
        self._log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return {
            "clean_shutdown": clean,
            "processes_seen": len(self.seen),
            "alive_after_shutdown_killed": len(survivors),
            "left_running": len(left),
        }

    def _alive_ours(self) -> list[int]:
        """Still-running processes of this run: seen in the tree (same start time), or
        naming this run's temp dir in their command line (Ray's daemons do)."""
        psutil = self._psutil
        alive = []
        for p in psutil.process_iter(["pid", "create_time", "cmdline", "status"]):
            info = p.info
            if info["status"] == psutil.STATUS_ZOMBIE or info["pid"] == os.getpid():
                continue
            created = self.seen.get(info["pid"])
            ours = created is not None and abs(created - (info["create_time"] or 0)) < 0.01
            if ours or self.temp_dir in " ".join(info["cmdline"] or []):
                alive.append(info["pid"])
        return alive


# -- the child (peers' venv) --------------------------------------------------------------
def _emit(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _ray_status() -> dict[str, Any]:
    import psutil
    from ray import serve

    app = serve.status().applications.get(APP)
    running = 0
    if app is not None:
        for dep in app.deployments.values():
            for state, count in dep.replica_states.items():
                if str(getattr(state, "value", state)) == "RUNNING":
                    running += count
    pids = []
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "ServeReplica" in " ".join(p.cmdline()):
                pids.append(p.pid)
    return {"running": running, "replica_pids": sorted(pids)}


def ray_main(replicas: int, temp_dir: str) -> int:
    try:
        import ray
        from ray import serve
        from starlette.requests import Request

        ray.init(
            num_cpus=RAY_CPUS,
            include_dashboard=False,
            log_to_driver=False,
            _temp_dir=temp_dir,
        )
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})

        @serve.deployment(num_replicas=replicas)
        class Model:
            async def __call__(self, request: Request) -> dict[str, Any]:
                body = await request.json()
                return {"predictions": predict(body["instances"])}

        serve.run(Model.bind(), name=APP, route_prefix=f"/{APP}")  # type: ignore[attr-defined]
        url = f"http://127.0.0.1:{port}/{APP}"
        _emit({"url": url, "ray_version": ray.__version__, **_ray_status()})
    except Exception as exc:  # the benchmark shows it
        _emit({"error": f"{type(exc).__name__}: {exc}"})
        return 2
    for line in sys.stdin:
        command = line.strip()
        if command == "status":
            _emit(_ray_status())
        elif command == "stop":
            break
    with contextlib.suppress(Exception):
        serve.shutdown()
    ray.shutdown()
    _emit({"stopped": True})
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description="Ray Serve child of serve_bench.py")
    parser.add_argument("peer", choices=["ray"])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--temp-dir", required=True)
    args = parser.parse_args()
    return ray_main(args.replicas, args.temp_dir)


if __name__ == "__main__":
    sys.exit(main())
