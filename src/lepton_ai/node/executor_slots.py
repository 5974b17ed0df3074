"""The node agent's side of its executors: spawn, feed, watch, replace.

One ``ExecutorSlot`` per slot keeps one executor process alive at all times (the
"nanny" pattern of Dask's worker). The agent talks to it over a socketpair; the
executor's death shows up at once as EOF on that pipe, the attempt it was
running fails with ``ExecutorDied`` (an infrastructure failure) and a
replacement is started straight away so the slot is warm for the next task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from lepton_ai.compute.scheduler_events import TaskAttempt
from lepton_ai.errors import LeptonError
from lepton_ai.heal.backoff import Backoff
from lepton_ai.node import executor_process as exec_mod
from lepton_ai.node.messages import (
    ExecCancel,
    ExecForget,
    ExecHello,
    ExecMessage,
    ExecOutcome,
    ExecPlan,
    ExecRun,
)
from lepton_ai.node.process import PARENT_PID_ENV
from lepton_ai.wire import Codec, ConnectionClosed, encode_frame, read_frame


class ExecutorDied(LeptonError):
    """The executor process ended while (or before) running an attempt.

    ``cancelled``: the agent killed it on purpose to stop that attempt.
    """

    def __init__(self, reason: str, cancelled: bool = False) -> None:
        super().__init__(reason)
        self.cancelled = cancelled


class Requeued(ExecutorDied):
    """The executor died before this attempt started: run it again, nothing failed."""


@dataclass(frozen=True)
class ExecutorConfig:
    start_timeout_s: float = 30.0
    frame_bytes_max: int = 256 << 20
    # One task's result: up to ``result_inline_bytes_max`` it travels inline in the
    # log (cheap for the many small results); bigger, it is a stored object on this
    # node (replicated by the agent) and only its reference is logged; past
    # ``result_bytes_max`` the task fails with an error naming the bound.
    result_bytes_max: int = 1 << 30
    result_inline_bytes_max: int = 64 << 10
    objects_dir: str = ""  # the node's object store (set by the agent)
    node_id: str = ""
    # A failed executor start is retried after restart_backoff_s, doubling up to the max.
    restart_backoff_s: float = 0.05
    restart_backoff_max_s: float = 2.0
    spares: int = 1  # warm executors per node kept aside for instant replacement
    # After the node's first executors are up: a spare matters only once an
    # executor dies, and until then costs ~20 MB and 0.1 s of CPU, which a
    # cluster's start-up and first job should not pay (a death before it is
    # up is handled by a cold start, ~0.1 s slower).
    spares_delay_s: float = 2.0
    # A spare is insurance: its start (interpreter + imports, ~0.1 CPU-s) waits
    # until this node has run no task for ``spares_idle_for_s`` (a lull, not the gap
    # between two tasks or two jobs), so it does not take a core from running work;
    # after ``spares_idle_wait_s`` of (nearly) continuous work it starts anyway: a
    # busy node is where an executor is likeliest to die, so it should not wait long.
    # (Measured on 1,000 x 10 ms tasks: a spare warming up mid-job costs ~1.2% of
    # the job's time, also at nice 19 - the cores have small gaps it fills.)
    spares_idle_for_s: float = 0.5
    spares_idle_wait_s: float = 10.0
    spares_idle_poll_s: float = 0.05
    # Attempts handed to one executor at once; it runs them in order, so the next
    # one starts without waiting for the agent (a pipe round trip per tiny task).
    window: int = 8
    # ... but for a stage whose tasks take this long here, only ``window_slow``:
    # an executor reads the agent's messages between tasks only, so attempts
    # handed to it cannot be taken back (work stealing) while a slow one runs;
    # one waiting attempt still hides the pipe round trip.
    slow_task_s: float = 0.025
    window_slow: int = 2
    # ... and the shuffle input they carry; one attempt always goes, whatever its size.
    window_bytes_max: int = 64 << 20
    write_buffer_bytes_max: int = 1 << 20  # unsent bytes to an executor before we wait

    def restart_backoff(self) -> Backoff:
        return Backoff(self.restart_backoff_s, 2.0, self.restart_backoff_max_s)


_CODEC = Codec[ExecMessage](ExecMessage)
log = logging.getLogger("lepton_ai.worker")


def describe_exit(code: int | None) -> str:
    if code is None:
        return "executor pipe closed"
    if code < 0:
        try:
            return f"executor killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"executor killed by signal {-code}"
    return f"executor exited with status {code}"


class _Pending:
    __slots__ = ("future", "size_bytes")

    def __init__(self, future: asyncio.Future[ExecOutcome], size_bytes: int) -> None:
        self.future, self.size_bytes = future, size_bytes


def _ignore() -> None:
    return None


class ExecutorSlot:
    """One slot: keeps an executor running and feeds it a window of attempts.

    The executor runs the window in order, so the first attempt without a reply
    is the one running. When the executor dies, that one fails (``ExecutorDied``)
    and the rest, which never started, come back as ``Requeued``.
    """

    def __init__(
        self,
        slot: int,
        worker: str,
        store_dir: str,
        config: ExecutorConfig,
        on_event: Callable[[str, str], None],
        *,
        on_capacity: Callable[[], None] = _ignore,
        on_started: Callable[[TaskAttempt], None] = lambda a: None,
        on_ready: Callable[[], None] = _ignore,
    ) -> None:
        self.slot = slot
        self.worker = worker
        self.store_dir = store_dir
        self.config = config
        self._backoff = config.restart_backoff()
        self.on_event = on_event  # (kind, detail) for the node's event feed
        self.on_capacity = on_capacity  # room for another attempt (or a new executor)
        self.on_started = on_started  # a queued attempt became the running one
        self.on_ready = on_ready  # an executor (first or replacement) said hello
        self.pid = 0
        self.restarts = 0
        self.cancelled = False  # killed on purpose: the running attempt was cancelled
        self.outstanding: OrderedDict[TaskAttempt, _Pending] = OrderedDict()
        self.running_since = 0.0  # loop time the first outstanding attempt started
        self._inflight_bytes = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader: asyncio.StreamReader | None = None
        self._ready = asyncio.Event()
        self._plans_sent: set[str] = set()
        self._closing = False
        self.spares: SparePool | None = None

    @property
    def state(self) -> str:
        if not self._ready.is_set():
            return "starting"
        return "busy" if self.outstanding else "idle"

    def can_take(self, window: int | None = None) -> bool:
        """Room in the window (``config.window`` unless given) for one more attempt
        (always for one, whatever its size)."""
        if not self._ready.is_set() or self._writer is None:
            return False
        if not self.outstanding:
            return True
        return (
            len(self.outstanding) < (self.config.window if window is None else window)
            and self._inflight_bytes < self.config.window_bytes_max
        )

    def is_running(self, attempt: TaskAttempt) -> bool:
        return next(iter(self.outstanding), None) == attempt

    async def supervise(self) -> None:
        """Run forever: start an executor, serve it until it dies, start another."""
        failures = 0  # failed starts in a row; a started executor resets it
        while not self._closing:
            try:
                await self._start()
            except (OSError, ExecutorDied, TimeoutError) as exc:
                self.on_event("executor_start_failed", f"slot {self.slot}: {exc}")
                failures += 1
                await asyncio.sleep(self._backoff.next_delay(failures))
                continue
            failures = 0
            reason = await self._read_until_death()
            self._ready.clear()
            self._plans_sent.clear()
            self._fail_outstanding(reason)
            if not self._closing:
                self.restarts += 1
                self.on_event("executor_died", f"slot {self.slot} pid {self.pid}: {reason}")

    def _fail_outstanding(self, reason: str) -> None:
        pending = list(self.outstanding.values())
        self.outstanding.clear()
        self._inflight_bytes = 0
        cancelled, self.cancelled = self.cancelled, False
        if not pending:
            return
        # Reversed: their callbacks run in this order and put them back at the
        # front of the lane one by one, which restores the original order.
        for p in reversed(pending[1:]):
            if not p.future.done():
                p.future.set_exception(Requeued(reason))
        if not pending[0].future.done():
            pending[0].future.set_exception(ExecutorDied(reason, cancelled))

    async def _start(self) -> None:
        started = self.spares.take() if self.spares is not None else None
        if started is None:
            started = await spawn_executor(self.worker, self.store_dir, self.config)
        self._proc, self._reader, self._writer = started.proc, started.reader, started.writer
        self.pid = started.proc.pid
        self._ready.set()
        self.on_ready()
        self.on_capacity()

    async def _recv(self) -> ExecMessage:
        if self._reader is None:
            raise AssertionError("executor pipe not open")
        return _CODEC.decode(await read_frame(self._reader, self.config.frame_bytes_max))

    async def _read_until_death(self) -> str:
        while True:
            try:
                msg = await self._recv()
            except (ConnectionClosed, ConnectionError, LeptonError):
                break
            if isinstance(msg, ExecOutcome):
                self._on_reply(msg)
                continue
            break  # anything else from an executor is a bug there: replace it
        code = await self._reap(kill=True)
        return describe_exit(code)

    def _on_reply(self, msg: ExecOutcome) -> None:
        was_running = self.is_running(msg.attempt)
        pending = self.outstanding.pop(msg.attempt, None)
        if pending is None:
            return  # e.g. cancelled meanwhile and already answered
        self._inflight_bytes -= pending.size_bytes
        if not pending.future.done():
            pending.future.set_result(msg)
        if was_running and self.outstanding:
            self.running_since = asyncio.get_running_loop().time()
            self.on_started(next(iter(self.outstanding)))
        self.on_capacity()

    async def _reap(self, kill: bool) -> int | None:
        if self._writer is not None:
            self._writer.close()
        proc = self._proc
        if proc is None:
            return None
        if kill and proc.returncode is None:
            # EOF usually means it is dying already; give it a moment to report why.
            try:
                return await asyncio.wait_for(proc.wait(), 0.5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        return await proc.wait()

    async def submit(self, job_id: str, plan: bytes, msg: ExecRun) -> asyncio.Future[ExecOutcome]:
        """Hand one attempt to the executor; the future resolves with its reply, or
        fails with ``ExecutorDied`` (it was running) or ``Requeued`` (it never started)."""
        await self._ready.wait()
        writer = self._writer
        if writer is None or msg.attempt in self.outstanding:
            raise AssertionError(f"slot {self.slot}: cannot submit {msg.attempt}")
        future: asyncio.Future[ExecOutcome] = asyncio.get_running_loop().create_future()
        size = sum(map(len, msg.inputs))
        if not self.outstanding:
            self.running_since = asyncio.get_running_loop().time()
        self.outstanding[msg.attempt] = _Pending(future, size)
        self._inflight_bytes += size
        frames = []
        if job_id not in self._plans_sent:
            frames.append(_frame(ExecPlan(job_id, plan), self.config.frame_bytes_max))
            self._plans_sent.add(job_id)
        frames.append(_frame(msg, self.config.frame_bytes_max))
        if not writer.is_closing():  # else it died: the attempt fails with it (ExecutorDied)
            writer.writelines(frames)
        if writer.transport.get_write_buffer_size() > self.config.write_buffer_bytes_max:
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        return future

    def cancel(self, attempt: TaskAttempt, queued_only: bool = False) -> bool:
        """Stop ``attempt`` if it is ours: kill the executor if it is running it (the
        only way to stop arbitrary user code), else ask the executor to drop it.

        With ``queued_only`` (work stealing) a queued attempt is answered here at
        once: the executor reads the cancellation only between tasks, so behind a
        hung task the thief would otherwise idle as long as the hang lasts. Its
        late reply, if it ever comes, finds nothing outstanding and is dropped.
        """
        if attempt not in self.outstanding:
            return False
        if self.is_running(attempt):
            if queued_only:
                return True
            self.cancelled = True
            self.signal(signal.SIGKILL)
            return True
        if self._writer is not None and self._ready.is_set() and not self._writer.is_closing():
            self._writer.write(_frame(ExecCancel([attempt]), self.config.frame_bytes_max))
        if queued_only:
            pending = self.outstanding.pop(attempt)
            self._inflight_bytes -= pending.size_bytes
            if not pending.future.done():
                pending.future.set_exception(ExecutorDied("given up for work stealing", True))
            self.on_capacity()
        return True

    def forget(self, job_ids: list[str]) -> None:
        known = [j for j in job_ids if j in self._plans_sent]
        if not known or self._writer is None or not self._ready.is_set():
            return
        if self._writer.is_closing():
            return  # it died; a new executor starts without plans
        self._plans_sent.difference_update(known)
        self._writer.write(_frame(ExecForget(known), self.config.frame_bytes_max))

    def signal(self, sig: int) -> bool:
        if self._proc is None or self._proc.returncode is not None:
            return False
        with contextlib.suppress(ProcessLookupError):
            self._proc.send_signal(sig)
            return True
        return False

    async def close(self) -> None:
        self._closing = True
        self.signal(signal.SIGKILL)
        if self._proc is not None:
            await self._proc.wait()


class Started:
    """An executor process that has said hello and waits for work."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.proc, self.reader, self.writer = proc, reader, writer

    async def kill(self) -> None:
        self.writer.close()
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        await self.proc.wait()


