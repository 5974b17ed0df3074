"""Seeded synthetic corpora for the demo, the tests and the benchmarks.

Two generators, both deterministic for a given seed and fast enough to make
hundreds of megabytes in a few seconds:

- a web-server access log (``write_log_corpus``): one request per line,
  ``TIMESTAMP CLIENT_IP SERVICE "METHOD PATH HTTP/1.1" STATUS BYTES LATENCY_MS``,
  with per-service traffic shares and error rates and Zipf-distributed URLs;
- a Zipf word corpus (``write_zipf_corpus``): space-separated pseudo-words,
  frequent words short (as in natural language), a newline every few words.

Lines are assembled without a Python loop per line: every field is a matrix of
bytes (one row per line) plus a length per row, and the rows are scattered into
one output buffer with numpy fancy indexing. Each file gets its own generator,
seeded by ``(seed, file_index)``, so a file's content does not depend on how
many other files are written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]
Field = tuple[U8, I64]  # (bytes: one row per line, padded; used length of each row)

# The log's vocabulary. Shares and error rates differ per service so that the
# analysis has something to find; they sum to 1 and are fixed (part of the format).
SERVICES: tuple[str, ...] = (
    "frontend",
    "checkout",
    "search",
    "auth",
    "catalog",
    "payments",
    "recommend",
    "inventory",
)
SERVICE_SHARES: tuple[float, ...] = (0.30, 0.10, 0.18, 0.12, 0.12, 0.05, 0.08, 0.05)
SERVICE_ERROR_RATES: tuple[float, ...] = (0.010, 0.035, 0.020, 0.015, 0.008, 0.060, 0.030, 0.045)
OK_STATUSES: tuple[int, ...] = (200, 201, 204, 301, 304, 400, 401, 403, 404, 429)
OK_STATUS_SHARES: tuple[float, ...] = (0.70, 0.05, 0.04, 0.02, 0.08, 0.02, 0.02, 0.01, 0.05, 0.01)
ERROR_STATUSES: tuple[int, ...] = (500, 502, 503, 504)
ERROR_STATUS_SHARES: tuple[float, ...] = (0.55, 0.20, 0.15, 0.10)
_RESOURCES: tuple[str, ...] = (
    "items",
    "users",
    "orders",
    "cart",
    "session",
    "query",
    "stock",
    "price",
    "image",
    "review",
    "token",
    "profile",
)
_METHODS: tuple[str, ...] = ("GET", "POST", "PUT", "DELETE")

LOG_URLS_PER_SERVICE = 200  # distinct paths per service
LOG_URL_ZIPF_S = 1.2  # Zipf exponent of path popularity within a service
LOG_CLIENTS = 4096  # distinct client IPs
LOG_START_EPOCH_MS = 1_795_000_000_000  # first timestamp of file 0 (Nov 2026)
LOG_MEAN_LINE_BYTES = 96.7  # measured mean, used to size files
WORDS_VOCAB = 50_000
WORDS_ZIPF_S = 1.1
WORDS_PER_LINE = 12
CHUNK_LINES = 131_072  # lines (or words) generated per numpy pass; bounds peak memory
FILES_MAX = 4096


@dataclass(frozen=True, slots=True)
class CorpusSpec:
    """What a writer produced: the files, their total size and the seed."""

    paths: tuple[Path, ...]
    size_bytes: int
    seed: int


def _check_args(size_bytes: int, files: int, seed: int) -> None:
    for name, value in (("size_bytes", size_bytes), ("files", files), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if size_bytes <= 0:
        raise ValueError(f"size_bytes must be > 0, got {size_bytes}")
    if not 1 <= files <= FILES_MAX:
        raise ValueError(f"files must be in 1..{FILES_MAX}, got {files}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")


def _vocab_field(tokens: Sequence[str]) -> Field:
    """Encode a vocabulary once as a padded byte matrix and row lengths."""
    encoded = [t.encode("ascii") for t in tokens]
    width = max(len(e) for e in encoded)
    chars = np.frombuffer(b"".join(e.ljust(width, b" ") for e in encoded), dtype=np.uint8)
    lens = np.array([len(e) for e in encoded], dtype=np.int64)
    return chars.reshape(len(encoded), width), lens


def _take(vocab: Field, ids: I64) -> Field:
    return vocab[0][ids], vocab[1][ids]


def _const(text: str, n: int) -> Field:
    raw = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    chars = np.broadcast_to(raw, (n, raw.size))
    return chars, np.full(n, raw.size, dtype=np.int64)


def _int_field(values: I64) -> Field:
    """Decimal digits of non-negative ints, left-aligned, without leading zeros."""
    if values.size and int(values.min()) < 0:
        raise ValueError("only non-negative integers can be formatted")
    digits = np.maximum(1, np.floor(np.log10(np.maximum(values, 1))).astype(np.int64) + 1)
    # log10 can be off by one just below a power of ten: correct it exactly.
    digits += values >= 10**digits
    width = int(digits.max()) if values.size else 1
    exps = digits[:, None] - 1 - np.arange(width, dtype=np.int64)[None, :]
    pow10 = 10 ** np.clip(exps, 0, None)
    chars = (48 + (values[:, None] // pow10) % 10).astype(np.uint8)
    return chars, digits


def _assemble(fields: Sequence[Field]) -> bytes:
    """Concatenate, row by row, the used part of every field's row."""
    n = fields[0][1].size
    row_len = np.zeros(n, dtype=np.int64)
    for _, lens in fields:
        row_len += lens
    pos = np.cumsum(row_len) - row_len
    out = np.empty(int(row_len.sum()), dtype=np.uint8)
    for chars, lens in fields:
        width = chars.shape[1]
        mask = np.arange(width)[None, :] < lens[:, None]
        out[(pos[:, None] + np.arange(width)[None, :])[mask]] = chars[mask]
        pos += lens
    return out.tobytes()


