"""The serving front end against hostile clients, over real sockets on loopback.

A ``FrontEnd`` over a real ``Balancer`` whose one replica is a small keep-alive echo
server: slow-drip heads and bodies are answered 408 and closed near their deadline,
a client past its connection share gets 429 while other clients (and its own held
connections) are served, and ``Expect: 100-continue`` with a too-large
Content-Length is refused at once. Every refusal is a JSON ``{"error": ...}``.
Deadlines are configured small (0.5 s) so each test takes a second or two.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest

from helpers import wait_until_async
from lepton_ai.serve.balancer import Balancer
from lepton_ai.serve.config import BalancerConfig
from lepton_ai.serve.frontend import FrontEnd

HOST = "127.0.0.1"
OTHER_HOST = "127.0.0.2"  # also loopback on Linux: a second client address
ANSWER_WAIT_S = 3.0  # any single answer the tests wait for; far above every deadline here
DEADLINE_S = 0.5  # the small header/body deadline the tests configure
DRIP_PERIOD_S = 0.1  # a hostile client sends one byte this often


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A keep-alive replica answering each request with the body it received."""
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            body = await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def _serving(**config: Any) -> AsyncIterator[tuple[Balancer, FrontEnd, int]]:
    """A front end on a free port of 127.0.0.1 over a balancer with one echo replica."""
    upstream = await asyncio.start_server(_echo, HOST, 0)
    lb = Balancer(BalancerConfig(**config), rng=random.Random(7))
    lb.add_replica(0, upstream.sockets[0].getsockname()[1])
    lb.set_ready(0)
    # Loopback only; a client bound to 127.0.0.2 reaches 127.0.0.1 as well.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind((HOST, 0))
    sock.listen(512)
    front = FrontEnd(lb)
    await front.start(sock)
    try:
        yield lb, front, sock.getsockname()[1]
    finally:
        await front.close(drain_timeout_s=1.0)
        lb.close()
        upstream.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.5):
                await upstream.wait_closed()


@contextlib.asynccontextmanager
async def _connections(
    port: int, count: int, local_host: str = HOST
) -> AsyncIterator[list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]:
    """``count`` client connections from ``local_host``, all closed on the way out."""
    opened: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _ in range(count):
            opened.append(await asyncio.open_connection(HOST, port, local_addr=(local_host, 0)))
        yield opened
    finally:
        for _, writer in opened:
            writer.transport.abort()


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes], bytes]:
    async with asyncio.timeout(ANSWER_WAIT_S):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        headers = dict(line.lower().split(b": ", 1) for line in lines[1:] if line)
        body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
    return int(lines[0].split(b" ")[1]), headers, body


async def _read_error(reader: asyncio.StreamReader, status: int) -> str:
    """An error answer of ``status``, then the connection closes; its message."""
    error = _error(await _read_answer(reader), status)
    await _read_eof(reader)
    return error


def _error(answer: tuple[int, dict[bytes, bytes], bytes], status: int) -> str:
    """The message of an error answer of ``status``: JSON ``{"error": ...}``, and a close."""
    got, headers, body = answer
    assert got == status, body
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"connection"] == b"close"
    doc = json.loads(body)
    assert list(doc) == ["error"] and isinstance(doc["error"], str)
    return str(doc["error"])


async def _read_eof(reader: asyncio.StreamReader) -> None:
    # A byte of ours the server had not read when it closed turns its FIN into an RST.
    with contextlib.suppress(ConnectionResetError):
        async with asyncio.timeout(ANSWER_WAIT_S):
            assert await reader.read() == b""


async def _dripped(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes, status: int
) -> tuple[float, str]:
    """Send ``data`` a byte per ``DRIP_PERIOD_S`` until the server answers ``status``:
    when it answered (``time.monotonic``) and the error's message."""

    async def drip() -> None:
        for i in range(len(data)):
            if writer.is_closing():
                return
            writer.write(data[i : i + 1])
            await asyncio.sleep(DRIP_PERIOD_S)

    dripping = asyncio.create_task(drip())
    try:
        answer = await _read_answer(reader)
        answered_s = time.monotonic()
    finally:
        dripping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await dripping
    error = _error(answer, status)
    await _read_eof(reader)
    return answered_s, error


