"""`lepton estimate` and `Job.report()` against real clusters."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cloudpickle
import pytest

import lepton_ai as lep
from helpers import lepton
from lepton_ai.data.synthetic import write_zipf_corpus
from lepton_ai.monitor.estimate import load_dataset

cloudpickle.register_pickle_by_value(sys.modules[__name__])

WORD_COUNT = """
import operator

def main(task):
    return (
        task.read_text({corpus!r}, partitions=4)
        .flat_map(str.split)
        .map(lambda w: (w, 1))
        .reduce_by_key(operator.add, partitions=2)
    )
"""


def _word_count_file(tmp_path: Path, size_bytes: int) -> Path:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_zipf_corpus(corpus, size_bytes, 4, seed=11)
    path = tmp_path / "wc.py"
    path.write_text(WORD_COUNT.format(corpus=str(corpus)))
    return path


@pytest.mark.timeout(60)
def test_the_cli_prints_the_seed_examples_exactly() -> None:
    jt = lepton("estimate", "job-time", "--N", "1000", "--n", "5", "--b", "10", "--c", "1000",
                "--r", "5")  # fmt: skip
    assert jt.returncode == 0, jt.stderr
    assert jt.stdout.splitlines()[-1] == "T = 25.2 s"
    assert "= 20 s" in jt.stdout and "= 0.2 s" in jt.stdout
    co = lepton("estimate", "consensus", "--m", "5", "--p", "2", "--d", "1", "--u", "3",
                "--e", "5", "--json")  # fmt: skip
    assert co.returncode == 0, co.stderr
    assert json.loads(co.stdout)["T_s"] == 23
    bad = lepton("estimate", "job-time", "--N", "1000", "--n", "5", "--b", "0", "--c", "1",
                 "--r", "5")  # fmt: skip
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines() == ["lepton estimate: error: b must be > 0, got 0.0"]


@pytest.mark.timeout(180)
def test_estimate_job_then_report_of_a_word_count(tmp_path: Path) -> None:
    job_file = _word_count_file(tmp_path, 2 * 1024 * 1024)
    with lep.LocalCluster(workers=2, coordinators=1) as cluster:
        where = ("--address", cluster.address, "--token", cluster.token)
        out = lepton("estimate", "job", str(job_file), "--workers", "1,2,4", "--runs", "1",
                     "--json", *where, timeout_s=150)  # fmt: skip
        assert out.returncode == 0, out.stderr
        est = json.loads(out.stdout)
        cal = est["calibration"]
        assert est["N"] > 10_000 and cal["nodes"] == 2
        assert cal["b"] > 0 and cal["c"] > 0 and cal["r"] >= 0
        totals = [p["T_s"] for p in est["predictions"]]
        assert [p["n"] for p in est["predictions"]] == [1, 2, 4]
        assert totals[0] > totals[1] > totals[2] > 0

        task = lep.DistributedTask(cluster, progress=False)
        job = load_dataset(str(job_file), task).submit(progress=False)
        with pytest.raises(ValueError, match="finished job"):
            job.report()  # still running (or just submitted)
        counts = dict(job.result(timeout=60))
        assert sum(counts.values()) > 10_000
        report = job.report()  # predicted from the calibration `estimate job` left
        assert report.predicted is not None and report.calibration is not None
        assert report.N is not None and abs(report.N - est["N"]) < 1e-6 * est["N"]
        assert report.n == 2
        m = report.measured
        assert m.total_s > 0 and m.reduce_s >= 0 and m.compute_s > 0 and m.transfer_s >= 0
        assert abs(m.transfer_s + m.compute_s + m.reduce_s - m.total_s) < 1e-9
        assert report.predicted.total_s > 0
        text = str(report)
        assert "reduce r" in text and "total T" in text and "measured total" in text


@pytest.mark.timeout(180)
def test_estimate_consensus_measures_each_term(tmp_path: Path) -> None:
    with lep.LocalCluster(workers=1, coordinators=3) as cluster:
        where = ("--address", cluster.address, "--token", cluster.token)
        out = lepton("estimate", "consensus", "--writes", "10", "--measure-election", "--json",
                     *where, timeout_s=120)  # fmt: skip
        assert out.returncode == 0, out.stderr
        got = json.loads(out.stdout)
        assert got["m"] == 3
        assert got["p"] > 0 and got["d"] > 0 and got["u"] >= 0 and got["e"] > 0
        assert got["T_s"] == pytest.approx(got["p"] + got["d"] + 3 * got["u"] + got["e"])
        assert "leader_elected" in got["how"]["e"]
        # p, d and u are the replicas' own timings, from their /metrics.
        assert "lepton_paxos_propose_seconds" in got["how"]["p"]
        assert "lepton_paxos_decide_seconds" in got["how"]["d"]
        assert "lepton_paxos_apply_seconds" in got["how"]["u"]
        assert got["p"] < got["d"]  # a lone write waits for no batch; a quorum round does
        # The kill is in the timeline now: without --measure-election e comes from it.
        again = lepton("estimate", "consensus", "--writes", "5", "--json", *where, timeout_s=60)
        assert again.returncode == 0, again.stderr
        assert "timeline" in json.loads(again.stdout)["how"]["e"]