def _zipf_probs(n: int, s: float) -> npt.NDArray[np.float64]:
    weights: npt.NDArray[np.float64] = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** s
    probs: npt.NDArray[np.float64] = weights / weights.sum()
    return probs


def _sample(rng: np.random.Generator, cdf: npt.NDArray[np.float64], n: int) -> I64:
    """Inverse-CDF sampling; ``cdf`` is cumulative and ends at ~1."""
    ids = np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right")
    out: I64 = np.minimum(ids, cdf.size - 1).astype(np.int64)
    return out


def log_request_vocab() -> list[str]:
    """``METHOD PATH HTTP/1.1`` strings, ``LOG_URLS_PER_SERVICE`` per service, by rank."""
    out: list[str] = []
    for svc in SERVICES:
        for rank in range(LOG_URLS_PER_SERVICE):
            res = _RESOURCES[rank % len(_RESOURCES)]
            method = _METHODS[0] if rank % 5 else _METHODS[(rank // 5) % len(_METHODS)]
            out.append(f"{method} /{svc}/api/v{1 + rank % 3}/{res}/{rank} HTTP/1.1")
    return out


def _client_vocab() -> list[str]:
    # Fixed (not seeded): the client pool is part of the format, traffic over it is seeded.
    return [f"10.{(i >> 8) & 255}.{i & 255}.{(i * 37) % 250 + 1}" for i in range(LOG_CLIENTS)]


class _LogTables:
    """Vocabularies and cumulative distributions, built once per writer call."""

    def __init__(self) -> None:
        self.clients = _vocab_field(_client_vocab())
        self.services = _vocab_field(list(SERVICES))
        self.requests = _vocab_field(log_request_vocab())
        self.ok_status = np.array(OK_STATUSES, dtype=np.int64)
        self.err_status = np.array(ERROR_STATUSES, dtype=np.int64)
        self.svc_cdf = np.cumsum(SERVICE_SHARES)
        self.url_cdf = np.cumsum(_zipf_probs(LOG_URLS_PER_SERVICE, LOG_URL_ZIPF_S))
        self.client_cdf = np.cumsum(_zipf_probs(LOG_CLIENTS, 0.8))
        self.ok_cdf = np.cumsum(OK_STATUS_SHARES)
        self.err_cdf = np.cumsum(ERROR_STATUS_SHARES)
        self.err_rate = np.array(SERVICE_ERROR_RATES, dtype=np.float64)


def _log_chunk(
    rng: np.random.Generator, tables: _LogTables, n: int, t0_ms: int
) -> tuple[bytes, int]:
    """``n`` lines starting at ``t0_ms``; returns them and the last timestamp."""
    svc = _sample(rng, tables.svc_cdf, n)
    url = _sample(rng, tables.url_cdf, n)
    is_err = rng.random(n) < tables.err_rate[svc]
    status = np.where(
        is_err,
        tables.err_status[_sample(rng, tables.err_cdf, n)],
        tables.ok_status[_sample(rng, tables.ok_cdf, n)],
    )
    size = np.where(status == 204, 0, rng.lognormal(8.0, 1.2, n).astype(np.int64))
    latency = rng.lognormal(3.0, 0.8, n).astype(np.int64) + np.where(is_err, 200, 0)
    t_ms = t0_ms + np.cumsum(rng.integers(0, 4, n, dtype=np.int64))
    stamps = np.datetime_as_string(t_ms.astype("datetime64[ms]"), unit="ms").astype("S23")
    stamp_field: Field = (
        stamps.view(np.uint8).reshape(n, 23),
        np.full(n, 23, dtype=np.int64),
    )
    text = _assemble(
        (
            stamp_field,
            _const("Z ", n),
            _take(tables.clients, _sample(rng, tables.client_cdf, n)),
            _const(" ", n),
            _take(tables.services, svc),
            _const(' "', n),
            _take(tables.requests, svc * LOG_URLS_PER_SERVICE + url),
            _const('" ', n),
            _int_field(status),
            _const(" ", n),
            _int_field(size),
            _const(" ", n),
            _int_field(latency),
            _const("\n", n),
        )
    )
    return text, int(t_ms[-1])


def log_lines(seed: int, lines: int, file_index: int = 0) -> bytes:
    """``lines`` log lines, exactly as file ``file_index`` of a corpus with ``seed`` would start."""
    _check_args(max(lines, 1), 1, seed)
    tables = _LogTables()
    rng = np.random.default_rng([seed, file_index])
    parts: list[bytes] = []
    t0 = LOG_START_EPOCH_MS + file_index * 86_400_000
    done = 0
    while done < lines:
        n = min(CHUNK_LINES, lines - done)
        text, t0 = _log_chunk(rng, tables, n, t0)
        parts.append(text)
        done += n
    return b"".join(parts)


def write_log_corpus(directory: Path | str, size_bytes: int, files: int, seed: int) -> CorpusSpec:
    """Write ``files`` log files of about ``size_bytes`` in total into ``directory``."""
    _check_args(size_bytes, files, seed)
    out_dir = Path(directory)
    if not out_dir.is_dir():
        raise ValueError(f"not a directory: {out_dir}")
    lines_per_file = max(1, round(size_bytes / files / LOG_MEAN_LINE_BYTES))
    paths: list[Path] = []
    total = 0
    for index in range(files):
        path = out_dir / f"access-{index:04d}.log"
        data = log_lines(seed, lines_per_file, index)
        path.write_bytes(data)
        total += len(data)
        paths.append(path)
    return CorpusSpec(tuple(paths), total, seed)


def zipf_vocab(size: int = WORDS_VOCAB) -> list[str]:
    """``size`` distinct lowercase pseudo-words, shortest first (rank 0 is the shortest)."""
    if size <= 0:
        raise ValueError(f"size must be > 0, got {size}")
    consonants = "bcdfghklmnprstvz"
    vowels = "aeiou"
    syllables = [c + v for c in consonants for v in vowels]  # 80
    words: list[str] = list(vowels)
    layer = list(syllables)
    while len(words) < size:
        words.extend(layer)
        layer = [w + s for w in layer[:1000] for s in syllables]
    return words[:size]


def _zipf_chunk(
    rng: np.random.Generator, vocab: Field, cdf: npt.NDArray[np.float64], n: int
) -> bytes:
    ids = _sample(rng, cdf, n)
    seps = np.where(rng.integers(0, WORDS_PER_LINE, n) == 0, ord("\n"), ord(" ")).astype(np.uint8)
    seps[-1] = ord("\n")  # every chunk ends a line, so chunks concatenate into whole lines
    return _assemble((_take(vocab, ids), (seps[:, None], np.ones(n, dtype=np.int64))))


def zipf_words(seed: int, size_bytes: int, file_index: int = 0) -> bytes:
    """About ``size_bytes`` of Zipf text (whole lines), seeded by ``(seed, file_index)``."""
    _check_args(size_bytes, 1, seed)
    words = zipf_vocab()
    vocab = _vocab_field(words)
    probs = _zipf_probs(len(words), WORDS_ZIPF_S)
    cdf = np.cumsum(probs)
    mean_word_bytes = float((probs * vocab[1]).sum()) + 1.0
    rng = np.random.default_rng([seed, file_index, 1])
    remaining = max(1, round(size_bytes / mean_word_bytes))
    parts: list[bytes] = []
    while remaining > 0:
        n = min(CHUNK_LINES * 8, remaining)
        parts.append(_zipf_chunk(rng, vocab, cdf, n))
        remaining -= n
    return b"".join(parts)


def write_zipf_corpus(directory: Path | str, size_bytes: int, files: int, seed: int) -> CorpusSpec:
    """Write ``files`` Zipf text files of about ``size_bytes`` in total into ``directory``."""
    _check_args(size_bytes, files, seed)
    out_dir = Path(directory)
    if not out_dir.is_dir():
        raise ValueError(f"not a directory: {out_dir}")
    per_file = max(1, size_bytes // files)
    paths: list[Path] = []
    total = 0
    for index in range(files):
        path = out_dir / f"words-{index:04d}.txt"
        data = zipf_words(seed, per_file, index)
        path.write_bytes(data)
        total += len(data)
        paths.append(path)
    return CorpusSpec(tuple(paths), total, seed)
