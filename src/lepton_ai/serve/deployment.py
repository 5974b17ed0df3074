"""``lep.Deployment``: a replicated model behind a load balancer, from plain (sync) Python.

    with lep.Deployment("model.py:predict", replicas=3) as dep:
        httpx.post(f"{dep.url}/predict", json={"instances": [[1, 2]]})
        dep.scale(5); dep.status()

With ``cluster=`` (and a ``name``) the deployment is cluster state instead
(``serve.cluster_deployment``): it runs on the worker nodes, outlives this
process, and ``Deployment.get(cluster, name)`` finds it from any other.

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
from lepton_ai.serve.cluster_deployment import ClusterDeployment
from lepton_ai.serve.config import ReplicaConfig, ServeConfig
from lepton_ai.serve.runtime import ServeRuntime
from lepton_ai.serve.spec import Autoscale
from lepton_ai.serve.target import check_target

_CALL_TIMEOUT_S = 30.0


class Deployment:
    """A model served by ``replicas`` processes behind a load balancer on ``port``.

    ``spares`` warm standbys are started too: loaded and probed but given no
    traffic, one takes over the moment a serving replica dies (for models that
    take seconds to load). ``max_batch_size`` > 0 turns on micro-batching.

    ``cluster=`` (a ``LocalCluster`` or ``lep.connect()``) with ``name=``: the spec is
    committed to the cluster and this returns at once (``wait_ready()`` waits);
    ``port``, ``spares`` and ``config`` are the local runtime's and are refused.
    ``max_replicas=`` turns on autoscaling (cluster only): between ``min_replicas``
    (default ``replicas``) and ``max_replicas``, ``target_inflight`` requests in flight
    per replica, after the load has wanted more for ``scale_up_delay_s`` or fewer for
    ``scale_down_delay_s``.
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
        cluster: Any = None,
        name: str | None = None,
        min_replicas: int | None = None,
        max_replicas: int | None = None,
        target_inflight: float = 4.0,
        scale_up_delay_s: float = 3.0,
        scale_down_delay_s: float = 30.0,
    ) -> None:
        if not isinstance(target, str):
            raise TypeError("target must be a str such as 'module:callable'")
        if not isinstance(replicas, int) or isinstance(replicas, bool):
            raise TypeError("replicas must be an int")
        self._remote: ClusterDeployment | None = None
        if cluster is not None or name is not None:
            if cluster is None or not name:
                raise ValueError("a cluster deployment needs both cluster= and name=")
            if port or spares or config is not None:
                raise ValueError("port, spares and config apply to a local deployment only")
            policy = None
            if max_replicas is not None:
                policy = Autoscale(
                    replicas if min_replicas is None else min_replicas,
                    max_replicas,
                    target_inflight,
                    scale_up_delay_s,
                    scale_down_delay_s,
                )
            self._remote = ClusterDeployment.create(
                cluster,
                target,
                replicas,
                name,
                max_batch_size=max_batch_size,
                max_wait_ms=max_wait_ms,
                autoscale=policy,
            )
            self._start_timeout_s = start_timeout_s
            return
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

    @classmethod
    def get(cls, cluster: Any, name: str) -> Deployment:
        """The deployment ``name`` of ``cluster``, from any process (KeyError if none)."""
        dep = cls.__new__(cls)
        dep._remote = ClusterDeployment.get(cluster, name)
        dep._start_timeout_s = 120.0
        return dep

    @property
    def on_cluster(self) -> ClusterDeployment:
        """The cluster deployment's handle (``update``, ``rollback``, ``wait_ready`` ...)."""
        if self._remote is None:
            raise RuntimeError("a local Deployment (no cluster=) has no cluster handle")
        return self._remote

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> Deployment:
        if self._remote is not None:
            self._remote.wait_ready(self._start_timeout_s)
            return self
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
        """Drain in-flight requests and stop every replica (idempotent). On a cluster:
        ``delete()`` (the ``with`` block's end)."""
        if self._remote is not None:
            with contextlib.suppress(KeyError):
                self._remote.delete()
            return
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
        if self._remote is not None:
            return self._remote.url
        if not self._ready.done():
            raise RuntimeError("Deployment is not started")
        return self._ready.result()

    def _call(self, coro: Any, timeout_s: float = _CALL_TIMEOUT_S) -> Any:
        loop = self._loop
        if loop is None or not self._ready.done() or self._done.done():
            coro.close()
            raise RuntimeError("Deployment is not running")
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout_s)

    @property
    def urls(self) -> list[str]:
        """Every entry point: each worker node's balancer on a cluster, else ``[url]``."""
        return self._remote.urls if self._remote is not None else [self.url]

    @property
    def name(self) -> str:
        return self.on_cluster.name

    @property
    def version(self) -> int:
        return self.on_cluster.version

    def wait_ready(self, timeout_s: float = 120.0) -> Deployment:
        self.on_cluster.wait_ready(timeout_s)
        return self

    def update(self, target: str, timeout_s: float = 300.0) -> int:
        """Roll out ``target`` one replica at a time (cluster deployments); the new version."""
        return self.on_cluster.update(target, timeout_s=timeout_s)

    def rollback(self, timeout_s: float = 300.0) -> int:
        return self.on_cluster.rollback(timeout_s=timeout_s)

    def delete(self) -> None:
        self.on_cluster.delete()

    def scale(self, replicas: int, timeout_s: float = 120.0) -> None:
        """Change the replica count; returns when new replicas are ready or old ones stopped."""
        if not isinstance(replicas, int) or isinstance(replicas, bool):
            raise TypeError("replicas must be an int")
        if self._remote is not None:
            self._remote.scale(replicas, timeout_s=timeout_s)
            return
        self._call(self._runtime.scale(replicas), timeout_s)

    def status(self) -> list[dict[str, Any]]:
        """Each replica: id, pid, url, ready, restarts (and role, state, outstanding, ejections;
        on a cluster: node, version, state, error)."""
        if self._remote is not None:
            return self._remote.status()

        async def snapshot() -> list[dict[str, Any]]:
            return self._runtime.status()

        result: list[dict[str, Any]] = self._call(snapshot())
        return result

    def pids(self) -> list[int]:
        """PIDs of the replica processes (for tests and fault injection)."""
        if self._remote is not None:
            return self._remote.pids()

        async def snapshot() -> list[int]:
            return self._runtime.pids()

        result: list[int] = self._call(snapshot())
        return result
