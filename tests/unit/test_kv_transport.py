"""Pure parts of the KV runtime: frame splitting, address parsing, client-side validation."""

from __future__ import annotations

import struct

import pytest

from lepton_ai.consensus.client import KvClientConfig, parse_addresses
from lepton_ai.consensus.server import parse_peers
from lepton_ai.consensus.transport import FrameSplitter
from lepton_ai.errors import FrameTooLarge


def _frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def test_frame_splitter_handles_any_chunking() -> None:
    payloads = [b"a", b"", b"hello" * 50, b"z" * 3]
    stream = b"".join(_frame(p) for p in payloads)
    for step in (1, 2, 3, 7, 64, len(stream)):
        splitter = FrameSplitter(1024)
        out: list[bytes] = []
        for i in range(0, len(stream), step):
            out += splitter.feed(stream[i : i + step])
        assert out == payloads


def test_frame_splitter_rejects_oversized_before_buffering() -> None:
    splitter = FrameSplitter(100)
    with pytest.raises(FrameTooLarge):
        splitter.feed(struct.pack(">I", 101))


def test_parse_peers_and_addresses() -> None:
    assert parse_peers("1=127.0.0.1:7400, 2=h2:7401") == {1: "127.0.0.1:7400", 2: "h2:7401"}
    for bad in ("", "1=h", "x=h:1", "1=h:1,1=h:2", "1:h:1"):
        with pytest.raises(ValueError):
            parse_peers(bad)
    assert parse_addresses("h1:1,h2:2") == ["h1:1", "h2:2"]
    assert parse_addresses("1=h1:1,2=h2:2") == ["h1:1", "h2:2"]
    assert parse_addresses(["h:3"]) == ["h:3"]
    for bad_addr in ("", "h", "h:x", ":1"):
        with pytest.raises(ValueError):
            parse_addresses(bad_addr)
    with pytest.raises(ValueError):
        KvClientConfig(deadline_s=0)
