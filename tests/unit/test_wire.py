"""Wire: frames, codec and the authenticated handshake, including hostile peers."""

from __future__ import annotations

import asyncio
import struct

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lepton_ai.errors import AuthError, FrameTooLarge, ProtocolError
from lepton_ai.wire import Codec, Connection, WireConfig, bound_port, connect, encode_frame, serve
from lepton_ai.wire.frames import ConnectionClosed, read_frame
from lepton_ai.wire.handshake import PREAMBLE

TOKEN = "s3cret-token"


class Ping(msgspec.Struct, tag=True):
    n: int


class Pong(msgspec.Struct, tag=True):
    n: int
    text: str = ""


Msg = Ping | Pong
CODEC = Codec[Msg](Msg)


def _reader_with(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


def test_frame_round_trip() -> None:
    async def go() -> bytes:
        return await read_frame(_reader_with(encode_frame(b"hello")), 100)

    assert asyncio.run(go()) == b"hello"


def test_oversized_frame_is_refused_before_reading_body() -> None:
    async def go() -> None:
        # Announces 1 GiB but sends nothing: must fail on the header alone.
        await read_frame(_reader_with(struct.pack(">I", 1 << 30)), 1024)

    with pytest.raises(FrameTooLarge):
        asyncio.run(go())
    with pytest.raises(FrameTooLarge):
        encode_frame(b"x" * 11, frame_bytes_max=10)


def test_truncated_frame_is_connection_closed() -> None:
    async def go() -> None:
        await read_frame(_reader_with(struct.pack(">I", 10) + b"abc"), 100)

    with pytest.raises(ConnectionClosed):
        asyncio.run(go())


def test_codec_round_trip_and_unknown_tag() -> None:
    assert CODEC.decode(CODEC.encode(Pong(3, "x"))) == Pong(3, "x")

    class Other(msgspec.Struct, tag=True):
        n: int

    with pytest.raises(ProtocolError):
        CODEC.decode(CODEC.encode(Other(1)))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_decoder_never_raises_anything_but_protocol_error(data: bytes) -> None:
    try:
        msg = CODEC.decode(data)
    except ProtocolError:
        return
    assert isinstance(msg, Ping | Pong)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=64))
def test_frame_reader_on_random_bytes(data: bytes) -> None:
    async def go() -> None:
        reader = _reader_with(data)
        while True:
            await read_frame(reader, 32)

    with pytest.raises((ConnectionClosed, FrameTooLarge)):
        asyncio.run(go())


async def _echo_server(cfg: WireConfig | None = None) -> tuple[asyncio.Server, list[Msg]]:
    seen: list[Msg] = []

    async def handle(conn: Connection[Msg]) -> None:
        async for msg in conn:
            seen.append(msg)
            if isinstance(msg, Ping):
                await conn.send(Pong(msg.n + 1))

    server = await serve("127.0.0.1", 0, token=TOKEN, codec=CODEC, handler=handle, config=cfg)
    return server, seen


def test_authenticated_round_trip() -> None:
    async def go() -> Msg:
        server, _ = await _echo_server()
        async with server:
            conn = await connect("127.0.0.1", bound_port(server), token=TOKEN, codec=CODEC)
            await conn.send_many([Ping(1), Ping(2)])
            first = await conn.recv()
            second = await conn.recv()
            await conn.close()
            assert first == Pong(2)
            return second

    assert asyncio.run(go()) == Pong(3)


def test_wrong_token_is_rejected_with_reason_and_server_survives() -> None:
    async def go() -> None:
        server, seen = await _echo_server()
        async with server:
            port = bound_port(server)
            with pytest.raises(AuthError, match="wrong cluster token"):
                await connect("127.0.0.1", port, token="wrong", codec=CODEC)
            conn = await connect("127.0.0.1", port, token=TOKEN, codec=CODEC)
            await conn.send(Ping(10))
            assert await conn.recv() == Pong(11)
            await conn.close()
            assert seen == [Ping(10)]

    asyncio.run(go())


async def _raw(port: int, payload: bytes) -> bytes:
    """Send raw bytes after reading the server's Hello; return what the server sent back.
    ``payload`` follows the preamble, unless it is a bad preamble itself (8 bytes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await read_frame(reader, 1024)  # Hello
    writer.write(payload if len(payload) == len(PREAMBLE) else PREAMBLE + payload)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return data


_NESTED_AUTH = b"\x83\xa4type\xa4Auth\xa7version\x01\xa5extra" + b"\x91" * 990 + b"\xc0"


def _frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


@pytest.mark.parametrize(
    "payload",
    [
        b"\x00\x00\x00\x05garbage",  # a frame that is not MessagePack
        struct.pack(">I", 1 << 30),  # an oversized frame during the handshake
        b"GET / HTTP/1.1\r\n\r\n",  # a confused HTTP client
        # An Auth whose unknown field nests 990 one-element arrays, 1,017 bytes (under
        # the handshake bound): skipping it, msgspec recursed past the interpreter's
        # limit and the RecursionError escaped the handshake.
        _frame(_NESTED_AUTH),
        b"LEPTON1\n",  # a wrong preamble (an older peer)
        b"\x16\x03\x01\x02\x00\x01\x00\x00",  # a TLS ClientHello to a plain server
    ],
)
def test_garbage_before_auth_closes_only_that_connection(
    payload: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    async def go() -> None:
        server, seen = await _echo_server()
        async with server:
            port = bound_port(server)
            await _raw(port, payload)  # the server closes it; returns EOF
            conn = await connect("127.0.0.1", port, token=TOKEN, codec=CODEC)
            await conn.send(Ping(1))
            assert await conn.recv() == Pong(2)
            await conn.close()
            assert seen == [Ping(1)]

    with caplog.at_level("WARNING"):
        asyncio.run(go())
    # Refused as a failed handshake (a warning), never an exception escaping the server.
    lines = [r.getMessage() for r in caplog.records]
    assert any("handshake failed" in line for line in lines), lines
    assert not any("RecursionError" in (r.exc_text or "") for r in caplog.records), lines


def test_bad_frames_after_auth_close_the_connection_without_state_change() -> None:
    async def go() -> None:
        server, seen = await _echo_server(WireConfig(frame_bytes_max=1024))
        async with server:
            port = bound_port(server)
            for bad in (encode_frame(b"\xc1junk"), struct.pack(">I", 4096) + b"x" * 4096):
                conn = await connect(
                    "127.0.0.1", port, token=TOKEN, codec=CODEC, config=WireConfig()
                )
                conn.writer.write(bad)
                await conn.drain()
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(conn.recv(), 5)
                await conn.close()
            assert seen == []

    asyncio.run(go())


def test_handshake_failures_are_logged_at_a_bounded_rate(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """50 connections with garbage: 10 warnings, then one line counting the rest."""
    from lepton_ai.wire.conn import RateLimitedLog

    limiter = RateLimitedLog(burst=10, window_s=0.3)
    with caplog.at_level("WARNING", logger="lepton_ai.wire"):
        for i in range(50):
            limiter.warn("closing %s: handshake failed: %s", f"peer{i}", "garbage")
        assert len(caplog.records) == 10
        import time

        time.sleep(0.35)
        limiter.warn("closing %s: handshake failed: %s", "late", "garbage")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[10].startswith("40 more like this suppressed") and "late" in lines[11]
