"""The balancer in-process: its HTTP front end (``serve/frontend.py``, on an ephemeral
port in the test's own event loop) over small upstream servers on 127.0.0.1 that
misbehave in exactly one way each (refuse, reset, hang, answer half a response,
500, slow).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from helpers import wait_until_async
from lepton_ai.serve.balancer import Balancer
from lepton_ai.serve.config import BalancerConfig
from lepton_ai.serve.frontend import FrontEnd
from lepton_ai.serve.loadgen import run_load
from lepton_ai.serve.policy import RouterConfig
from lepton_ai.serve.upstream import UpstreamPool

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> bytes | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await reader.readexactly(length)
    return head.split(b" ")[1]  # the path


def _http(status: int, body: bytes) -> bytes:
    return b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body)


def answering(status: int = 200, body: bytes = b'{"predictions": [1]}', delay_s: float = 0.0):  # type: ignore[no-untyped-def]
    """A keep-alive server: /readyz is 200, everything else ``status`` after ``delay_s``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while (path := await _read_request(reader)) is not None:
                if path == b"/readyz":
                    writer.write(_http(200, b"{}"))
                else:
                    await asyncio.sleep(delay_s)
                    writer.write(_http(status, body))
                await writer.drain()
        writer.close()

    return handle


async def resetting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    writer.transport.abort()  # RST, no response byte


