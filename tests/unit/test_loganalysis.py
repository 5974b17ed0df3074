"""The log analysis job: map side + reduce equals the independently written serial reference."""

from __future__ import annotations

import itertools
import random
from collections import defaultdict
from pathlib import Path

import pytest

from lepton_ai.data import loganalysis as la
from lepton_ai.data import synthetic as syn


def _mapreduce(partitions: list[list[str]]) -> la.LogReport:
    """What the cluster does: map each partition, shuffle by key, sum, summarize."""
    summed: dict[str, int] = defaultdict(int)
    for lines in partitions:
        for key, count in la.partition_counts(lines):
            summed[key] = la.add(summed[key], count)
    return la.summarize(summed.items())


def _corpus(tmp_path: Path, malformed: bool = False) -> tuple[list[Path], list[str]]:
    spec = syn.write_log_corpus(tmp_path, 600_000, files=3, seed=21)
    paths = list(spec.paths)
    if malformed:
        extra = tmp_path / "access-9999.log"
        extra.write_text('garbage line\n\nnot "a" request either\n')
        paths.append(extra)
    lines = [line for p in paths for line in p.read_text().splitlines(keepends=True)]
    return paths, lines


def test_mapreduce_equals_serial_for_any_partitioning(tmp_path: Path) -> None:
    paths, lines = _corpus(tmp_path)
    reference = la.serial_report(paths)
    assert reference.total_requests == len(lines)
    rnd = random.Random(4)
    for parts in (1, 3, 17):
        cuts = sorted(rnd.sample(range(1, len(lines)), parts - 1))
        bounds = [0, *cuts, len(lines)]
        partitions = [lines[a:b] for a, b in itertools.pairwise(bounds)]
        assert _mapreduce(partitions) == reference


def test_malformed_lines_are_counted_not_crashing(tmp_path: Path) -> None:
    paths, lines = _corpus(tmp_path, malformed=True)
    reference = la.serial_report(paths)
    assert reference.malformed == 2
    assert _mapreduce([lines[:1000], lines[1000:]]) == reference


def test_report_content_is_plausible(tmp_path: Path) -> None:
    paths, _ = _corpus(tmp_path)
    report = la.serial_report(paths)
    assert set(report.services) == set(syn.SERVICES)
    payments = report.services["payments"]
    assert payments.errors == sum(n for c, n in payments.by_status.items() if c >= 500)
    assert 0.0 < payments.error_rate < 0.2
    assert len(report.top_urls) == la.TOP_URLS
    counts = [n for _, n in report.top_urls]
    assert counts == sorted(counts, reverse=True)
    js = report.to_json()
    assert js["total_requests"] == report.total_requests
    assert js["top_urls"][0] == list(report.top_urls[0])


def test_a_lost_or_duplicated_partition_is_detected(tmp_path: Path) -> None:
    _, lines = _corpus(tmp_path)
    good = _mapreduce([lines[:500], lines[500:]])
    assert _mapreduce([lines[500:]]) != good  # lost output
    assert _mapreduce([lines[:500], lines[:500], lines[500:]]) != good  # duplicated output


def test_summarize_rejects_duplicate_and_bad_keys() -> None:
    with pytest.raises(ValueError, match="twice"):
        la.summarize([("U /a", 1), ("U /a", 2)])
    with pytest.raises(ValueError, match="unknown key"):
        la.summarize([("X y", 1)])
    with pytest.raises(TypeError):
        la.summarize([("U /a", "1")])  # type: ignore[list-item]
