"""The executor's task loop in-process: map output into the block store, inline results,
user errors, corrupt shuffle input, oversized results - and the framed pipe itself."""

from __future__ import annotations

import operator
import socket
import threading
from pathlib import Path

from lepton_ai.compute.plan import NarrowOp, ShuffleOp, SourceOp, build_plan, encode_plan
from lepton_ai.compute.scheduler_events import TaskAttempt
from lepton_ai.data.sources import range_sources
from lepton_ai.node.executor_process import Executor, FramedPipe, PipeClosed
from lepton_ai.node.messages import ExecHello, ExecOutcome, ExecPlan, ExecRun
from lepton_ai.storage.blockstore import BlockStore


def _plan(fn=lambda x: (x % 3, x)) -> bytes:  # type: ignore[no-untyped-def]
    ops = [
        SourceOp(tuple(range_sources(range(30), 2))),
        NarrowOp("map", fn),
        ShuffleOp("reduce", 3, operator.add),
    ]
    return encode_plan(build_plan(ops, "collect"))


def _executor(tmp_path: Path, plan: bytes) -> Executor:
    a, _ = socket.socketpair()
    ex = Executor(FramedPipe(a, 1 << 20), "w1", BlockStore(tmp_path))
    ex._add_plan(ExecPlan("job1", plan))
    return ex


def test_map_then_reduce_through_the_block_store(tmp_path: Path) -> None:
    ex = _executor(tmp_path, _plan())
    maps = [ex.run(ExecRun(TaskAttempt("job1", 0, p, 1, p))) for p in range(2)]
    assert all(m.kind == "done" and len(m.outputs) == 3 for m in maps)
    totals = {}
    for bucket in range(3):
        inputs = [ex.store.read_block("job1", m.outputs[bucket].block) for m in maps]
        out = ex.run(ExecRun(TaskAttempt("job1", 1, bucket, 1, 10 + bucket), inputs))
        assert out.kind == "done" and out.outputs[0].data is not None
        import pickle

        totals.update(dict(pickle.loads(out.outputs[0].data)))
    assert totals == {k: sum(x for x in range(30) if x % 3 == k) for k in range(3)}


def test_reducer_reads_this_nodes_blocks_itself(tmp_path: Path) -> None:
    ex = _executor(tmp_path, _plan())
    maps = [ex.run(ExecRun(TaskAttempt("job1", 0, p, 1, p))) for p in range(2)]
    blocks = [m.outputs[0].block for m in maps]
    by_agent = [ex.store.read_block("job1", b) for b in blocks]
    direct = ex.run(ExecRun(TaskAttempt("job1", 1, 0, 1, 10), [b"", b""], dict(enumerate(blocks))))
    mixed = ex.run(ExecRun(TaskAttempt("job1", 1, 0, 1, 11), [by_agent[0], b""], {1: blocks[1]}))
    shipped = ex.run(ExecRun(TaskAttempt("job1", 1, 0, 1, 12), by_agent))
    assert direct.kind == mixed.kind == shipped.kind == "done"
    assert direct.outputs[0].data == mixed.outputs[0].data == shipped.outputs[0].data
    missing = ex.run(ExecRun(TaskAttempt("job1", 1, 0, 1, 13), [b"", b""], {1: "gone"}))
    assert missing.kind == "corrupt_input"
    assert missing.map_partition == 1  # the agent reports it as a fetch failure of map 1


def test_user_error_corrupt_input_and_missing_plan(tmp_path: Path) -> None:
    ex = _executor(tmp_path, _plan(lambda x: (x % 3, 1 // (x - 7))))
    bad = ex.run(ExecRun(TaskAttempt("job1", 0, 0, 1, 1)))
    assert bad.kind == "user"
    assert bad.exc_type == "ZeroDivisionError" and "Traceback" in bad.traceback
    corrupt = ex.run(ExecRun(TaskAttempt("job1", 1, 0, 1, 2), [b"", b"Xjunk"]))
    assert corrupt.kind == "corrupt_input"
    assert corrupt.map_partition == 1
    lost = ex.run(ExecRun(TaskAttempt("nojob", 0, 0, 1, 3)))
    assert lost.kind == "infra"


def test_oversized_result_fails_as_user_error(tmp_path: Path) -> None:
    ops = [SourceOp(tuple(range_sources(range(1000), 1))), NarrowOp("map", str)]
    ex = _executor(tmp_path, encode_plan(build_plan(ops, "collect")))
    ex.result_bytes_max = 100
    out = ex.run(ExecRun(TaskAttempt("job1", 0, 0, 1, 1)))
    assert out.kind == "user" and "bytes" in out.message


def test_framed_pipe_round_trip_and_bounds() -> None:
    a, b = socket.socketpair()
    left, right = FramedPipe(a, 1 << 16), FramedPipe(b, 64)
    t = threading.Thread(target=left.send, args=(ExecHello(42),))
    t.start()
    assert right.recv() == ExecHello(42)
    t.join()
    left.send(ExecPlan("j", b"x" * 100))  # larger than the reader's bound
    try:
        right.recv()
        raise AssertionError("an oversized frame was accepted")
    except PipeClosed:
        pass
    a.close()
    b2 = FramedPipe(b, 1 << 16)
    try:
        b2.recv()
    except PipeClosed:
        pass


def test_hand_encoded_hello_is_what_msgspec_would_send() -> None:
    import msgspec

    from lepton_ai.node.exec_boot import hello_frame

    for pid in (0, 1, 127, 128, 255, 65_536, 4_194_304, 2**32 - 1):
        frame = hello_frame(pid)
        body = msgspec.msgpack.encode(ExecHello(pid))
        assert msgspec.msgpack.decode(frame[4:], type=ExecHello) == ExecHello(pid)
        assert int.from_bytes(frame[:4], "big") == len(frame) - 4
        assert msgspec.msgpack.decode(body, type=ExecHello) == ExecHello(pid)


def test_an_outcome_carries_only_the_fields_it_sets() -> None:
    """One message for every outcome: a success does not ship a failure's empty
    fields (tiny tasks send one per task), nor a failure a success's."""
    import msgspec

    a = TaskAttempt("job1", 0, 0, 1, 1)
    done = ExecOutcome(a, "done", [], 0.5)
    failed = ExecOutcome(a, "corrupt_input", message="bad", map_partition=2)
    for outcome in (done, failed):
        body = msgspec.msgpack.encode(outcome)
        assert msgspec.msgpack.decode(body, type=ExecOutcome) == outcome
    assert b"traceback" not in msgspec.msgpack.encode(done)
    assert b"duration_s" not in msgspec.msgpack.encode(failed)
