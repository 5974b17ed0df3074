"""The throughput cost of HTTPS on the serving benchmark's lepton row.

``lepton serve`` (balancer front end + 1 replica, as serve_bench's "lepton serve,
1 replica" row) with and without ``$LEPTON_TLS_DIR``, alternating, driven by the
same load generator (keep-alive connections: the handshake is paid once per
connection, the cost measured is the encryption of each request and answer)::

    PYTHONPATH=src python benchmarks/tls_serve_bench.py --rounds 3 --seconds 5
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from lepton_ai.serve.loadgen import run_load_sync
from lepton_ai.wire.certs import create
from lepton_ai.wire.tls import TLS_DIR_ENV

MODEL = "def predict(instances):\n    return [sum(x) for x in instances]\n"
BODY = json.dumps({"instances": [[5.1, 3.5, 1.4, 0.2]]}).encode()


def _serve(target: str, tls_dir: str | None) -> tuple[subprocess.Popen[bytes], str]:
    env = {k: v for k, v in os.environ.items() if k != TLS_DIR_ENV}
    if tls_dir:
        env[TLS_DIR_ENV] = tls_dir
    cmd = [sys.executable, "-m", "lepton_ai.serve.cli", target, "--replicas", "1"]
    proc = subprocess.Popen(
        [*cmd, "--port", "0", "--json"], stdout=subprocess.PIPE, env=env, start_new_session=True
    )
    assert proc.stdout is not None
    url = json.loads(proc.stdout.readline())["url"]
    return proc, url


def _one(target: str, tls_dir: str | None, ctx: ssl.SSLContext, args: argparse.Namespace) -> float:
    proc, url = _serve(target, tls_dir)
    try:
        verify = ctx if tls_dir else False
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.post(f"{url}/predict", content=BODY, verify=verify).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        kw = {"ssl": ctx if tls_dir else None, "concurrency": args.concurrency}
        run_load_sync(f"{url}/predict", BODY, requests_max=500, duration_s_max=1.0, **kw)
        r = run_load_sync(
            f"{url}/predict", BODY, requests_max=10**7, duration_s_max=args.seconds, **kw
        )
        return float(r.rps)
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="lepton-tls-serve-")
    (Path(tmp) / "bench_model.py").write_text(MODEL)
    target = f"{tmp}/bench_model.py:predict"
    tls_dir = os.path.join(tmp, "tls")
    create(tls_dir)
    ctx = ssl.create_default_context(cafile=os.path.join(tls_dir, "ca.pem"))
    rps: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(args.rounds):
        for key, d in (("off", None), ("on", tls_dir)):
            rps[key].append(_one(target, d, ctx, args))
            print(f"tls={key}: {rps[key][-1]:.0f} req/s", flush=True)
    for key, runs in rps.items():
        print(
            f"tls={key}: median {statistics.median(runs):.0f} req/s, "
            f"runs {[round(x) for x in runs]}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
