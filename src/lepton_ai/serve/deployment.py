"""``lep.Deployment``: a replicated model behind a load balancer, from plain (sync) Python.

    with lep.Deployment("model.py:predict", replicas=3) as dep:
        httpx.post(f"{dep.url}/predict", json={"instances": [[1, 2]]})
        dep.scale(5); dep.status()

The runtime (supervisor + balancer) runs in its own event loop on a background
thread of this process; replicas are subprocesses on 127.0.0.1. Leaving the
block drains in-flight requests and stops every replica by PID; an ``atexit``
hook and the replicas' own parent watchdog cover the paths that skip it.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import signal
import threading
from concurrent.futures import Future
from dataclasses import replace
from types import TracebackType
from typing import Any

from lepton_ai import eventloop
from lepton_ai.serve.config import ReplicaConfig, ServeConfig
from lepton_ai.serve.supervisor import ServeRuntime
from lepton_ai.serve.target import check_target

_CALL_TIMEOUT_S = 30.0


class Deployment:
    """A model served by ``replicas`` processes behind a load balancer on ``port``.

    ``spares`` warm standbys are started too: loaded and probed but given no
    traffic, one takes over the moment a serving replica dies (for models that
    take seconds to load). ``max_batch_size`` > 0 turns on micro-batching.
    """

    def __init__(
        self,
        target: str,
        replicas: int = 1,
        port: int = 0,
        *,
        spares: int = 0,
        max_batch_size: int = 0,
        max_wait_ms: float = 5.0,
        config: ServeConfig | None = None,
        start_timeout_s: float = 120.0,
    ) -> None:
        if not isinstance(target, str):
            raise TypeError("target must be a str such as 'module:callable'")
        if not isinstance(replicas, int) or isinstance(replicas, bool):
            raise TypeError("replicas must be an int")
        config = config or ServeConfig()
        if max_batch_size:
            batching = ReplicaConfig(
                **{
                    **config.replica.__dict__,
                    "max_batch_size": max_batch_size,
                    "max_wait_ms": max_wait_ms,
                }
            )
            config = replace(config, replica=batching)
        self._runtime = ServeRuntime(target, replicas, port, config, spares=spares)
        self._start_timeout_s = start_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready: Future[str] = Future()
        self._done: Future[None] = Future()

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> Deployment:
        if self._thread is not None:
            raise RuntimeError("Deployment already started")
        check_target(self._runtime.target)  # a bad TARGET fails here, before any process
        self._thread = threading.Thread(target=self._main, name="lepton-serve", daemon=True)
        self._thread.start()
        atexit.register(self._kill_children)
        try:
            self._ready.result(timeout=self._start_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _main(self) -> None:
        loop = eventloop.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._runtime.run(self._on_ready))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            if not self._ready.done():
                self._ready.set_exception(exc)
            self._done.set_exception(exc)
        else:
            if not self._ready.done():
                self._ready.set_exception(RuntimeError("deployment stopped before it was ready"))
            self._done.set_result(None)
        finally:
            loop.close()

    def _on_ready(self, url: str) -> None:
        self._ready.set_result(url)

    def stop(self, timeout_s: float = 60.0) -> None:
        """Drain in-flight requests and stop every replica (idempotent)."""
        loop, thread = self._loop, self._thread
        if thread is None:
            return
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._runtime.request_stop)
        thread.join(timeout_s)
        if thread.is_alive():
            self._kill_children()
        atexit.unregister(self._kill_children)

    def _kill_children(self) -> None:
        for pid in self._runtime.pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> Deployment:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- queries and control --------------------------------------------------------------
    @property
    def url(self) -> str:
        if not self._ready.done():
            raise RuntimeError("Deployment is not started")
        return self._ready.result()

    def _call(self, coro: Any, timeout_s: float = _CALL_TIMEOUT_S) -> Any:
        loop = self._loop
        if loop is None or not self._ready.done() or self._done.done():
            coro.close()
            raise RuntimeError("Deployment is not running")
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout_s)

    def scale(self, replicas: int, timeout_s: float = 120.0) -> None:
        """Change the replica count; returns when new replicas are ready or old ones stopped."""
        if not isinstance(replicas, int) or isinstance(replicas, bool):
            raise TypeError("replicas must be an int")
        self._call(self._runtime.scale(replicas), timeout_s)

    def status(self) -> list[dict[str, Any]]:
        """Each replica: id, pid, url, ready, restarts (and role, state, outstanding, ejections)."""

        async def snapshot() -> list[dict[str, Any]]:
            return self._runtime.status()

        result: list[dict[str, Any]] = self._call(snapshot())
        return result

    def pids(self) -> list[int]:
        """PIDs of the replica processes (for tests and fault injection)."""

        async def snapshot() -> list[int]:
            return self._runtime.pids()

        result: list[int] = self._call(snapshot())
        return result