async def hanging(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    await asyncio.sleep(30)


async def half_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
    await writer.drain()
    writer.transport.abort()


@contextlib.asynccontextmanager
async def upstreams(*handlers: Handler) -> AsyncIterator[list[int]]:
    servers = [await asyncio.start_server(h, "127.0.0.1", 0) for h in handlers]
    try:
        yield [s.sockets[0].getsockname()[1] for s in servers]
    finally:
        for s in servers:
            s.close()
        # Python 3.11's wait_closed can block on handlers stuck in a sleep: bounded.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.5):
                await asyncio.gather(*(s.wait_closed() for s in servers))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens here once closed


def _balancer(ports: list[int], **config: Any) -> Balancer:
    router = config.pop("router", RouterConfig())
    lb = Balancer(BalancerConfig(router=router, **config), rng=random.Random(7))
    for i, port in enumerate(ports):
        lb.add_replica(i, port)
        lb.set_ready(i)
    return lb


@contextlib.asynccontextmanager
async def _client(lb: Balancer) -> AsyncIterator[httpx.AsyncClient]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    front = FrontEnd(lb)
    await front.start(sock)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        async with httpx.AsyncClient(base_url=url, trust_env=False) as client:
            yield client
    finally:
        await front.close(drain_timeout_s=1.0)
        lb.close()


BODY = {"instances": [[1, 2]]}


def test_spreads_concurrent_requests_and_keeps_sequential_ones_on_a_warm_replica() -> None:
    async def scenario() -> None:
        replicas = [answering(delay_s=0.1) for _ in range(3)]
        async with upstreams(*replicas) as ports:
            lb = _balancer(ports)
            async with _client(lb) as client:
                for _ in range(5):  # six at a time: two in flight on each replica
                    answers = await asyncio.gather(
                        *(client.post("/predict", json=BODY) for _ in range(6))
                    )
                    assert all(a.status_code == 200 for a in answers)
                counts = Counter({v.replica_id: v.requests for v in lb.router.views()})
                assert len(counts) == 3 and min(counts.values()) >= 6, counts
                for _ in range(6):  # one at a time: all on the replica that answered last
                    assert (await client.post("/predict", json=BODY)).status_code == 200
            after = Counter({v.replica_id: v.requests for v in lb.router.views()})
            assert sorted((after - counts).values()) == [6], after - counts

    asyncio.run(scenario())


def test_refused_replica_is_retried_elsewhere_and_ejected() -> None:
    async def scenario() -> None:
        async with upstreams(answering()) as ports:
            # Ties go to the most recently used replica, so the first request meets both
            # refusals (neither uses up the one retry) before the live replica answers.
            lb = _balancer([_closed_port(), _closed_port(), *ports])
            async with _client(lb) as client:
                statuses = [
                    (await client.post("/predict", json=BODY)).status_code for _ in range(20)
                ]
            assert statuses == [200] * 20
            ejected = [v.replica_id for v in lb.router.views() if v.ejections]
            assert ejected == [0, 1]
            assert [v.requests for v in lb.router.views()] == [1, 1, 20]

    asyncio.run(scenario())


def test_reset_before_any_byte_is_retried_once() -> None:
    async def scenario() -> None:
        async with upstreams(resetting, answering()) as ports:
            lb = _balancer(ports)
            async with _client(lb) as client:
                for _ in range(10):
                    resp = await client.post("/predict", json=BODY)
                    assert resp.status_code == 200 and resp.json() == {"predictions": [1]}
            assert _metric(await _metrics(lb), "lepton_lb_retries_total") >= 1

    asyncio.run(scenario())


def test_cut_mid_response_is_retried_since_the_client_saw_nothing() -> None:
    async def scenario() -> None:
        async with upstreams(half_answer, answering()) as ports:
            lb = _balancer(ports)
            async with _client(lb) as client:
                for _ in range(10):
                    resp = await client.post("/predict", json=BODY)
                    assert resp.status_code == 200 and resp.json() == {"predictions": [1]}
            assert _metric(await _metrics(lb), "lepton_lb_retries_total") >= 1

    asyncio.run(scenario())


async def garbled_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    writer.write(b"NOT-HTTP garbage\r\n\r\n")
    await writer.drain()
    writer.transport.abort()


def test_malformed_answer_is_not_retried() -> None:
    async def scenario() -> None:
        async with upstreams(garbled_answer, answering()) as ports:
            lb = _balancer(ports)
            lb.router.drain(1)  # only the garbling replica gets the first attempt
            async with _client(lb) as client:
                resp = await client.post("/predict", json=BODY)
            assert resp.status_code == 502 and "after response bytes" in resp.json()["error"]
            view = lb.router.view(1)
            assert view is not None and view.requests == 0

    asyncio.run(scenario())


def test_hang_costs_one_attempt_timeout_then_the_retry_answers() -> None:
    async def scenario() -> None:
        async with upstreams(hanging, answering()) as ports:
            lb = _balancer(ports, attempt_timeout_s=0.3, request_timeout_s=2.0)
            lb.router.drain(1)
            async with _client(lb) as client:
                lb.router.view(1).draining = False  # type: ignore[union-attr]
                lb.router.begin(1)  # make the hanging replica the least loaded
                t0 = time.monotonic()
                resp = await client.post("/predict", json=BODY)
                elapsed = time.monotonic() - t0
            assert resp.status_code == 200
            assert 0.25 < elapsed < 1.5

    asyncio.run(scenario())


def test_request_deadline_bounds_every_attempt() -> None:
    async def scenario() -> None:
        async with upstreams(hanging, hanging) as ports:
            lb = _balancer(ports, attempt_timeout_s=0.4, request_timeout_s=0.6)
            async with _client(lb) as client:
                t0 = time.monotonic()
                resp = await client.post("/predict", json=BODY)
                elapsed = time.monotonic() - t0
            assert resp.status_code == 504
            assert elapsed < 0.9  # 0.4 s, then only the 0.2 s left for the retry

    asyncio.run(scenario())


def test_5xx_is_returned_not_retried_and_consecutive_ones_eject() -> None:
    async def scenario() -> None:
        async with upstreams(answering(500, b'{"error": "x"}'), answering(), answering()) as ports:
            lb = _balancer(ports, router=RouterConfig(consecutive_failures_max=3))
            lb.router.drain(1)
            lb.router.drain(2)
            async with _client(lb) as client:
                codes = [(await client.post("/predict", json=BODY)).status_code for _ in range(3)]
                assert codes == [500, 500, 500]
                view = lb.router.view(0)
                assert view is not None and view.ejections == 1
                lb.router.view(1).draining = False  # type: ignore[union-attr]
                assert (await client.post("/predict", json=BODY)).status_code == 200

    asyncio.run(scenario())


def test_all_queues_full_is_503_with_retry_after() -> None:
    async def scenario() -> None:
        async with upstreams(answering(delay_s=0.3)) as ports:
            lb = _balancer(ports, router=RouterConfig(outstanding_max=1))
            async with _client(lb) as client:
                first = asyncio.create_task(client.post("/predict", json=BODY))
                await wait_until_async(
                    lambda: lb.router.outstanding(0) == 1, 5.0, "the first request at the replica"
                )
                second = await client.post("/predict", json=BODY)
                assert second.status_code == 503 and second.headers["retry-after"] == "1"
                assert (await first).status_code == 200

    asyncio.run(scenario())


def test_no_ready_replica_is_503_and_oversized_body_413() -> None:
    async def scenario() -> None:
        lb = Balancer(BalancerConfig(body_bytes_max=50))
        lb.add_replica(0, _closed_port())  # not ready yet
        async with _client(lb) as client:
            resp = await client.post("/predict", json=BODY)
            assert resp.status_code == 503 and "no ready replica" in resp.json()["error"]
            assert (await client.get("/readyz")).status_code == 503
            assert (await client.post("/predict", content=b"x" * 51)).status_code == 413
            assert (await client.get("/healthz")).status_code == 200
            assert (await client.get("/status")).json() == {"replicas": []}

    asyncio.run(scenario())


def test_active_health_marks_a_dead_replica_after_three_failed_probes() -> None:
    async def scenario() -> None:
        async with upstreams(answering(), hanging) as ports:
            lb = _balancer(
                ports,
                health_period_s=0.1,
                health_timeout_s=0.05,
                router=RouterConfig(health_failures_max=3),
            )
            dead: list[int] = []
            task = asyncio.create_task(lb.health_loop(dead.append))
            try:
                await wait_until_async(lambda: dead, 3.0, "replica 1 reported dead")
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            assert dead == [1]
            assert {v.replica_id for v in lb.router.routable(time.monotonic())} == {0}

    asyncio.run(scenario())


async def _metrics(lb: Balancer) -> str:
    async with _client(lb) as client:
        return (await client.get("/metrics")).text


# -- the upstream client on its own ----------------------------------------------------------


def test_upstream_reads_chunked_bodies_and_honours_connection_close() -> None:
    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n"
        )
        await writer.drain()
        writer.close()

    async def scenario() -> None:
        async with upstreams(chunked) as ports:
            pool = UpstreamPool("127.0.0.1", ports[0])
            resp = await pool.request("GET", "/", [], b"")
            assert (resp.status, resp.body) == (200, b"hello world")
            assert all(k != b"transfer-encoding" for k, _ in resp.headers)
            assert len(pool._idle) == 0  # Connection: close is not pooled
            pool.close()

    asyncio.run(scenario())


