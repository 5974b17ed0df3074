"""The throughput cost of TLS on the consensus benchmark's lepton_ai rows.

Runs ``consensus_bench.lepton_throughput`` (3 replicas + a client process, one
write at a time and 8,192 pipelined) with and without ``$LEPTON_TLS_DIR``,
alternating so drift on a shared machine hits both alike; prints the medians::

    PYTHONPATH=src python benchmarks/tls_consensus_bench.py --rounds 3 --duration 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import consensus_bench

from lepton_ai.wire.certs import create
from lepton_ai.wire.tls import TLS_DIR_ENV


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--fsync", choices=["off", "on", "both"], default="both")
    args = parser.parse_args()
    bench = argparse.Namespace(trials=1, duration=args.duration, tick_s=0.02)
    tls_dir = os.path.join(tempfile.mkdtemp(prefix="lepton-tls-bench-"), "tls")
    create(tls_dir)
    fsyncs = {"off": [False], "on": [True], "both": [False, True]}[args.fsync]
    runs: dict[str, list[dict[str, Any]]] = {}
    for _ in range(args.rounds):
        for fsync in fsyncs:
            for tls in (False, True):
                if tls:
                    os.environ[TLS_DIR_ENV] = tls_dir
                else:
                    os.environ.pop(TLS_DIR_ENV, None)
                row = consensus_bench.lepton_throughput(fsync, bench)
                key = f"fsync={'on' if fsync else 'off'} tls={'on' if tls else 'off'}"
                runs.setdefault(key, []).append(row)
                print(key, json.dumps({k: v for k, v in row.items() if k != "runs"}), flush=True)
    for key, rows in runs.items():
        one = [r["one"]["writes_per_s"] for r in rows]
        p50 = [r["one"]["p50_ms"] for r in rows]
        pipe = [r["pipelined"]["writes_per_s"] for r in rows]
        print(
            f"{key}: one-at-a-time {statistics.median(one):.0f} writes/s "
            f"(p50 {statistics.median(p50):.2f} ms), pipelined {statistics.median(pipe):.0f} "
            f"writes/s; runs one={[round(x) for x in one]} pipelined={[round(x) for x in pipe]}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
