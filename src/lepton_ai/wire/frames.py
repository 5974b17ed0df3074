"""Length-prefixed frames with a bounded size.

A frame is a 4-byte big-endian length followed by that many bytes. The length is
checked against the reader's bound *before* anything is buffered, so a peer
cannot make us allocate more than ``frame_bytes_max``.
"""

from __future__ import annotations

import asyncio
import struct

from lepton_ai.errors import FrameTooLarge, LeptonError

HEADER = struct.Struct(">I")
# The hard ceiling the 4-byte header can express; configured bounds sit below it.
FRAME_BYTES_LIMIT = 2**32 - 1


class ConnectionClosed(LeptonError):
    """The peer closed the connection (cleanly or mid-frame)."""


def encode_frame(payload: bytes, frame_bytes_max: int = FRAME_BYTES_LIMIT) -> bytes:
    """Prefix ``payload`` with its length; refuse to build a frame the peer would reject."""
    if len(payload) > frame_bytes_max:
        raise FrameTooLarge(f"frame of {len(payload)} bytes exceeds the bound {frame_bytes_max}")
    return HEADER.pack(len(payload)) + payload


async def read_frame(reader: asyncio.StreamReader, frame_bytes_max: int) -> bytes:
    """Read one frame; raise ``FrameTooLarge`` before reading an oversized body."""
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        raise ConnectionClosed("connection closed") from exc
    (length,) = HEADER.unpack(header)
    if length > frame_bytes_max:
        raise FrameTooLarge(f"peer announced a {length}-byte frame; the bound is {frame_bytes_max}")
    try:
        return await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise ConnectionClosed(f"connection closed inside a {length}-byte frame") from exc