def test_upstream_reuses_keep_alive_and_replaces_a_stale_connection() -> None:
    connections = 0

    async def one_shot(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await _read_request(reader)
        writer.write(_http(200, b"ok"))  # claims keep-alive, then closes: a stale connection
        await writer.drain()
        writer.close()

    async def scenario() -> None:
        async with upstreams(one_shot) as ports:
            pool = UpstreamPool("127.0.0.1", ports[0])
            for _ in range(3):
                assert (await pool.request("GET", "/", [], b"")).body == b"ok"
                # The server closed it after answering: the pooled connection is seen closed.
                await wait_until_async(
                    lambda: pool._idle and all(c.closed for c in pool._idle),
                    5.0,
                    "the pooled connection seen closed",
                )
            pool.close()
        assert connections == 3  # each stale connection was noticed and replaced

    asyncio.run(scenario())


def test_upstream_head_answers_and_bodies_delimited_by_close() -> None:
    async def head_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)  # HEAD: a length, no body
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(5)

    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.0 200 OK\r\nX-A: b\r\n\r\nall of it")
        await writer.drain()
        writer.close()

    async def scenario() -> None:
        async with upstreams(head_then_close, until_close) as ports:
            pool = UpstreamPool("127.0.0.1", ports[0])
            async with asyncio.timeout(2):
                resp = await pool.request("HEAD", "/", [], b"")
            assert (resp.status, resp.body) == (200, b"") and len(pool._idle) == 0
            assert resp.headers == [(b"content-length", b"5")]  # what a GET would get
            pool = UpstreamPool("127.0.0.1", ports[1])
            async with asyncio.timeout(2):
                resp = await pool.request("GET", "/", [], b"")
            assert (resp.status, resp.body, resp.headers) == (200, b"all of it", [(b"x-a", b"b")])

    asyncio.run(scenario())


def test_load_generator_is_bounded_and_loopback_only() -> None:

    for url in ("http://10.0.0.1:80/predict", "https://127.0.0.1:443/", "http://localhost:80/"):
        with pytest.raises(ValueError):
            asyncio.run(run_load(url, b"", concurrency=1, requests_max=1, duration_s_max=1))

    async def scenario() -> None:
        async with upstreams(answering()) as ports:
            url = f"http://127.0.0.1:{ports[0]}/predict"
            result = await run_load(url, b"{}", concurrency=4, requests_max=50, duration_s_max=5)
            assert (result.ok, result.failed) == (50, 0), result.errors  # the count bound
            result = await run_load(
                url, b"{}", concurrency=2, requests_max=10**9, duration_s_max=0.3
            )
            # And at the time bound (the margin is for a loaded host's scheduling stalls).
            assert 0.3 <= result.duration_s < 2.0, result.duration_s

    asyncio.run(scenario())


