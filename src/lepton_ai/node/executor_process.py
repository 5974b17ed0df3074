"""The executor process: runs user code for its node agent, one task at a time.

Started by the agent before any task arrives (warm: imports done, plans cached
per job), reused across tasks, fed over a private socketpair inherited from the
agent. User code that crashes the interpreter (``os._exit``, a segfault) ends
only this process: the agent sees EOF on the pipe at once, reports the attempt
as an infrastructure failure and starts a replacement.

Deliberately synchronous: one task at a time (the agent may queue a few more
here to hide its round trip), no event loop, so nothing in the
executor competes with user code for the CPU. Map output goes straight into the
node's block store directory (the same disk the agent serves from); shuffle
input arrives already fetched by the agent.

Started as ``python -m lepton_ai.node.exec_boot`` by the agent only; the
arguments come from the environment (``LEPTON_EXEC_FD``, ``LEPTON_EXEC_WORKER``,
``LEPTON_EXEC_STORE``).
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import time
from collections import OrderedDict, deque
from typing import TYPE_CHECKING

import msgspec

from lepton_ai.node.messages import (
    ExecCancel,
    ExecForget,
    ExecMessage,
    ExecOutcome,
    ExecPlan,
    ExecRun,
)

if TYPE_CHECKING:
    from lepton_ai.compute.job_state import OutputRef
    from lepton_ai.compute.plan import JobPlan
    from lepton_ai.storage.blockstore import BlockStore
    from lepton_ai.storage.objects import ObjectStore

FD_ENV = "LEPTON_EXEC_FD"  # read by exec_boot
WORKER_ENV = "LEPTON_EXEC_WORKER"
STORE_ENV = "LEPTON_EXEC_STORE"
FRAME_BYTES_MAX_ENV = "LEPTON_EXEC_FRAME_BYTES_MAX"
RESULT_BYTES_MAX_ENV = "LEPTON_EXEC_RESULT_BYTES_MAX"
RESULT_INLINE_BYTES_MAX_ENV = "LEPTON_EXEC_RESULT_INLINE_BYTES_MAX"
OBJECTS_ENV = "LEPTON_EXEC_OBJECTS"  # the node's object store: stored inputs and results
NODE_ENV = "LEPTON_EXEC_NODE"
PLANS_MAX = 32  # decoded plans kept per executor (jobs running at once rarely exceed it)
RECV_BYTES = 256 * 1024  # one read from the agent's pipe
QUEUED_MAX = 1024  # tasks queued here; the agent's window (ExecutorConfig.window) is far below
REPLIES_BATCH_MAX = 64  # replies of back-to-back tasks sent in one write ...
REPLY_DELAY_MAX_S = 0.002  # ... holding none longer than this (or REPLY_HOLD_TASKS task times) ...
REPLY_HOLD_MAX_S = 0.045  # ... and never longer than this
REPLY_HOLD_QUEUED_MIN = 2  # ... and only while this many more tasks wait here
REPLY_HOLD_TASKS = 4  # a held reply waits for up to this many task times

_HEADER = struct.Struct(">I")


class PipeClosed(Exception):
    """The agent closed our pipe: it is gone or wants us gone."""


class FramedPipe:
    """Blocking length-prefixed frames over a stream socket (the executor's side).

    Reads are buffered: one ``recv`` usually brings several small frames (the
    agent sends a window of tasks at once), so a trivial task costs one system
    call in, not two. ``poll`` returns the frames already sent without blocking,
    which is how a queued task's cancellation is seen before the task starts.
    """

    def __init__(self, sock: socket.socket, frame_bytes_max: int) -> None:
        self.sock = sock
        self.frame_bytes_max = frame_bytes_max
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(ExecMessage)
        self._buf = bytearray()
        self._pos = 0  # start of the unread bytes in _buf

    def _fill(self, block: bool) -> bool:
        """Append what the socket holds; False if nothing was there (``block=False``)."""
        try:
            chunk = self.sock.recv(RECV_BYTES, 0 if block else socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        if not chunk:
            raise PipeClosed("agent closed the pipe")
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += chunk
        return True

    def _read_body(self, length: int) -> bytes:
        """A large body straight into its own buffer (no repeated appends)."""
        have = memoryview(self._buf)[self._pos :]
        body = bytearray(length)
        body[: len(have)] = have
        got = len(have)
        have.release()
        self._buf.clear()
        self._pos = 0
        view = memoryview(body)
        while got < length:
            k = self.sock.recv_into(view[got:], length - got)
            if k == 0:
                raise PipeClosed("agent closed the pipe")
            got += k
        return bytes(body)

    def _next_frame(self, block: bool) -> bytes | None:
        while True:
            avail = len(self._buf) - self._pos
            if avail >= _HEADER.size:
                (length,) = _HEADER.unpack_from(self._buf, self._pos)
                if length > self.frame_bytes_max:
                    raise PipeClosed(
                        f"agent sent a {length}-byte frame; the bound is {self.frame_bytes_max}"
                    )
                end = self._pos + _HEADER.size + length
                if end <= len(self._buf):
                    body = bytes(self._buf[self._pos + _HEADER.size : end])
                    self._pos = end
                    return body
                if block and length > RECV_BYTES:
                    self._pos += _HEADER.size
                    return self._read_body(length)
            if not self._fill(block):
                return None

    def recv(self) -> ExecMessage:
        body = self._next_frame(block=True)
        if body is None:
            raise AssertionError("a blocking read returned nothing")
        msg: ExecMessage = self._decoder.decode(body)
        return msg

    def poll(self) -> list[ExecMessage]:
        """Every complete frame that has arrived, without waiting for more."""
        out: list[ExecMessage] = []
        while (body := self._next_frame(block=False)) is not None:
            out.append(self._decoder.decode(body))
        return out

    def send(self, msg: ExecMessage) -> None:
        self.send_many([msg])

    def send_many(self, msgs: list[ExecMessage]) -> None:
        """Several frames in one system call."""
        parts = []
        for msg in msgs:
            body = self._encoder.encode(msg)
            parts.append(_HEADER.pack(len(body)))
            parts.append(body)
        self.sock.sendall(b"".join(parts))


class Executor:
    def __init__(self, pipe: FramedPipe, worker: str, store: BlockStore) -> None:
        self.pipe = pipe
        self.worker = worker
        self.store = store
        self.plans: OrderedDict[str, JobPlan] = OrderedDict()
        self.result_bytes_max = int(os.environ.get(RESULT_BYTES_MAX_ENV, str(1 << 30)))
        self.result_inline_max = int(os.environ.get(RESULT_INLINE_BYTES_MAX_ENV, str(64 << 10)))
        self.node = os.environ.get(NODE_ENV, "")
        self._objects: ObjectStore | None = None

    @property
    def objects(self) -> ObjectStore:
        """The node's object store, opened on first use (most tasks never need it)."""
        if self._objects is None:
            from lepton_ai.storage.objects import ObjectStore, ObjectStoreConfig

            root = os.environ.get(OBJECTS_ENV, "")
            if not root:
                raise RuntimeError("this executor has no object store")
            # Capacity is the agent's to enforce (it places and reserves); the
            # executor writes results the agent then accounts for.
            self._objects = ObjectStore(root, ObjectStoreConfig(fsync=False, scan_at_start=False))
        return self._objects

    def serve(self) -> None:
        """The task loop. ``exec_boot`` has said hello already; warm up now, while
        the first task is on its way: the task machinery and cloudpickle (which
        loading any user function needs).

        The agent sends a window of tasks; they run in order, one at a time.
        Before each task, whatever else has arrived is read (a cancellation of a
        queued task must be seen before that task starts). Replies of tasks run
        back to back go out together, bounded in count and in delay, so a stream
        of tiny tasks does not cost one system call per reply.
        """
        import cloudpickle  # noqa: F401

        import lepton_ai.compute.run_task  # noqa: F401

        queue: deque[ExecRun] = deque()
        replies: list[ExecMessage] = []
        oldest = 0.0
        while True:
            if not queue:
                if replies:
                    self.pipe.send_many(replies)
                    replies.clear()
                self._handle(self.pipe.recv(), queue, replies)
            for msg in self.pipe.poll():
                self._handle(msg, queue, replies)
            if not queue:
                continue
            started = time.perf_counter()
            if not replies:
                oldest = started
            run = queue.popleft()
            replies.append(self.run(run))
            # Hold a reply only while tasks of the same stage keep finishing fast
            # and more than one waits here: the next one is then likely fast too,
            # its reply can share the write, and the agent still has work queued
            # here while it refills (holding the last ones would leave us idle).
            # A hold of about four task times sends the replies of short tasks in
            # fours (10 ms tasks: a quarter of the messages between here, the agent
            # and the coordinator; 40 ms is well inside the window of queued work).
            now = time.perf_counter()
            hold_s = min(
                REPLY_HOLD_MAX_S, max(REPLY_DELAY_MAX_S, REPLY_HOLD_TASKS * (now - started))
            )
            if (
                len(queue) < REPLY_HOLD_QUEUED_MIN
                or len(replies) >= REPLIES_BATCH_MAX
                or now - oldest >= hold_s
                or queue[0].attempt.stage != run.attempt.stage
                or queue[0].attempt.job_id != run.attempt.job_id
            ):
                self.pipe.send_many(replies)
                replies.clear()

    def _handle(self, msg: ExecMessage, queue: deque[ExecRun], replies: list[ExecMessage]) -> None:
        if isinstance(msg, ExecRun):
            if len(queue) >= QUEUED_MAX:
                raise PipeClosed(f"the agent sent more than {QUEUED_MAX} tasks at once")
            queue.append(msg)
        elif isinstance(msg, ExecPlan):
            self._add_plan(msg)
        elif isinstance(msg, ExecForget):
            for job_id in msg.job_ids:
                self.plans.pop(job_id, None)
        elif isinstance(msg, ExecCancel):
            drop = set(msg.attempts)
            for run in [r for r in queue if r.attempt in drop]:
                queue.remove(run)
                why = "cancelled before it started"
                replies.append(ExecOutcome(run.attempt, "cancelled", message=why))
        else:
            raise PipeClosed(f"unexpected {type(msg).__name__} from the agent")

    def _add_plan(self, msg: ExecPlan) -> None:
        from lepton_ai.compute.plan import decode_plan

        self.plans[msg.job_id] = decode_plan(msg.plan)
        self.plans.move_to_end(msg.job_id)
        while len(self.plans) > PLANS_MAX:
            self.plans.popitem(last=False)

    def run(self, msg: ExecRun) -> ExecOutcome:
        from lepton_ai.compute.job_state import OutputRef
        from lepton_ai.compute.run_task import CorruptInput, UserCodeError, run_task
        from lepton_ai.storage.blockstore import ShuffleKey

        a = msg.attempt
        plan = self.plans.get(a.job_id)
        if plan is None:
            return ExecOutcome(a, "infra", message=f"executor has no plan for job {a.job_id}")
        started = time.perf_counter()
        inputs = list(msg.inputs) if msg.local else msg.inputs
        if msg.local:
            bad = self._read_local(a.job_id, msg.local, inputs)
            if bad is not None:
                return ExecOutcome(a, "corrupt_input", message=bad[1], map_partition=bad[0])
        try:
            out = run_task(
                plan,
                a.stage,
                a.partition,
                inputs,
                fetch_blob=self._read_object,
                job_id=a.job_id,
                attempt_tag=f"e{a.epoch}a{a.attempt}",
            )
            if out.buckets is not None:
                key = ShuffleKey(a.job_id, a.stage, a.partition, a.epoch, a.attempt)
                sizes = self.store.write_shuffle(key, out.buckets)
                refs = [OutputRef(self.worker, key.block(i), n) for i, n in enumerate(sizes)]
            else:
                result = out.result if out.result is not None else b""
                if len(result) > self.result_bytes_max:
                    why = (
                        f"the result of partition {a.partition} is {len(result)} bytes, "
                        f"over result_bytes_max={self.result_bytes_max} "
                        "(reduce or aggregate it further, or write it with write_jsonl)"
                    )
                    return ExecOutcome(a, "user", message=why, exc_type="LimitExceeded")
                refs = [self._result_ref(result, out.store)]
        except UserCodeError as exc:
            return ExecOutcome(
                a, "user", message=exc.message, exc_type=exc.exc_type, traceback=exc.traceback
            )
        except CorruptInput as exc:
            return ExecOutcome(
                a, "corrupt_input", message=str(exc), map_partition=exc.map_partition
            )
        except Exception as exc:  # noqa: BLE001 - reported to the scheduler as infra failure
            name = type(exc).__name__
            return ExecOutcome(a, "infra", message=f"{name}: {exc}", exc_type=name)
        return ExecOutcome(a, "done", refs, time.perf_counter() - started)

    def _read_object(self, oid: str) -> bytes:
        """A stored input partition (the agent brought it to this node)."""
        return self.objects.read_all(oid)

    def _result_ref(self, result: bytes, store: bool = False) -> OutputRef:
        """Small results inline (in the log); bigger ones (and parts of a ``lep://``
        output) stored on this node."""
        from lepton_ai.compute.job_state import OutputRef

        if len(result) <= self.result_inline_max and not store:
            return OutputRef(self.worker, "result", len(result), result)
        from lepton_ai.storage.checksum import crc32c
        from lepton_ai.storage.messages import CHUNK_BYTES_DEFAULT, ObjectMeta

        oid = os.urandom(16).hex()
        self.objects.put_bytes(oid, result, CHUNK_BYTES_DEFAULT)
        meta = ObjectMeta("", oid, len(result), crc32c(result), CHUNK_BYTES_DEFAULT, [self.node], 1)
        return OutputRef(self.worker, f"obj:{oid}", len(result), None, meta)

    def _read_local(
        self, job_id: str, local: dict[int, str], inputs: list[bytes]
    ) -> tuple[int, str] | None:
        """Fill ``inputs`` from this node's block store; (map index, why) of the first
        block that is missing or corrupt (the agent reports it as a fetch failure)."""
        from lepton_ai.storage.blockstore import BlockCorrupt, BlockMissing

        for m, block in sorted(local.items()):
            if not 0 <= m < len(inputs):
                return m, f"local input {m} out of range"
            try:
                inputs[m] = self.store.read_block(job_id, block)
            except (BlockMissing, BlockCorrupt, ValueError) as exc:
                return m, f"{type(exc).__name__}: {exc}"
        return None


def run_executor(sock: socket.socket) -> None:
    """Serve the agent over ``sock`` until it goes away (hello already sent)."""
    from lepton_ai.storage.blockstore import BlockStore

    frame_max = int(os.environ.get(FRAME_BYTES_MAX_ENV, str(256 << 20)))
    pipe = FramedPipe(sock, frame_max)
    executor = Executor(pipe, os.environ[WORKER_ENV], BlockStore(os.environ[STORE_ENV]))
    try:
        executor.serve()
    except (PipeClosed, ConnectionError):
        pass
    # Skip interpreter teardown: nothing to flush, and user objects may hang in __del__.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    from lepton_ai.node.exec_boot import main

    main()
