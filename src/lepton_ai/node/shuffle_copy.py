"""Copies of a map task's shuffle file on other nodes (``shuffle_replicas`` > 1).

A finished map task's file is pushed, in crc32c-checked chunks, to the block
store of another worker before the task is reported done; the report names
that worker as a replica (``OutputRef.replicas``). When the node that made the
output dies, readers fetch it from the replica and the scheduler re-runs only
the tasks that were running there (without replicas, every finished map output
on the node is re-made too).

    sender: PutShuffle(job, stem, size, chunk_bytes) -> Chunk x n -> DataOk | DataError
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from lepton_ai.errors import LeptonError
from lepton_ai.node.messages import PutShuffle
from lepton_ai.storage import checksum
from lepton_ai.storage.blockstore import BlockStore, ShuffleKey, parse_block
from lepton_ai.storage.messages import CHUNK_BYTES_DEFAULT, Chunk, DataError, DataOk, chunk_count
from lepton_ai.wire import Connection

CHUNK_BYTES = CHUNK_BYTES_DEFAULT


class ShuffleCopyFailed(LeptonError):
    """A replica did not store a pushed shuffle file."""


def key_of(job_id: str, stem: str) -> ShuffleKey:
    """ValueError if ``stem`` is not a shuffle file's name."""
    key, _ = parse_block(job_id, f"{stem}:0")
    return key


async def send_shuffle(conn: Connection[Any], store: BlockStore, key: ShuffleKey) -> None:
    """Push this node's shuffle file ``key`` over ``conn``; ``ShuffleCopyFailed`` if refused."""
    path = store.shuffle_path(key)
    size = path.stat().st_size
    await conn.send(PutShuffle(key.job_id, key.stem, size, CHUNK_BYTES))
    with open(path, "rb") as f:
        for index in range(chunk_count(size, CHUNK_BYTES)):
            data = f.read(CHUNK_BYTES)
            conn.send_nowait(Chunk(index, checksum.crc32c(data), data))
            await conn.drain()  # TCP back-pressure bounds what is buffered here
    reply = await conn.recv()
    if not isinstance(reply, DataOk):
        why = reply.message if isinstance(reply, DataError) else type(reply).__name__
        raise ShuffleCopyFailed(f"shuffle copy of {key.stem} refused: {why}")


async def receive_shuffle(conn: Connection[Any], store: BlockStore, msg: PutShuffle) -> None:
    """Store a pushed shuffle file: chunks checked on arrival, renamed into place whole."""
    try:
        key = key_of(msg.job_id, msg.stem)
        if not 0 <= msg.size <= store.config.block_bytes_max or msg.chunk_bytes != CHUNK_BYTES:
            raise ValueError(f"bad size {msg.size} or chunk size {msg.chunk_bytes}")
    except ValueError as exc:
        await conn.send(DataError("invalid", str(exc)))
        raise ShuffleCopyFailed(str(exc)) from exc
    path = store.shuffle_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.copy.tmp")
    try:
        with open(tmp, "wb") as f:
            for index in range(chunk_count(msg.size, msg.chunk_bytes)):
                chunk = await conn.recv()
                if not isinstance(chunk, Chunk) or chunk.index != index:
                    raise ShuffleCopyFailed(f"expected chunk {index} of {msg.stem}")
                if checksum.crc32c(chunk.data) != chunk.crc:
                    raise ShuffleCopyFailed(f"chunk {index} of {msg.stem} failed its checksum")
                f.write(chunk.data)
        os.replace(tmp, path)
    except FileNotFoundError as exc:
        # The job ended meanwhile and its directory went (DropJobs): nothing to keep.
        await conn.send(DataError("missing", f"job {msg.job_id} is over"))
        raise ShuffleCopyFailed(f"{msg.stem}: job {msg.job_id} is over") from exc
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    await conn.send(DataOk())
