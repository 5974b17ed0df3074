"""The synthetic corpora: deterministic per seed, well-formed, sized as asked, Zipf-shaped."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from lepton_ai.data import synthetic as syn


def test_int_field_formats_like_str() -> None:
    values = np.array([0, 1, 9, 10, 99, 100, 999, 1000, 123456789, 10**12 - 1, 10**12])
    chars, lens = syn._int_field(values)
    got = [bytes(chars[i, : lens[i]]).decode() for i in range(values.size)]
    assert got == [str(int(v)) for v in values]


def test_int_field_rejects_negative() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        syn._int_field(np.array([3, -1]))


def test_log_lines_are_deterministic_and_seed_dependent() -> None:
    a = syn.log_lines(7, 2000)
    assert a == syn.log_lines(7, 2000)
    assert a != syn.log_lines(8, 2000)
    assert a != syn.log_lines(7, 2000, file_index=1)
    # Across a chunk boundary, timestamps keep increasing.
    stamps = [line[:23] for line in syn.log_lines(7, syn.CHUNK_LINES + 10).splitlines()]
    assert stamps == sorted(stamps)


def test_log_lines_are_well_formed() -> None:
    text = syn.log_lines(3, 5000).decode("ascii")
    lines = text.splitlines()
    assert len(lines) == 5000
    services = set(syn.SERVICES)
    statuses = set(syn.OK_STATUSES) | set(syn.ERROR_STATUSES)
    requests = set(syn.log_request_vocab())
    for line in lines:
        ts, ip, svc, rest = line.split(" ", 3)
        assert ts.endswith("Z") and len(ts) == 24 and ts[10] == "T"
        assert ip.count(".") == 3
        assert svc in services
        assert rest.startswith('"')
        request, tail = rest[1:].split('" ')
        assert request in requests and request.split(" ")[1].startswith(f"/{svc}/")
        status, size, latency = tail.split(" ")
        assert int(status) in statuses
        assert int(size) >= 0 and int(latency) >= 0


def test_log_error_rates_follow_the_configured_shares() -> None:
    lines = syn.log_lines(11, 60_000).decode().splitlines()
    per_svc: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for line in lines:
        parts = line.split(" ")
        per_svc[parts[2]] += 1
        errors[parts[2]] += int(parts[6]) >= 500
    for name, share, rate in zip(
        syn.SERVICES, syn.SERVICE_SHARES, syn.SERVICE_ERROR_RATES, strict=True
    ):
        assert abs(per_svc[name] / len(lines) - share) < 0.01
        assert abs(errors[name] / per_svc[name] - rate) < 0.015


def test_write_log_corpus_sizes_and_cleans(tmp_path: Path) -> None:
    spec = syn.write_log_corpus(tmp_path, 2_000_000, files=4, seed=5)
    assert len(spec.paths) == 4
    assert sum(p.stat().st_size for p in spec.paths) == spec.size_bytes
    assert abs(spec.size_bytes - 2_000_000) < 100_000
    for p in spec.paths:
        assert p.read_bytes().endswith(b"\n")


def test_zipf_words_shape() -> None:
    text = syn.zipf_words(1, 3_000_000)
    assert abs(len(text) - 3_000_000) < 150_000
    assert text.endswith(b"\n") and b"  " not in text
    counts = Counter(text.split())
    vocab = syn.zipf_vocab()
    ranked = [w for w, _ in counts.most_common(50)]
    # The most frequent words are the vocabulary's first ranks.
    assert ranked[:5] == [w.encode() for w in vocab[:5]]
    # Zipf: frequency of rank 1 over rank 10 is about 10 ** s.
    ratio = counts[vocab[0].encode()] / counts[vocab[9].encode()]
    assert 10**syn.WORDS_ZIPF_S * 0.8 < ratio < 10**syn.WORDS_ZIPF_S * 1.2


def test_zipf_vocab_distinct_and_shortest_first() -> None:
    vocab = syn.zipf_vocab(20_000)
    assert len(set(vocab)) == 20_000
    assert [len(w) for w in vocab] == sorted(len(w) for w in vocab)


def test_write_zipf_corpus_deterministic(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = syn.write_zipf_corpus(tmp_path / "a", 400_000, files=3, seed=9)
    b = syn.write_zipf_corpus(tmp_path / "b", 400_000, files=3, seed=9)
    assert [p.read_bytes() for p in a.paths] == [p.read_bytes() for p in b.paths]


@pytest.mark.parametrize(
    ("kwargs", "exc"),
    [
        ({"size_bytes": 0, "files": 1, "seed": 0}, ValueError),
        ({"size_bytes": 10, "files": 0, "seed": 0}, ValueError),
        ({"size_bytes": 10, "files": 1, "seed": -1}, ValueError),
        ({"size_bytes": 10.5, "files": 1, "seed": 0}, TypeError),
        ({"size_bytes": 10, "files": True, "seed": 0}, TypeError),
    ],
)
def test_bad_arguments_are_rejected_before_writing(
    tmp_path: Path, kwargs: dict[str, object], exc: type[Exception]
) -> None:
    with pytest.raises(exc):
        syn.write_log_corpus(tmp_path, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(exc):
        syn.write_zipf_corpus(tmp_path, **kwargs)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_missing_directory_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a directory"):
        syn.write_log_corpus(tmp_path / "nope", 1000, files=1, seed=0)
