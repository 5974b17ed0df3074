"""LocalLog: group commit, replay after restart, torn tails cut, compaction through snapshots."""

from __future__ import annotations

import asyncio
import json
import struct
from pathlib import Path

import pytest

from lepton_ai.errors import Unavailable
from lepton_ai.node.local_log import LocalLog, LocalLogConfig, LogCorrupt, LogInUse


class Counter:
    """A tiny deterministic state machine: commands are JSON {"add": n}."""

    def __init__(self) -> None:
        self.total = 0
        self.applied = 0

    def apply(self, command: bytes) -> bytes:
        self.total += json.loads(command)["add"]
        self.applied += 1
        return str(self.total).encode()

    def snapshot(self) -> bytes:
        return json.dumps([self.total, self.applied]).encode()

    def restore(self, data: bytes) -> None:
        self.total, self.applied = json.loads(data)


def cmd(n: int) -> bytes:
    return json.dumps({"add": n}).encode()


async def _submit_all(log: LocalLog, values: list[int]) -> list[bytes]:
    return list(await asyncio.gather(*(log.submit(cmd(v)) for v in values)))


def test_submit_applies_in_order_and_replays(tmp_path: Path) -> None:
    sm = Counter()
    log = LocalLog(tmp_path, sm, LocalLogConfig(fsync=True))
    assert log.is_leader

    async def go() -> list[bytes]:
        out = await _submit_all(log, list(range(1, 101)))
        await log.read_barrier()
        await log.close()
        return out

    results = asyncio.run(go())
    assert results[-1] == str(sum(range(1, 101))).encode()
    assert sorted(int(r) for r in results) == [int(r) for r in results]
    again = Counter()
    log2 = LocalLog(tmp_path, again)
    with pytest.raises(LogInUse):
        LocalLog(tmp_path, Counter())  # a second owner of the same log
    assert (again.total, again.applied, log2.replayed) == (5050, 100, 100)
    asyncio.run(log2.close())


def test_torn_tail_is_cut_and_log_continues(tmp_path: Path) -> None:
    log = LocalLog(tmp_path, Counter(), LocalLogConfig(fsync=False))

    async def go(lg: LocalLog, values: list[int]) -> None:
        await _submit_all(lg, values)
        await lg.close()

    asyncio.run(go(log, [1, 2, 3]))
    path = tmp_path / "commands.wal"
    good = path.read_bytes()
    path.write_bytes(good + b"\x10\x00\x00\x00garbage")  # a record cut short by a crash
    sm = Counter()
    log2 = LocalLog(tmp_path, sm)
    assert sm.total == 6 and path.read_bytes() == good
    asyncio.run(go(log2, [4]))
    sm3 = Counter()
    LocalLog(tmp_path, sm3)
    assert sm3.total == 10


def test_compaction_keeps_state_and_bounds_the_log(tmp_path: Path) -> None:
    config = LocalLogConfig(fsync=False, log_bytes_max=300)
    log = LocalLog(tmp_path, Counter(), config)

    async def go() -> None:
        for i in range(50):
            await log.submit(cmd(i))
        await log.close()

    asyncio.run(go())
    (snap,) = tmp_path.glob("snapshot-*.snap")  # the older ones were removed
    assert (tmp_path / "commands.wal").stat().st_size <= 300 + 64
    sm = Counter()
    log2 = LocalLog(tmp_path, sm, config)
    assert (sm.total, sm.applied) == (sum(range(50)), 50)
    asyncio.run(log2.close())
    snap.write_bytes(snap.read_bytes()[:-1] + b"!")
    with pytest.raises(LogCorrupt):
        LocalLog(tmp_path, Counter(), config)


def test_bad_input_and_closed_log(tmp_path: Path) -> None:
    log = LocalLog(tmp_path, Counter(), LocalLogConfig(fsync=False, record_bytes_max=64))

    async def go() -> None:
        with pytest.raises(TypeError):
            await log.submit("text")  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            await log.submit(b"x" * 65)
        await log.close()
        with pytest.raises(Unavailable):
            await log.submit(cmd(1))

    asyncio.run(go())
    assert not log.is_leader


class Picky(Counter):
    """Applying {"add": -1} raises: a command the state machine cannot take."""

    def apply(self, command: bytes) -> bytes:
        if json.loads(command)["add"] < 0:
            raise ValueError("negative")
        return super().apply(command)


def test_an_apply_error_stops_the_log_and_its_runner(tmp_path: Path) -> None:
    log = LocalLog(tmp_path, Picky(), LocalLogConfig(fsync=False))

    async def go() -> None:
        runner = asyncio.create_task(log.run())
        assert await log.submit(cmd(2)) == b"2"
        with pytest.raises(Unavailable, match="applying a command failed"):
            await log.submit(cmd(-1))
        with pytest.raises(ValueError, match="negative"):
            await runner  # the coordinator's task group ends with this
        assert not log.is_leader
        with pytest.raises(Unavailable):
            await log.submit(cmd(3))
        await log.close()

    asyncio.run(go())


def test_an_earlier_versions_log_is_carried_over(tmp_path: Path) -> None:
    """``commands.log`` + ``snapshot.bin`` of the earlier format (length, crc32c,
    payload): read once, snapshotted in the WAL's format, then removed."""
    from lepton_ai.storage import checksum

    def record(payload: bytes) -> bytes:
        return struct.pack("<II", len(payload), checksum.crc32c(payload)) + payload

    (tmp_path / "snapshot.bin").write_bytes(record(json.dumps([100, 4]).encode()))
    (tmp_path / "commands.log").write_bytes(
        record(cmd(1)) + record(cmd(2)) + b"\x10\x00\x00\x00torn"
    )
    sm = Counter()
    log = LocalLog(tmp_path, sm, LocalLogConfig(fsync=False))
    assert (sm.total, sm.applied, log.replayed) == (103, 6, 2)
    assert not (tmp_path / "commands.log").exists()
    assert not (tmp_path / "snapshot.bin").exists()
    asyncio.run(log.close())
    again = Counter()
    LocalLog(tmp_path, again, LocalLogConfig(fsync=False))
    assert (again.total, again.applied) == (103, 6)
