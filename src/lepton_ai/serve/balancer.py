"""The load balancer: an ASGI reverse proxy over the replicas, plus active health checks.

The decisions (which replica, eject or not, liveness failed or not) are the
sans-I/O ``Router``'s; this module is the asyncio shell that feeds it outcomes
and clock readings. Per request:

1. read the body (bounded: 413 beyond ``body_bytes_max``);
2. pick a routable replica; none with room -> 503 + ``Retry-After``;
3. one attempt, bounded by ``attempt_timeout_s`` and the request's deadline;
4. a failure before the client got any response byte (reset, timeout, or the
   replica's connection cut mid-response: responses are buffered whole) is
   retried once on another replica; a refused connection (the request went
   nowhere) moves on to another replica without using up that retry; a
   malformed answer or a 5xx answer is returned as is.

Endpoints served by the balancer itself: ``GET /healthz``, ``/readyz`` (some
replica is ready), ``/metrics`` (Prometheus), ``/status`` (JSON replica list).
Everything else is proxied.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from lepton_ai.serve.config import BalancerConfig
from lepton_ai.serve.policy import Outcome, Rng, Router
from lepton_ai.serve.upstream import PoolLimits, UpstreamError, UpstreamPool, UpstreamResponse

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_LOCAL = {"/healthz", "/readyz", "/metrics", "/status"}


class _TooLarge(Exception):
    pass


class _ClientGone(Exception):
    pass


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "lepton_lb_requests", "client requests by status", ["code"], registry=r
        )
        self.attempts = Counter(
            "lepton_lb_attempts", "upstream attempts by outcome", ["outcome"], registry=r
        )
        self.retries = Counter(
            "lepton_lb_retries", "attempts retried on another replica", registry=r
        )
        self.ejections = Counter("lepton_lb_ejections", "passive outlier ejections", registry=r)
        self.shed = Counter("lepton_lb_shed", "requests answered 503 (no room)", registry=r)
        self.latency = Histogram("lepton_lb_request_seconds", "client request latency", registry=r)
        self.ready = Gauge("lepton_lb_ready_replicas", "replicas ready and not ejected", registry=r)
        self._by_status: dict[int, Any] = {}  # labels() per request is measurable CPU
        self._by_outcome: dict[Outcome, Any] = {}

    def attempt(self, outcome: Outcome) -> None:
        child = self._by_outcome.get(outcome)
        if child is None:
            child = self._by_outcome[outcome] = self.attempts.labels(outcome.value)
        child.inc()

    def count(self, status: int) -> None:
        child = self._by_status.get(status)
        if child is None:
            if len(self._by_status) >= 64:  # bounded: status codes are few
                self.requests.labels(str(status)).inc()
                return
            child = self._by_status[status] = self.requests.labels(str(status))
        child.inc()


class Balancer:
    """Routes requests to replicas; the supervisor adds, readies and removes them."""

    def __init__(
        self,
        config: BalancerConfig | None = None,
        *,
        rng: Rng | None = None,
        clock: Callable[[], float] = time.monotonic,
        status: Callable[[], list[dict[str, Any]]] = list,
    ) -> None:
        self.config = config or BalancerConfig()
        self.router = Router(self.config.router)
        self._rng: Rng = rng or random.Random()
        self._clock = clock
        self._status = status
        self._pools: dict[int, UpstreamPool] = {}
        self._limits = PoolLimits(
            idle_max=self.config.pool_idle_max,
            idle_s=self.config.pool_idle_s,
            header_bytes_max=self.config.header_bytes_max,
            body_bytes_max=self.config.response_bytes_max,
        )
        self.metrics = _Metrics()

    def now(self) -> float:
        return self._clock()

    # -- membership (called by the supervisor) ---------------------------------------
    def add_replica(self, replica_id: int, port: int, host: str = "127.0.0.1") -> None:
        self.router.add(replica_id)
        self._pools[replica_id] = UpstreamPool(host, port, self._limits)

    def set_ready(self, replica_id: int) -> None:
        self.router.health_result(replica_id, alive=True, ready=True)

    def remove_replica(self, replica_id: int) -> None:
        self.router.remove(replica_id)
        pool = self._pools.pop(replica_id, None)
        if pool is not None:
            pool.close()

    async def drain(self, replica_id: int, timeout_s: float) -> bool:
        """Stop routing to a replica and wait for its in-flight requests. True if it emptied."""
        self.router.drain(replica_id)
        deadline = self._clock() + timeout_s
        while self.router.outstanding(replica_id) > 0:
            if self._clock() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    # -- active health -----------------------------------------------------------------
    async def probe(self, replica_id: int, timeout_s: float | None = None) -> tuple[bool, bool]:
        """(alive, ready) from one GET /readyz: any answer means alive, 200 means ready."""
        pool = self._pools.get(replica_id)
        if pool is None:
            return False, False
        try:
            async with asyncio.timeout(timeout_s or self.config.health_timeout_s):
                resp = await pool.request("GET", "/readyz", [], b"")
        except (TimeoutError, UpstreamError):
            return False, False
        return True, resp.status == 200

    async def health_loop(self, on_dead: Callable[[int], None]) -> None:
        """Probe every replica each period; ``on_dead`` gets the ones that failed liveness."""
        while True:
            started = self._clock()
            ids = [v.replica_id for v in self.router.views()]
            results = await asyncio.gather(*(self.probe(i) for i in ids))
            for replica_id, (alive, ready) in zip(ids, results, strict=True):
                if self.router.health_result(replica_id, alive=alive, ready=ready):
                    on_dead(replica_id)
            elapsed = self._clock() - started
            await asyncio.sleep(max(self.config.health_period_s - elapsed, 0.0))

    # -- ASGI ----------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            raise ValueError(f"unsupported ASGI scope {scope['type']!r}")
        t0 = time.perf_counter()
        if scope["method"] == "GET" and scope["path"] in _LOCAL:
            status = await self._local(scope["path"], send)
        else:
            status = await self._proxy(scope, receive, send)
        self.metrics.count(status)
        self.metrics.latency.observe(time.perf_counter() - t0)

    async def _local(self, path: str, send: Send) -> int:
        now = self._clock()
        if path == "/healthz":
            return await _send_json(send, 200, {"status": "alive"})
        if path == "/readyz":
            ok = self.router.any_ready(now)
            return await _send_json(send, 200 if ok else 503, {"ready": ok})
        if path == "/status":
            return await _send_json(send, 200, {"replicas": self._status()})
        ready = sum(1 for v in self.router.views() if v.ready and not v.ejected(now))
        self.metrics.ready.set(ready)
        body = generate_latest(self.metrics.registry)
        await _send(send, 200, [(b"content-type", CONTENT_TYPE_LATEST.encode())], body)
        return 200

    async def _proxy(self, scope: Scope, receive: Receive, send: Send) -> int:
        try:
            body = await _read_body(receive, self.config.body_bytes_max)
        except _TooLarge:
            return await _send_json(send, 413, {"error": "request body too large"})
        except _ClientGone:
            return 499  # nginx's code for it; nothing is sent and nothing is forwarded
        path = scope.get("raw_path") or scope["path"].encode()
        if scope.get("query_string"):
            path = path + b"?" + scope["query_string"]
        resp, error = await self.forward(scope["method"], path.decode(), scope["headers"], body)
        if resp is None:
            status, doc, extra = error
            return await _send_json(send, status, doc, extra)
        return await _send(send, resp.status, resp.headers, resp.body)

    async def forward(
        self, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> tuple[UpstreamResponse | None, tuple[int, dict[str, Any], list[tuple[bytes, bytes]]]]:
        """Route one request: (response, _) or (None, (status, error body, headers)).

        At most ``retries_max`` retries after failures that may have reached a
        replica; refused connections (the request went nowhere) do not count.
        """
        cfg = self.config
        deadline = self._clock() + cfg.request_timeout_s
        tried: set[int] = set()
        last: tuple[int, dict[str, Any], list[tuple[bytes, bytes]]] = (
            503,
            {"error": "no ready replica"},
            [(b"retry-after", b"%d" % cfg.retry_after_s)],
        )
        retries = 0
        # Each replica is tried at most once, so this loop ends within len(replicas) turns.
        while True:
            now = self._clock()
            replica_id = self.router.pick(now, self._rng, frozenset(tried))
            if replica_id is None:
                if not tried:
                    self.metrics.shed.inc()
                    full = self.router.any_ready(now)
                    msg = "all replicas are at their queue bound" if full else "no ready replica"
                    last = (503, {"error": msg}, last[2])
                return None, last
            if tried:
                self.metrics.retries.inc()
            tried.add(replica_id)
            resp, outcome, retryable, message = await self._attempt(
                replica_id, (method, path, headers, body), deadline - now
            )
            self.metrics.attempt(outcome)
            if self.router.finish(replica_id, outcome, self._clock()):
                self.metrics.ejections.inc()
            if resp is not None:
                return resp, last
            status = 504 if outcome is Outcome.TIMEOUT else 502
            last = (status, {"error": message, "replica": replica_id}, [])
            if not retryable or self._clock() >= deadline:
                return None, last
            # A refused connection never delivered the request: trying elsewhere is free.
            if outcome is not Outcome.REFUSED:
                retries += 1
                if retries > cfg.retries_max:
                    return None, last

    async def _attempt(
        self,
        replica_id: int,
        request: tuple[str, str, list[tuple[bytes, bytes]], bytes],
        remaining_s: float,
    ) -> tuple[UpstreamResponse | None, Outcome, bool, str]:
        pool = self._pools[replica_id]
        self.router.begin(replica_id)
        try:
            async with asyncio.timeout(min(self.config.attempt_timeout_s, remaining_s)):
                resp = await pool.request(*request)
        except TimeoutError:
            return None, Outcome.TIMEOUT, True, f"replica {replica_id} timed out"
        except UpstreamError as exc:
            return None, exc.outcome, exc.retryable, f"replica {replica_id}: {exc}"
        # 503 is a replica shedding load, not a sick replica; other 5xx count toward ejection.
        sick = resp.status >= 500 and resp.status != 503
        return resp, Outcome.SERVER_ERROR if sick else Outcome.OK, False, ""


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _send(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> int:
    out = [*headers, (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": body})
    return status


async def _send_json(
    send: Send, status: int, doc: dict[str, Any], extra: list[tuple[bytes, bytes]] | None = None
) -> int:
    body = json.dumps(doc).encode()
    headers = [(b"content-type", b"application/json"), *(extra or [])]
    return await _send(send, status, headers, body)
