"""``python -m lepton_ai.sim --seeds 0-9999 [--membership] [--crash-in-sync P]``: fuzz seeds.

Prints one line per failing seed (with the replay command) and a summary; exits 1 on
any failure. The pytest entry point is tests/sim/test_paxos_fuzz.py.
"""

from __future__ import annotations

import argparse
import sys
import time

from lepton_ai.sim.fuzz import run_seed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lepton_ai.sim", description=__doc__)
    parser.add_argument("--seeds", default="0-99", help="N, or a range a-b (inclusive)")
    parser.add_argument("--ticks", type=int, default=600, help="fault ticks per seed")
    parser.add_argument("--membership", action="store_true", help="membership changes always")
    parser.add_argument(
        "--crash-in-sync",
        type=float,
        default=None,
        help="probability that a leader dies inside an fdatasync it sent messages ahead of "
        "(default: drawn per seed)",
    )
    args = parser.parse_args(argv)
    lo, sep, hi = args.seeds.partition("-")
    seeds = range(int(lo), int(hi) + 1) if sep else range(int(lo))
    start = time.monotonic()
    failures = committed = early = lost = 0
    for seed in seeds:
        try:
            report = run_seed(
                seed,
                fault_ticks=args.ticks,
                name="tests/sim/test_paxos_fuzz.py::test_paxos_fuzz_"
                + ("membership_seeds" if args.membership else "seeds"),
                membership=True if args.membership else None,
                crash_in_sync=args.crash_in_sync,
            )
        except AssertionError as exc:
            failures += 1
            print(f"FAIL seed {seed}: {exc}", flush=True)
            if args.crash_in_sync is not None:
                replay = f"python -m lepton_ai.sim --seeds {seed}-{seed}"
                replay += " --membership" if args.membership else ""
                print(f"  (replay: {replay} --crash-in-sync {args.crash_in_sync})", flush=True)
            continue
        committed += report.committed
        early += report.early_delivered_in_sync
        lost += report.early_entries_lost
    elapsed = time.monotonic() - start
    print(
        f"{len(seeds)} seeds, {failures} failed, {committed} commands committed, "
        f"{early} leader messages delivered before the leader's sync, "
        f"{lost} early-sent entries lost in a leader crash, {elapsed:.1f} s"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