async def spawn_executor(worker: str, store_dir: str, config: ExecutorConfig) -> Started:
    """Start an executor and wait for its hello; ``ExecutorDied`` if it never says it."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    env = dict(os.environ)
    env[exec_mod.FD_ENV] = str(child.fileno())
    env[exec_mod.WORKER_ENV] = worker
    env[exec_mod.STORE_ENV] = store_dir
    env[exec_mod.FRAME_BYTES_MAX_ENV] = str(config.frame_bytes_max)
    env[exec_mod.RESULT_BYTES_MAX_ENV] = str(config.result_bytes_max)
    env[exec_mod.RESULT_INLINE_BYTES_MAX_ENV] = str(config.result_inline_bytes_max)
    env[exec_mod.OBJECTS_ENV] = config.objects_dir
    env[exec_mod.NODE_ENV] = config.node_id
    env[PARENT_PID_ENV] = str(os.getpid())
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "lepton_ai.node.exec_boot",
            pass_fds=(child.fileno(),),
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
        )
    finally:
        child.close()
    reader, writer = await asyncio.open_connection(sock=parent, limit=config.frame_bytes_max + 1024)
    started = Started(proc, reader, writer)
    try:
        raw = await asyncio.wait_for(
            read_frame(reader, config.frame_bytes_max), config.start_timeout_s
        )
        hello = _CODEC.decode(raw)
    except (ConnectionClosed, TimeoutError, LeptonError) as exc:
        await started.kill()
        raise ExecutorDied(f"executor did not start: {exc}") from exc
    except BaseException:
        # Cancelled while it started (the agent is closing): leave nothing behind.
        started.writer.close()
        with contextlib.suppress(ProcessLookupError):
            started.proc.kill()
        raise
    if not isinstance(hello, ExecHello):
        await started.kill()
        raise ExecutorDied(f"executor said {type(hello).__name__} instead of hello")
    return started


class SparePool:
    """Warm executors kept aside, so a dead executor is replaced in microseconds.

    Like a pre-forked server: the replacement has already paid for interpreter
    start-up and imports; the pool then starts the next spare in the background.
    """

    def __init__(self, size: int, identity: Callable[[], tuple[str, str]], config: ExecutorConfig):
        self.size = size
        self.identity = identity  # -> (worker id, block store dir) for new spares
        self.config = config
        self._backoff = config.restart_backoff()
        self._spares: list[Started] = []
        self._need = asyncio.Event()
        self._need.set()

    def pids(self) -> list[int]:
        return [s.proc.pid for s in self._spares]

    def take(self) -> Started | None:
        self._need.set()
        while self._spares:
            started = self._spares.pop()
            if started.proc.returncode is None:
                return started
        return None

    async def discard_all(self) -> None:
        """Spares started under an identity that is no longer ours."""
        spares, self._spares = self._spares, []
        for started in spares:
            await started.kill()
        self._need.set()

    async def run(self, wait_for: list[ExecutorSlot]) -> None:
        for slot in wait_for:  # never compete with the first executors' start-up
            await slot._ready.wait()
        # ... nor with their warm-up imports and the cluster's first job: a spare
        # only matters once an executor dies, and until then it costs CPU.
        await asyncio.sleep(self.config.spares_delay_s)
        failures = 0  # failed spare starts in a row; a started spare resets it
        while True:
            await self._need.wait()
            self._need.clear()
            while len(self._spares) < self.size:
                await self._until_idle(wait_for)
                identity = self.identity()
                try:
                    started = await spawn_executor(*identity, self.config)
                except (OSError, ExecutorDied) as exc:
                    log.info("spare executor failed to start: %s", exc)
                    failures += 1
                    await asyncio.sleep(self._backoff.next_delay(failures))
                    continue
                failures = 0
                if identity != self.identity():
                    await started.kill()  # the worker re-incarnated meanwhile
                    continue
                self._spares.append(started)

    async def _until_idle(self, slots: list[ExecutorSlot]) -> None:
        """Return once no slot had an attempt outstanding for ``spares_idle_for_s``
        (as seen every ``spares_idle_poll_s``), or after ``spares_idle_wait_s``."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = now + self.config.spares_idle_wait_s
        idle_since: float | None = None
        while now < deadline:
            if any(slot.outstanding for slot in slots):
                idle_since = None
            elif idle_since is None:
                idle_since = now
            if idle_since is not None and now - idle_since >= self.config.spares_idle_for_s:
                return
            await asyncio.sleep(self.config.spares_idle_poll_s)
            now = loop.time()

    async def close(self) -> None:
        await self.discard_all()


def _frame(msg: ExecMessage, bound: int) -> bytes:
    return encode_frame(_CODEC.encode(msg), bound)
