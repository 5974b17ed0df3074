"""Bring up a bed by hand: 5 namespace hosts, 3 coordinators + 2 workers; Ctrl-C tears it down.

    sudo PYTHONPATH=src .venv/bin/python tests/hosts/run_bed.py [--hosts 5] [--workers 2]

It prints the hosts, the token and the ``lep.connect`` address, then waits. From
another shell (as root), faults by hand, e.g. with ``BED=lnb-<tag>``:

    ip netns exec $BED-h0 ip rule add pref 100 iif eth0 from 10.77.K.2 blackhole   # 1 -/-> 0
    ip netns pids $BED-h0 | xargs kill -STOP                                       # pause host 0
    ip netns exec $BED-h3 python -c 'import lepton_ai as lep; ...'                  # a client there
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: ``hosts`` importable

from hosts.bedcluster import BedCluster, BedConfig
from hosts.netbed import NetBed, available


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="run_bed", description=__doc__.splitlines()[0])
    parser.add_argument("--coordinators", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data-dir", default=None, help="default: a new temporary directory")
    args = parser.parse_args(argv)
    why = available()
    if why:
        print(f"run_bed: {why}", file=sys.stderr)
        return 2
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="lepton-bed-")
    config = BedConfig(coordinators=args.coordinators, workers=args.workers)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # tear down on kill too
    with NetBed(args.coordinators + args.workers) as bed:
        cluster = BedCluster(bed, data_dir, config)
        try:
            cluster.wait_ready()
            info = {
                **bed.describe(),
                "address": cluster.address,
                "token": cluster.token,
                "data_dir": data_dir,
                "leader_host": cluster.leader_host(),
            }
            print(json.dumps(info, indent=2), flush=True)
            print("up; Ctrl-C tears it down", flush=True)
            signal.pause()
        except KeyboardInterrupt:
            print("tearing down", flush=True)
        finally:
            cluster.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