def _run(loop: str, scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``scenario`` on asyncio's own loop or on uvloop (deployments use it when installed)."""
    if loop == "asyncio":
        asyncio.run(scenario())
        return
    uvloop = pytest.importorskip("uvloop")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


def _post(path: bytes, body: bytes, extra: bytes = b"") -> bytes:
    head = b"POST %s HTTP/1.1\r\nHost: x\r\n%sContent-Length: %d\r\n\r\n" % (path, extra, len(body))
    return head + body


def test_slow_drip_heads_get_408_and_are_closed_at_the_header_deadline() -> None:
    async def scenario() -> None:
        config = {"header_timeout_s": DEADLINE_S, "keep_alive_s": 10.0}
        async with _serving(**config) as (lb, _, port):
            # Twenty slowloris heads at once (never complete: a byte per 0.1 s, 60 s of them).
            # The deadline of a first request runs from accept, a little before the drip.
            drip = b"GET /healthz HTTP/1.1\r\nX-Drip: " + b"a" * 600
            opening_s = time.monotonic()
            async with _connections(port, 20) as conns:
                dripping_s = time.monotonic()
                answers = await asyncio.gather(*(_dripped(r, w, drip, 408) for r, w in conns))
            for answered_s, error in answers:
                assert answered_s - opening_s > DEADLINE_S - 0.05 and "head" in error
                assert answered_s - dripping_s < DEADLINE_S + 1.0
            # Silence from accept on is no way around it either.
            t0 = time.monotonic()
            async with _connections(port, 1) as conns:
                await _read_error(conns[0][0], 408)
            assert DEADLINE_S - 0.05 < time.monotonic() - t0 < DEADLINE_S + 1.0
            assert lb.metrics.by_status[408] == 21

    asyncio.run(scenario())


def test_idle_keep_alive_is_not_a_slow_head_and_a_later_head_gets_its_own_deadline() -> None:
    async def scenario() -> None:
        config = {"header_timeout_s": DEADLINE_S, "keep_alive_s": 10.0}
        async with _serving(**config) as (_, _, port), _connections(port, 1) as conns:
            reader, writer = conns[0]
            writer.write(_post(b"/predict", b"one"))
            assert (await _read_answer(reader))[::2] == (200, b"one")
            # Idle for two deadlines: keep-alive (10 s) governs, not the head deadline.
            await asyncio.sleep(2 * DEADLINE_S)
            writer.write(_post(b"/predict", b"two"))
            assert (await _read_answer(reader))[::2] == (200, b"two")
            # The next head counts from its own first byte, not from the last answer.
            await asyncio.sleep(2 * DEADLINE_S)
            drip = b"GET /healthz HTTP/1.1\r\nX-Drip: " + b"a" * 600
            dripping_s = time.monotonic()
            answered_s, _ = await _dripped(reader, writer, drip, 408)
            assert DEADLINE_S - 0.05 < answered_s - dripping_s < DEADLINE_S + 1.0

    asyncio.run(scenario())


def test_slow_drip_body_gets_408_while_a_slow_but_steady_upload_completes() -> None:
    async def scenario() -> None:
        config = {"body_timeout_s": DEADLINE_S, "body_rate_min_bytes_s": 1000, "keep_alive_s": 10.0}
        async with _serving(**config) as (_, _, port), _connections(port, 2) as conns:
            # A declared 100 kB body dripped a byte per 0.1 s: well under 1000 B/s.
            reader, writer = conns[0]
            writer.write(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
            dripping_s = time.monotonic()
            answered_s, error = await _dripped(reader, writer, b"x" * 600, 408)
            assert DEADLINE_S - 0.05 < answered_s - dripping_s < DEADLINE_S + 1.0
            assert "body" in error
            # 3000 bytes at 2000 B/s: past the 0.5 s floor, but above the minimum rate.
            reader, writer = conns[1]
            body = bytes(random.Random(1).choices(b"abcdef", k=3000))
            writer.write(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 3000\r\n\r\n")
            t0 = time.monotonic()
            for i in range(0, len(body), 200):
                writer.write(body[i : i + 200])
                await asyncio.sleep(0.1)
            assert time.monotonic() - t0 > 2 * DEADLINE_S
            assert (await _read_answer(reader))[::2] == (200, body)

    asyncio.run(scenario())


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_connections_past_the_per_client_limit_get_429_and_others_are_served(loop: str) -> None:
    async def scenario() -> None:
        limit = 8
        config = {"connections_per_client_max": limit, "connections_max": 1000}
        async with _serving(**config) as (lb, front, port):
            async with _connections(port, limit) as held:
                for i, (reader, writer) in enumerate(held):  # each accepted and counted
                    writer.write(_post(b"/predict", b"%d" % i))
                    assert (await _read_answer(reader))[::2] == (200, b"%d" % i)
                # Ten times the limit more from the same address: each refused at once.
                async with _connections(port, 10 * limit) as extra:
                    errors = await asyncio.gather(*(_read_error(r, 429) for r, _ in extra))
                    assert all("connections" in e for e in errors)
                # Another client address is served meanwhile, and so are the held ones.
                async with _connections(port, 1, local_host=OTHER_HOST) as other:
                    other[0][1].write(_post(b"/predict", b"other"))
                    assert (await _read_answer(other[0][0]))[::2] == (200, b"other")
                for reader, writer in held:
                    writer.write(b"GET /healthz HTTP/1.1\r\n\r\n")
                    assert (await _read_answer(reader))[0] == 200
            # Once the held ones are closed, the address gets its share back.
            await wait_until_async(
                lambda: not front.connections, ANSWER_WAIT_S, "the held connections closed"
            )
            async with _connections(port, limit) as again:
                for reader, writer in again:
                    writer.write(b"GET /healthz HTTP/1.1\r\n\r\n")
                    assert (await _read_answer(reader))[0] == 200
            assert lb.metrics.by_status[429] == 10 * limit

    _run(loop, scenario)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_expect_continue_with_a_too_large_length_gets_413_at_once(loop: str) -> None:
    async def scenario() -> None:
        async with _serving(body_bytes_max=1000) as (_, _, port), _connections(port, 2) as conns:
            reader, writer = conns[0]
            t0 = time.monotonic()
            writer.write(
                b"POST /predict HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                b"Content-Length: 10000000\r\n\r\n"
            )
            # The first answer is the 413 (not a 100 Continue), without any body sent.
            assert "too large" in await _read_error(reader, 413)
            assert time.monotonic() - t0 < 1.0
            # Within the limit, the interim 100 still comes and the body is then read.
            reader, writer = conns[1]
            writer.write(
                b"POST /predict HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                b"Content-Length: 1000\r\n\r\n"
            )
            async with asyncio.timeout(ANSWER_WAIT_S):
                assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(b"y" * 1000)
            assert (await _read_answer(reader))[::2] == (200, b"y" * 1000)

    _run(loop, scenario)
