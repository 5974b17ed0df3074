"""The load balancer: a reverse proxy over the replicas, plus active health checks.

The decisions (which replica, eject or not, liveness failed or not) are the
sans-I/O ``Router``'s; this module is the asyncio shell that feeds it outcomes
and clock readings. Its HTTP server is ``serve/frontend.py`` (which reads the
body, bounded: 413 beyond ``body_bytes_max``) and calls ``Balancer.dispatch``.
Per request:

1. pick a routable replica; none with room -> 503 + ``Retry-After``;
2. one attempt, bounded by ``attempt_timeout_s`` and the request's deadline;
3. a failure before the client got any response byte (reset, timeout, or the
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
from collections.abc import Callable
from ssl import SSLContext
from typing import Any

from lepton_ai.serve.config import BalancerConfig
from lepton_ai.serve.lb_metrics import CONTENT_TYPE, BalancerMetrics
from lepton_ai.serve.policy import Outcome, Rng, Router
from lepton_ai.serve.upstream import (
    Conn,
    PoolLimits,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
)

Headers = list[tuple[bytes, bytes]]
Reply = tuple[int, Headers, bytes]  # status, end-to-end headers, body
OnReply = Callable[[Reply], None]

_LOCAL = {"/healthz", "/readyz", "/metrics", "/status"}


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
        self.metrics = BalancerMetrics()
        self._connects: set[asyncio.Task[Conn]] = set()  # new upstream connections

    def now(self) -> float:
        return self._clock()

    # -- membership (called by the supervisor) ---------------------------------------
    def add_replica(
        self, replica_id: int, port: int, host: str = "127.0.0.1", ssl: SSLContext | None = None
    ) -> None:
        self.router.add(replica_id)
        self._pools[replica_id] = UpstreamPool(host, port, self._limits, ssl)

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

    # -- one client request (the front end calls this) ---------------------------------
    def dispatch(
        self, method: str, target: str, headers: Headers, body: bytes, on_reply: OnReply
    ) -> None:
        """Answer one client request through ``on_reply`` (called exactly once, maybe now).

        Local endpoints answer at once; everything else is forwarded by a ``_Forward``
        driven by upstream callbacks and one timer per attempt, so the common case
        (an idle pooled connection) costs no task and no future.
        """
        if method == "GET":
            path = target.partition("?")[0]
            if path in _LOCAL:
                reply = self._local(path)
                self.metrics.count(reply[0])
                on_reply(reply)
                return
        _Forward(self, method, target, headers, body, on_reply=on_reply).next_attempt()

    def close(self) -> None:
        """Cancel connection attempts in flight (their requests end with an error) and
        close the idle upstream connections."""
        for task in list(self._connects):
            task.cancel()
        for pool in self._pools.values():
            pool.drop_idle()

    def _local(self, path: str) -> Reply:
        now = self._clock()
        if path == "/healthz":
            return json_reply(200, {"status": "alive"})
        if path == "/readyz":
            ok = self.router.any_ready(now)
            return json_reply(200 if ok else 503, {"ready": ok})
        if path == "/status":
            return json_reply(200, {"replicas": self._status()})
        ready = sum(1 for v in self.router.views() if v.ready and not v.ejected(now))
        self.metrics.ready = ready
        return 200, [(b"content-type", CONTENT_TYPE.encode())], self.metrics.render()


class _Forward:
    """One proxied request: attempts on replicas until an answer, or give up.

    At most ``retries_max`` retries after failures that may have reached a
    replica; refused connections (the request went nowhere) do not count. Each
    replica is tried at most once, so this ends within len(replicas) attempts.
    Every ``router.begin`` is matched by one ``router.finish`` (``_end_attempt``).
    """

    __slots__ = (
        "body",
        "conn",
        "connecting",
        "data",
        "deadline",
        "headers",
        "last",
        "lb",
        "method",
        "on_reply",
        "replica_id",
        "retries",
        "reused",
        "t0",
        "target",
        "timer",
        "tried",
    )

    def __init__(
        self,
        lb: Balancer,
        method: str,
        target: str,
        headers: Headers,
        body: bytes,
        *,
        on_reply: OnReply,
    ) -> None:
        self.lb = lb
        self.method = method
        self.target = target
        self.headers = headers
        self.body = body
        self.on_reply = on_reply
        self.t0 = time.perf_counter()
        self.deadline = lb._clock() + lb.config.request_timeout_s
        self.tried: frozenset[int] = frozenset()
        self.retries = 0
        self.last: Reply | None = None  # the latest failure's answer, if all else fails
        self.replica_id = -1
        self.conn: Conn | None = None
        self.connecting: asyncio.Task[Conn] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.data = b""
        self.reused = False

    def next_attempt(self) -> None:
        lb = self.lb
        now = lb._clock()
        replica_id = lb.router.pick(now, lb._rng, self.tried)
        if replica_id is None:
            if self.last is None:
                lb.metrics.shed += 1
                full = lb.router.any_ready(now)
                msg = "all replicas are at their queue bound" if full else "no ready replica"
                retry_after = (b"retry-after", b"%d" % lb.config.retry_after_s)
                self.last = json_reply(503, {"error": msg}, [retry_after])
            self._reply(self.last)
            return
        if self.tried:
            lb.metrics.retries += 1
        self.tried = self.tried | {replica_id}
        self.replica_id = replica_id
        pool = lb._pools[replica_id]
        lb.router.begin(replica_id)
        timeout_s = min(lb.config.attempt_timeout_s, self.deadline - now)
        self.timer = asyncio.get_running_loop().call_later(timeout_s, self._timed_out)
        self.data = pool.build_request(self.method, self.target, self.headers, self.body)
        conn = pool.take_idle()
        if conn is None:
            self._connect(pool)
        else:
            self._send(conn, reused=True)

    def _connect(self, pool: UpstreamPool) -> None:
        task = asyncio.get_running_loop().create_task(pool.connect())
        self.lb._connects.add(task)
        self.connecting = task
        task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task[Conn]) -> None:
        self.lb._connects.discard(task)
        if task is not self.connecting:  # the attempt ended meanwhile (timed out)
            if not task.cancelled() and task.exception() is None:
                task.result().close()
            return
        self.connecting = None
        if task.cancelled():
            self._attempt_failed(UpstreamError(Outcome.RESET, False, "the balancer is closing"))
            return
        exc = task.exception()
        if exc is None:
            self._send(task.result(), reused=False)
        elif isinstance(exc, UpstreamError):
            self._attempt_failed(exc)
        else:
            self._attempt_failed(UpstreamError(Outcome.RESET, True, f"connect failed: {exc!r}"))

    def _send(self, conn: Conn, *, reused: bool) -> None:
        self.conn = conn
        self.reused = reused
        try:
            conn.send(self.data, self, head=self.method == "HEAD")
        except UpstreamError as exc:
            self.failure(conn, exc)

    # -- Sink: the upstream connection calls one of these --------------------------------
    def response(self, conn: Conn, keep: bool, response: UpstreamResponse) -> None:
        self.conn = None
        pool = self.lb._pools.get(self.replica_id)
        if keep and pool is not None:
            pool.put(conn)
        else:
            conn.close()
        # 503 is a replica shedding load, not a sick replica; other 5xx count toward ejection.
        sick = response.status >= 500 and response.status != 503
        self._end_attempt(Outcome.SERVER_ERROR if sick else Outcome.OK)
        self._reply((response.status, response.headers, response.body))

    def failure(self, conn: Conn, error: UpstreamError) -> None:
        self.conn = None
        pool = self.lb._pools.get(self.replica_id)
        stale = self.reused and error.retryable and error.outcome is Outcome.RESET
        if stale and pool is not None:
            # A keep-alive connection the replica had closed says nothing about its
            # health: once more on a fresh connection, within the same attempt.
            self.reused = False
            pool.drop_idle()
            self._connect(pool)
            return
        self._attempt_failed(error)

    # -- endings -----------------------------------------------------------------------------
    def _timed_out(self) -> None:
        self.timer = None
        if self.conn is not None:
            self.conn.abort()  # its state is unknown; it tells nobody
            self.conn = None
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        self._attempt_failed(UpstreamError(Outcome.TIMEOUT, True, "timed out"))

    def _attempt_failed(self, error: UpstreamError) -> None:
        self._end_attempt(error.outcome)
        replica_id = self.replica_id
        if error.outcome is Outcome.TIMEOUT:
            doc: dict[str, Any] = {"error": f"replica {replica_id} timed out"}
        else:
            doc = {"error": f"replica {replica_id}: {error}"}
        doc["replica"] = replica_id
        self.last = json_reply(504 if error.outcome is Outcome.TIMEOUT else 502, doc)
        if not error.retryable or self.lb._clock() >= self.deadline:
            self._reply(self.last)
            return
        # A refused connection never delivered the request: trying elsewhere is free.
        if error.outcome is not Outcome.REFUSED:
            self.retries += 1
            if self.retries > self.lb.config.retries_max:
                self._reply(self.last)
                return
        self.next_attempt()

    def _end_attempt(self, outcome: Outcome) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        lb = self.lb
        lb.metrics.attempt(outcome)
        if lb.router.finish(self.replica_id, outcome, lb._clock()):
            lb.metrics.ejections += 1

    def _reply(self, reply: Reply) -> None:
        metrics = self.lb.metrics
        metrics.count(reply[0])
        metrics.observe(time.perf_counter() - self.t0)
        self.on_reply(reply)


def json_reply(status: int, doc: dict[str, Any], extra: Headers | None = None) -> Reply:
    body = json.dumps(doc).encode()
    return status, [(b"content-type", b"application/json"), *(extra or [])], body