# -- the HTTP front end itself (raw sockets: what httpx would smooth over) ----------------


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A keep-alive replica that answers with the request line and body it received."""
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            body = await reader.readexactly(length)
            out = head.split(b"\r\n", 1)[0] + b"|" + body
            writer.write(_http(200, out))
            await writer.drain()


@contextlib.asynccontextmanager
async def _front(lb: Balancer) -> AsyncIterator[tuple[FrontEnd, int]]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    front = FrontEnd(lb)
    await front.start(sock)
    try:
        yield front, sock.getsockname()[1]
    finally:
        await front.close(drain_timeout_s=1.0)
        lb.close()


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = dict(line.lower().split(b": ", 1) for line in lines[1:] if line)
    body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
    return int(lines[0].split(b" ")[1]), headers, body


def _post(path: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: x\r\n%sContent-Length: %d\r\n\r\n%s" % (
        path,
        extra,
        len(body),
        body,
    )


def test_front_end_pipelining_keep_alive_and_request_forms() -> None:
    async def scenario() -> None:
        async with upstreams(echo) as ports, _front(_balancer(ports)) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            # Three pipelined requests in one write are answered in order on one connection.
            writer.write(_post(b"/a?x=1", b"one") + _post(b"/b", b"two") + _post(b"/c", b""))
            answers = [await _read_answer(reader) for _ in range(3)]
            assert [a[2] for a in answers] == [
                b"POST /a?x=1 HTTP/1.1|one",
                b"POST /b HTTP/1.1|two",
                b"POST /c HTTP/1.1|",
            ]
            assert all(a[0] == 200 and b"date" in a[1] for a in answers)
            # A chunked request body reaches the replica whole, with a Content-Length.
            writer.write(
                b"POST /d HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
            )
            assert (await _read_answer(reader))[2] == b"POST /d HTTP/1.1|abcde"
            # Expect: 100-continue gets its interim answer before the body is sent.
            writer.write(
                b"POST /e HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
            )
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(b"hi")
            assert (await _read_answer(reader))[2] == b"POST /e HTTP/1.1|hi"
            # Connection: close is honoured: answered, then closed.
            writer.write(_post(b"/f", b"", b"Connection: close\r\n"))
            status, headers, _ = await _read_answer(reader)
            assert status == 200 and headers[b"connection"] == b"close"
            assert await reader.read() == b""
            writer.close()
            # HTTP/1.0 without keep-alive: closed after the answer too.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /healthz HTTP/1.0\r\n\r\n")
            assert (await _read_answer(reader))[0] == 200
            assert await reader.read() == b""
            writer.close()

    asyncio.run(scenario())


async def sized(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A keep-alive replica whose GET answer is 42 bytes; its HEAD answer says so, bodiless."""
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            body = b"" if head.startswith(b"HEAD ") else b"g" * 42
            writer.write(b"HTTP/1.1 200 OK\r\nX-Kind: sized\r\nContent-Length: 42\r\n\r\n" + body)
            await writer.drain()


def test_front_end_head_answer_keeps_the_replicas_content_length_and_has_no_body() -> None:
    async def scenario() -> None:
        async with upstreams(sized) as ports, _front(_balancer(ports)) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            # HEAD then GET pipelined: were a body sent after the HEAD answer, the GET's
            # answer would not start where the HEAD answer's head ends.
            writer.write(b"HEAD /m HTTP/1.1\r\nHost: x\r\n\r\nGET /m HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ")
            lines = head.lower().split(b"\r\n")
            assert lines.count(b"content-length: 42") == 1 and b"x-kind: sized" in lines
            status, headers, body = await _read_answer(reader)
            assert (status, headers[b"content-length"], body) == (200, b"42", b"g" * 42)
            writer.close()
        # A HEAD the balancer answers itself (no replica): its error's length, no body.
        async with _front(_balancer([])) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"HEAD /m HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503 ") and b"content-length: 0" not in head
            assert (await _read_answer(reader))[:1] == (200,)
            writer.close()

    asyncio.run(scenario())


