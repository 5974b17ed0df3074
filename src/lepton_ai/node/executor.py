"""The executor process: runs user code for its node agent, one task at a time.

Started by the agent before any task arrives (warm: imports done, plans cached
per job), reused across tasks, fed over a private socketpair inherited from the
agent. User code that crashes the interpreter (``os._exit``, a segfault) ends
only this process: the agent sees EOF on the pipe at once, reports the attempt
as an infrastructure failure and starts a replacement.

Deliberately synchronous: one task at a time, no event loop, so nothing in the
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
from collections import OrderedDict
from typing import TYPE_CHECKING

import msgspec

from lepton_ai.node.messages import (
    ExecDone,
    ExecFailed,
    ExecForget,
    ExecMessage,
    ExecPlan,
    ExecRun,
)

if TYPE_CHECKING:
    from lepton_ai.compute.plan import JobPlan
    from lepton_ai.storage.blockstore import BlockStore

FD_ENV = "LEPTON_EXEC_FD"  # read by exec_boot
WORKER_ENV = "LEPTON_EXEC_WORKER"
STORE_ENV = "LEPTON_EXEC_STORE"
FRAME_BYTES_MAX_ENV = "LEPTON_EXEC_FRAME_BYTES_MAX"
RESULT_BYTES_MAX_ENV = "LEPTON_EXEC_RESULT_BYTES_MAX"
PLANS_MAX = 32  # decoded plans kept per executor (jobs running at once rarely exceed it)

_HEADER = struct.Struct(">I")


class PipeClosed(Exception):
    """The agent closed our pipe: it is gone or wants us gone."""


class FramedPipe:
    """Blocking length-prefixed frames over a stream socket (the executor's side)."""

    def __init__(self, sock: socket.socket, frame_bytes_max: int) -> None:
        self.sock = sock
        self.frame_bytes_max = frame_bytes_max
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(ExecMessage)

    def _read_exactly(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:], n - got)
            if k == 0:
                raise PipeClosed("agent closed the pipe")
            got += k
        return bytes(buf)

    def recv(self) -> ExecMessage:
        (length,) = _HEADER.unpack(self._read_exactly(_HEADER.size))
        if length > self.frame_bytes_max:
            raise PipeClosed(
                f"agent sent a {length}-byte frame; the bound is {self.frame_bytes_max}"
            )
        msg: ExecMessage = self._decoder.decode(self._read_exactly(length))
        return msg

    def send(self, msg: ExecMessage) -> None:
        body = self._encoder.encode(msg)
        self.sock.sendall(_HEADER.pack(len(body)) + body)


class Executor:
    def __init__(self, pipe: FramedPipe, worker: str, store: BlockStore) -> None:
        self.pipe = pipe
        self.worker = worker
        self.store = store
        self.plans: OrderedDict[str, JobPlan] = OrderedDict()
        self.result_bytes_max = int(os.environ.get(RESULT_BYTES_MAX_ENV, str(128 << 20)))

    def serve(self) -> None:
        """The task loop. ``exec_boot`` has said hello already; warm up now, while
        the first task is on its way: the task machinery and cloudpickle (which
        loading any user function needs)."""
        import cloudpickle  # noqa: F401

        import lepton_ai.compute.tasks  # noqa: F401

        while True:
            msg = self.pipe.recv()
            if isinstance(msg, ExecRun):
                self.pipe.send(self.run(msg))
            elif isinstance(msg, ExecPlan):
                self._add_plan(msg)
            elif isinstance(msg, ExecForget):
                for job_id in msg.job_ids:
                    self.plans.pop(job_id, None)
            else:
                raise PipeClosed(f"unexpected {type(msg).__name__} from the agent")

    def _add_plan(self, msg: ExecPlan) -> None:
        from lepton_ai.compute.plan import decode_plan

        self.plans[msg.job_id] = decode_plan(msg.plan)
        self.plans.move_to_end(msg.job_id)
        while len(self.plans) > PLANS_MAX:
            self.plans.popitem(last=False)

    def run(self, msg: ExecRun) -> ExecDone | ExecFailed:
        from lepton_ai.compute.state import OutputRef
        from lepton_ai.compute.tasks import CorruptInput, UserCodeError, run_task
        from lepton_ai.storage.blockstore import ShuffleKey

        a = msg.attempt
        plan = self.plans.get(a.job_id)
        if plan is None:
            return ExecFailed(a, "infra", f"executor has no plan for job {a.job_id}")
        started = time.perf_counter()
        try:
            out = run_task(plan, a.stage, a.partition, msg.inputs)
            if out.buckets is not None:
                key = ShuffleKey(a.job_id, a.stage, a.partition, a.epoch, a.attempt)
                sizes = self.store.write_shuffle(key, out.buckets)
                refs = [OutputRef(self.worker, key.block(i), n) for i, n in enumerate(sizes)]
            else:
                result = out.result if out.result is not None else b""
                if len(result) > self.result_bytes_max:
                    why = (
                        f"the result of partition {a.partition} is {len(result)} bytes; "
                        f"results over {self.result_bytes_max} bytes cannot travel inline "
                        "(reduce or aggregate it further, or write it to storage)"
                    )
                    return ExecFailed(a, "user", why, "ValueError")
                refs = [OutputRef(self.worker, "result", len(result), result)]
        except UserCodeError as exc:
            return ExecFailed(a, "user", exc.message, exc.exc_type, exc.traceback)
        except CorruptInput as exc:
            return ExecFailed(a, "corrupt_input", str(exc), map_partition=exc.map_partition)
        except Exception as exc:  # noqa: BLE001 - reported to the scheduler as infra failure
            return ExecFailed(a, "infra", f"{type(exc).__name__}: {exc}", type(exc).__name__)
        return ExecDone(a, refs, time.perf_counter() - started)


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
