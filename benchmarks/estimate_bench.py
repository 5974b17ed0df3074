"""Prediction error of ``lepton estimate job`` for word count (issue 12).

    .venv/bin/python benchmarks/estimate_bench.py            # 3 sizes x 1, 2 workers, 3 runs
    .venv/bin/python benchmarks/estimate_bench.py --runs 1   # quicker

For each cluster size (1 and 2 workers, ``lep.LocalCluster(coordinators=1)``)
and each input size (a seeded Zipf corpus in 8 files): ``lepton estimate job``
(a subprocess, the real command) predicts T for that many workers, then the
job itself runs; the prediction error is (median predicted - median measured)
/ median measured, measured from submit until the result is back in the
client. Target: within 20%. Results: ``benchmarks/results/estimate.json``
(the table in docs/cost-model.md is written by hand from it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lepton_ai as lep
from lepton_ai.data.synthetic import write_zipf_corpus
from lepton_ai.monitor.estimate import load_dataset, timed_run

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "estimate.json"
SIZES_MB = (16, 48, 96)
WORKERS = (1, 2)
FILES = 8
SEED = 2026
TARGET_ERROR = 0.20
ESTIMATE_TIMEOUT_S = 300.0

WORD_COUNT = """
import operator

def main(task):
    return (
        task.read_text({corpus!r}, partitions=8)
        .flat_map(str.split)
        .map(lambda w: (w, 1))
        .reduce_by_key(operator.add, partitions=2)
    )
"""


def _job_file(root: Path, size_mb: int) -> Path:
    corpus = root / f"corpus-{size_mb}"
    corpus.mkdir()
    write_zipf_corpus(corpus, size_mb * 1024 * 1024, FILES, SEED)
    path = root / f"wc-{size_mb}.py"
    path.write_text(WORD_COUNT.format(corpus=str(corpus)))
    return path


def _estimate(cluster: Any, job_file: Path, workers: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "lepton_ai.cli", "estimate", "job", str(job_file)]
    cmd += ["--workers", str(workers), "--json", "--address", cluster.address]
    cmd += ["--token", cluster.token]
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=ESTIMATE_TIMEOUT_S, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"lepton estimate job failed: {out.stderr.strip()}")
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def _one(cluster: Any, job_file: Path, workers: int, runs: int) -> dict[str, Any]:
    task = lep.DistributedTask(cluster, progress=False)
    predicted: list[float] = []
    measured: list[float] = []
    calibrations: list[dict[str, Any]] = []
    for _ in range(runs):  # estimate and job interleaved: both see the same load
        started = time.perf_counter()
        est = _estimate(cluster, job_file, workers)
        calibrations.append({**est["calibration"], "seconds": time.perf_counter() - started})
        predicted.append(est["predictions"][0]["T_s"])
        measured.append(timed_run(load_dataset(str(job_file), task)))
    pred, meas = statistics.median(predicted), statistics.median(measured)
    return {
        "N": est["N"],
        "predicted_s": predicted,
        "measured_s": measured,
        "predicted_median_s": pred,
        "measured_median_s": meas,
        "error": (pred - meas) / meas,
        "calibration_s_median": statistics.median(c["seconds"] for c in calibrations),
        "calibrations": calibrations,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="lepton-estimate-bench-") as tmp:
        files = {mb: _job_file(Path(tmp), mb) for mb in SIZES_MB}
        for workers in WORKERS:
            with lep.LocalCluster(workers=workers, coordinators=1) as cluster:
                for mb, path in files.items():
                    row = {"workers": workers, "size_mb": mb, **_one(cluster, path, workers,
                                                                      args.runs)}  # fmt: skip
                    rows.append(row)
                    print(
                        f"{workers} worker(s) {mb:>4} MB: predicted {row['predicted_median_s']:.3f}"
                        f" s, measured {row['measured_median_s']:.3f} s, error {row['error']:+.0%}",
                        flush=True,
                    )
    doc = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} cores, {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()}",
        "load_avg_1m_end": os.getloadavg()[0],
        "runs": args.runs,
        "target_error": TARGET_ERROR,
        "met": all(abs(r["error"]) <= TARGET_ERROR for r in rows),
        "rows": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {RESULTS}; within {TARGET_ERROR:.0%}: {doc['met']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