def test_front_end_http_1_0_keep_alive_is_answered_as_such() -> None:
    async def scenario() -> None:
        async with _front(_balancer([])) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for _ in range(2):  # kept open: the second request is answered on it too
                writer.write(b"GET /healthz HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
                status, headers, _ = await _read_answer(reader)
                assert status == 200 and headers[b"connection"] == b"keep-alive"
            # An HTTP/1.0 request without it: told so, and closed.
            writer.write(b"GET /healthz HTTP/1.0\r\n\r\n")
            status, headers, _ = await _read_answer(reader)
            assert status == 200 and headers[b"connection"] == b"close"
            assert await reader.read() == b""
            writer.close()
            # HTTP/1.1 keeps alive by default: no Connection header either way.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for extra in (b"", b"Connection: keep-alive\r\n"):
                writer.write(b"GET /healthz HTTP/1.1\r\n%s\r\n" % extra)
                status, headers, _ = await _read_answer(reader)
                assert status == 200 and b"connection" not in headers
            writer.close()

    asyncio.run(scenario())


def test_front_end_large_bodies_both_ways_and_a_pipelining_flood() -> None:
    async def scenario() -> None:
        async with upstreams(echo) as ports:
            lb = _balancer(ports, pipeline_max=4)
            async with _front(lb) as (_, port):
                # A head and a large body arrive in one read, each way: not a "large head".
                big = b"x" * 300_000
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(_post(b"/big", big))
                status, _, body = await _read_answer(reader)
                assert status == 200 and body == b"POST /big HTTP/1.1|" + big
                # More pipelined requests in one write than reading pauses for: refused.
                writer.write(b"".join(_post(b"/p", b"") for _ in range(20)))
                answers = []
                with contextlib.suppress(asyncio.IncompleteReadError):
                    while True:
                        answers.append((await _read_answer(reader))[0])
                # Answered in order until the refusal (a 429 if nothing was in flight), then closed.
                assert len(answers) < 20 and set(answers) <= {200, 429}
                writer.close()

    asyncio.run(scenario())


def test_front_end_rejects_bad_requests_with_a_status_and_closes() -> None:
    async def scenario() -> None:
        lb = _balancer([], header_bytes_max=1024, body_bytes_max=10)
        async with _front(lb) as (_, port):
            cases = [
                (b"NOT HTTP AT ALL\r\n\r\n", 400),
                (b"GET /x HTTP/1.1\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n", 431),
                (_post(b"/predict", b"x" * 11), 413),  # declared too large
                (
                    b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                    + b"b\r\n"
                    + b"x" * 11
                    + b"\r\n0\r\n\r\n",
                    413,  # found too large while streaming
                ),
            ]
            for data, expected in cases:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(data)
                status, _, body = await _read_answer(reader)
                assert status == expected, (data[:40], body)
                assert await reader.read() == b""  # and the connection is closed
                writer.close()
        assert lb.metrics.by_status.get(413) == 2

    asyncio.run(scenario())


def test_front_end_bounds_connections_and_closes_idle_ones() -> None:
    async def scenario() -> None:
        lb = _balancer([], connections_max=1, keep_alive_s=0.3)
        async with _front(lb) as (front, port):
            r1, w1 = await asyncio.open_connection("127.0.0.1", port)
            await wait_until_async(lambda: len(front.connections) == 1, 5.0, "connection 1 taken")
            r2, w2 = await asyncio.open_connection("127.0.0.1", port)
            status, _, body = await _read_answer(r2)
            assert status == 503 and b"too many connections" in body
            w2.close()
            w1.write(b"GET /healthz HTTP/1.1\r\n\r\n")
            assert (await _read_answer(r1))[0] == 200
            t0 = time.monotonic()
            assert await asyncio.wait_for(r1.read(), 3.0) == b""  # closed once idle
            assert 0.2 < time.monotonic() - t0 < 2.0
            w1.close()
            assert front.connections == set()

    asyncio.run(scenario())


def test_front_end_close_drains_requests_in_flight() -> None:
    async def scenario() -> None:
        async with upstreams(answering(delay_s=0.3)) as ports:
            lb = _balancer(ports)
            async with _front(lb) as (front, port):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(_post(b"/predict", b"{}"))
                await wait_until_async(
                    lambda: lb.router.outstanding(0) == 1, 5.0, "the request at the replica"
                )
                t0 = time.monotonic()
                await front.close(drain_timeout_s=5.0)
                assert time.monotonic() - t0 < 1.0
                status, headers, _ = await _read_answer(reader)
                assert status == 200 and headers[b"connection"] == b"close"
                with pytest.raises(OSError):
                    await asyncio.open_connection("127.0.0.1", port)  # no longer accepting
                writer.close()
            assert lb.router.outstanding(0) == 0

    asyncio.run(scenario())


def test_front_end_and_upstream_on_uvloop() -> None:
    """The deployment runs on uvloop when it is installed: same behaviour there."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        async with upstreams(resetting, answering()) as ports:
            lb = _balancer(ports)
            async with _client(lb) as client:
                for _ in range(10):
                    resp = await client.post("/predict", json=BODY)
                    assert resp.status_code == 200 and resp.json() == {"predictions": [1]}
            assert _metric(await _metrics(lb), "lepton_lb_retries_total") >= 1

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in the metrics")
