"""Task functions and measurement helpers shared by every framework under test.

This module is imported by the framework workers (Dask, Ray, lepton executors,
pool processes) by reference, so it must stay importable with only the standard
library and psutil: ``compute_bench.py`` puts ``benchmarks/`` on PYTHONPATH for
the whole process tree of each peer.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import Counter
from collections.abc import Iterable

import psutil

CPU_TASK_S = 0.010
SAMPLE_INTERVAL_S = 0.02
# After start-up: one sample of a ~10-process tree costs ~1.8 ms of the driver's CPU
# (psutil walks /proc), so every 20 ms it would take ~9% of a core from the timed
# scenarios - more from peers with more processes. Their run-wide peak is sampled
# every second instead.
RUN_SAMPLE_INTERVAL_S = 1.0


def noop(x: int) -> int:
    return x


def burn(seconds: float) -> float:
    """Spin for ``seconds`` of this thread's CPU time (not wall time: fair under load)."""
    end = time.thread_time() + seconds
    n = 0
    while time.thread_time() < end:
        n += 1
    return seconds


def count_file(path: str) -> Counter[str]:
    with open(path, encoding="ascii") as f:
        return Counter(f.read().split())


def count_lines(lines: Iterable[str]) -> list[Counter[str]]:
    """Word count of one partition given as lines (lepton's read_text form)."""
    counts: Counter[str] = Counter()
    for line in lines:
        counts.update(line.split())
    return [counts]


def merge_counts(a: Counter[str], b: Counter[str]) -> Counter[str]:
    a.update(b)
    return a


def add(a: int, b: int) -> int:
    return a + b


def digest(counts: dict[str, int]) -> str:
    h = hashlib.sha256()
    for word, n in sorted(counts.items()):
        h.update(f"{word}\t{n}\n".encode())
    return h.hexdigest()[:16]


def tree_rss_bytes(root: psutil.Process) -> int:
    """Sum of RSS over ``root`` and all its descendants (vanished ones skipped)."""
    total = 0
    procs = [root]
    try:
        procs.extend(root.children(recursive=True))
    except psutil.Error:
        pass
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total


class PeakSampler:
    """Samples the RSS of this process tree in a thread; ``window()`` gives peaks per phase."""

    def __init__(self, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        self._root = psutil.Process(os.getpid())
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._peak = 0
        self._overall = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self._interval_s)

    def slow_down(self, interval_s: float = RUN_SAMPLE_INTERVAL_S) -> None:
        """Sample less often from now on (once the start-up peak is taken)."""
        self._interval_s = interval_s

    def sample(self) -> int:
        rss = tree_rss_bytes(self._root)
        with self._lock:
            self._peak = max(self._peak, rss)
            self._overall = max(self._overall, rss)
        return rss

    def reset(self) -> None:
        with self._lock:
            self._peak = 0

    def peak_mb(self) -> float:
        self.sample()
        with self._lock:
            return self._peak / 1e6

    def overall_mb(self) -> float:
        with self._lock:
            return self._overall / 1e6
