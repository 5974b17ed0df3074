"""A bounded closed-loop load generator for 127.0.0.1 (tests and benchmarks).

``concurrency`` workers each send one request at a time until ``requests_max``
requests were sent or ``duration_s_max`` passed, whichever comes first. It does
not retry, not even on a stale keep-alive connection: every request that does
not come back 200 counts as failed.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from ssl import SSLContext
from urllib.parse import urlsplit

from lepton_ai import eventloop
from lepton_ai.serve.upstream import UpstreamError, UpstreamPool


@dataclass
class LoadResult:
    latencies_s: list[float] = field(default_factory=list)  # of successful requests
    max_latency_s: float = 0.0  # of all requests, failed ones included
    statuses: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)  # first few failure reasons
    duration_s: float = 0.0

    @property
    def ok(self) -> int:
        return len(self.latencies_s)

    @property
    def failed(self) -> int:
        return sum(self.statuses.values()) - self.ok

    @property
    def rps(self) -> float:
        return self.ok / self.duration_s if self.duration_s > 0 else 0.0

    def percentile_ms(self, q: float) -> float:
        if not self.latencies_s:
            return float("nan")
        data = sorted(self.latencies_s)
        index = min(len(data) - 1, max(0, round(q / 100.0 * (len(data) - 1))))
        return data[index] * 1000.0


_ERRORS_KEPT = 20


async def run_load(
    url: str,
    body: bytes,
    *,
    concurrency: int,
    requests_max: int,
    duration_s_max: float,
    timeout_s: float = 10.0,
    stop: threading.Event | None = None,
    ssl: SSLContext | None = None,
) -> LoadResult:
    """POST ``body`` to ``url`` (``http://127.0.0.1:PORT/path``) under bounded load;
    ``https://`` with ``ssl`` (the client context that trusts the server)."""
    parts = urlsplit(url)
    scheme = "http" if ssl is None else "https"
    if parts.scheme != scheme or parts.hostname != "127.0.0.1" or parts.port is None:
        raise ValueError(f"the load generator only targets {scheme}://127.0.0.1:PORT")
    if concurrency <= 0 or requests_max <= 0 or duration_s_max <= 0:
        raise ValueError("concurrency, requests_max and duration_s_max must be positive")
    pool = UpstreamPool("127.0.0.1", parts.port, ssl=ssl)
    headers = [(b"content-type", b"application/json")]
    result = LoadResult()
    sent = 0
    t0 = time.perf_counter()
    deadline = t0 + duration_s_max

    async def worker() -> None:
        nonlocal sent
        while sent < requests_max and time.perf_counter() < deadline:
            if stop is not None and stop.is_set():
                return
            sent += 1
            start = time.perf_counter()
            try:
                async with asyncio.timeout(timeout_s):
                    resp = await pool.request(
                        "POST", parts.path or "/", headers, body, retry_stale=False
                    )
                status = str(resp.status)
                reason = resp.body[:200].decode(errors="replace")
            except (TimeoutError, UpstreamError) as exc:
                status, reason = type(exc).__name__, str(exc)
            elapsed = time.perf_counter() - start
            result.statuses[status] += 1
            result.max_latency_s = max(result.max_latency_s, elapsed)
            if status == "200":
                result.latencies_s.append(elapsed)
            elif len(result.errors) < _ERRORS_KEPT:
                result.errors.append(f"{status}: {reason}")

    try:
        async with asyncio.TaskGroup() as tg:
            for _ in range(concurrency):
                tg.create_task(worker())
    finally:
        pool.close()
    result.duration_s = time.perf_counter() - t0
    return result


def run_load_sync(url: str, body: bytes, **kwargs: object) -> LoadResult:
    """``run_load`` in a fresh event loop (call it from a plain thread).

    uvloop's when installed: the generator shares the host's CPUs with what it
    measures, so the less it spends per request the less it skews the figures.
    """
    return eventloop.run(run_load(url, body, **kwargs))  # type: ignore[arg-type]
