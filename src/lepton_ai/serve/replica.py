"""The replica: an ASGI app serving one model in the KServe / TF-Serving v1 convention.

``POST /predict`` takes ``{"instances": [...]}``, calls the target with the list
of instances and answers ``{"predictions": [...]}``. ``GET /healthz`` is
liveness (the process answers), ``GET /readyz`` readiness (model loaded, not
draining), ``GET /metrics`` Prometheus text.

The model runs on one worker thread, so the event loop keeps answering health
probes while a long prediction runs, and a model that is not thread-safe is
never called concurrently. With ``max_batch_size > 0`` concurrent requests are
grouped into one model call (micro-batching).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sys
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lepton_ai.serve.config import ReplicaConfig
from lepton_ai.serve.target import Target

VERSION_HEADER = "x-lepton-version"  # the deployment version this replica serves
REPLICA_HEADER = "x-lepton-replica"  # the replica's id in the cluster


class BadInput(ValueError):
    """The request is malformed; answered with ``status`` and the message."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Overloaded(RuntimeError):
    """The batch queue is full; the request is shed with 503."""


@dataclass
class ReplicaState:
    """Mutable flags the process entry point flips (ready after load, draining on SIGTERM)."""

    ready: bool = True
    draining: bool = False
    started_at: float = field(default_factory=time.monotonic)


def to_jsonable(value: Any) -> Any:
    """Numpy arrays and scalars to plain Python, so ``json`` can encode model output."""
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return tolist()
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    return value


def _predictions(raw: Any, count: int) -> list[Any]:
    out = to_jsonable(raw)
    if not isinstance(out, list):
        raise TypeError(f"model returned {type(raw).__name__}, expected a sequence")
    if len(out) != count:
        raise TypeError(f"model returned {len(out)} predictions for {count} instances")
    return out


class ModelRejected(Exception):
    """The model raised TypeError or ValueError on these instances: the input's fault
    (a string where it wants a number, a wrong shape), answered 400. It must not count
    against the replica: a healthy one would be ejected by one client's bad requests."""


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadInput(f"number {text[:40]} is out of range")
    return value


def _no_constants(name: str) -> float:
    raise BadInput(f"{name} is not a number JSON allows")


def parse_instances(body: bytes, config: ReplicaConfig, n_features: int | None) -> list[Any]:
    """Validate a /predict body; raises BadInput with the reason."""
    try:
        doc = json.loads(body, parse_float=_finite, parse_constant=_no_constants)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(f"malformed JSON: {exc}") from exc
    except RecursionError:
        raise BadInput("malformed JSON: nested too deep") from None
    if not isinstance(doc, dict) or "instances" not in doc:
        raise BadInput('expected a JSON object {"instances": [...]}')
    instances = doc["instances"]
    if not isinstance(instances, list):
        raise BadInput('"instances" must be a list')
    if len(instances) > config.instances_max:
        raise BadInput(f"{len(instances)} instances; at most {config.instances_max} per request")
    rows = [i for i in instances if isinstance(i, list)]
    if rows:
        if len(rows) != len(instances):
            raise BadInput("instances mix lists and non-lists")
        widths = {len(r) for r in rows}
        if len(widths) > 1:
            raise BadInput(f"ragged instances: row lengths {sorted(widths)}")
        width = widths.pop()
        if n_features is not None and width != n_features:
            raise BadInput(f"each instance needs {n_features} features, got {width}")
        if n_features is not None:  # a model that declares features takes numbers
            for i, row in enumerate(rows):
                if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in row):
                    raise BadInput(f"instance {i} holds a value that is not a number")
    return instances


class Batcher:
    """Groups concurrent requests into one model call (bounded queue, bounded wait)."""

    def __init__(
        self,
        run: Callable[[list[Any]], Awaitable[list[Any]]],
        max_batch_size: int,
        max_wait_s: float,
        queue_max: int,
        observe_batch: Callable[[int], None] = lambda n: None,
    ) -> None:
        if max_batch_size <= 0:
            raise ValueError("max_batch_size must be positive")
        self._run = run
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_s
        self._observe_batch = observe_batch
        self._queue: asyncio.Queue[tuple[list[Any], asyncio.Future[list[Any]]]]
        self._queue = asyncio.Queue(maxsize=queue_max)
        self._held: tuple[list[Any], asyncio.Future[list[Any]]] | None = None

    async def submit(self, instances: list[Any]) -> list[Any]:
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((instances, future))
        except asyncio.QueueFull:
            raise Overloaded("batch queue full") from None
        return await future

    async def _next(self, timeout_s: float | None) -> tuple[list[Any], asyncio.Future[list[Any]]]:
        if self._held is not None:
            item, self._held = self._held, None
            return item
        if timeout_s is None:
            return await self._queue.get()
        async with asyncio.timeout(timeout_s):
            return await self._queue.get()

    async def _collect(self) -> list[tuple[list[Any], asyncio.Future[list[Any]]]]:
        loop = asyncio.get_running_loop()
        batch = [await self._next(None)]
        size = len(batch[0][0])
        deadline = loop.time() + self._max_wait_s
        while size < self._max_batch_size:
            remaining = deadline - loop.time()
            if remaining <= 0 and self._queue.empty():
                break
            try:
                item = await self._next(max(remaining, 0.0))
            except TimeoutError:
                break
            if size + len(item[0]) > self._max_batch_size:
                self._held = item  # starts the next batch; a batch never exceeds the bound
                break
            batch.append(item)
            size += len(item[0])
        return batch

    async def run_forever(self) -> None:
        while True:
            batch = await self._collect()
            live = [(inst, fut) for inst, fut in batch if not fut.done()]
            if not live:
                continue
            instances = [x for inst, _ in live for x in inst]
            self._observe_batch(len(instances))
            try:
                out = await self._run(instances)
            except Exception as exc:  # noqa: BLE001 - delivered to every waiting request
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            start = 0
            for inst, fut in live:
                if not fut.done():
                    fut.set_result(out[start : start + len(inst)])
                start += len(inst)


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "lepton_replica_requests",
            "predict requests by status",
            ["code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "lepton_replica_request_seconds", "predict latency", registry=self.registry
        )
        self.batch = Histogram(
            "lepton_replica_batch_instances",
            "instances per model call",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=self.registry,
        )
        self.inflight = Gauge(
            "lepton_replica_inflight", "requests in flight", registry=self.registry
        )


class _ResponseHeaders:
    """ASGI middleware: the same extra headers on every HTTP response."""

    def __init__(self, app: ASGIApp, headers: list[tuple[bytes, bytes]]) -> None:
        self.app = app
        self.headers = headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.headers]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def build_app(
    target: Target,
    config: ReplicaConfig | None = None,
    state: ReplicaState | None = None,
    *,
    headers: Mapping[str, str] | None = None,
) -> Starlette:
    """The replica's ASGI app for an already loaded target; ``headers`` go on every answer."""
    config = config or ReplicaConfig()
    state = state or ReplicaState()
    metrics = _Metrics()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lepton-model")
    batcher: Batcher | None = None

    async def run_model(instances: list[Any]) -> list[Any]:
        loop = asyncio.get_running_loop()
        if batcher is None:
            metrics.batch.observe(len(instances))
        try:
            raw = await loop.run_in_executor(executor, target.predict, instances)
        except (TypeError, ValueError) as exc:
            raise ModelRejected(
                f"the model rejected the input: {type(exc).__name__}: {exc}"
            ) from exc
        return _predictions(raw, len(instances))

    if config.max_batch_size > 0:
        batcher = Batcher(
            run_model,
            config.max_batch_size,
            config.max_wait_ms / 1000.0,
            config.batch_queue_max,
            metrics.batch.observe,
        )

    async def predict(request: Request) -> Response:
        t0 = time.perf_counter()
        metrics.inflight.inc()
        try:
            response = await _predict(request, target, config, batcher, run_model)
        finally:
            metrics.inflight.dec()
        metrics.requests.labels(str(response.status_code)).inc()
        metrics.latency.observe(time.perf_counter() - t0)
        return response

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "alive"})

    async def readyz(request: Request) -> Response:
        if state.ready and not state.draining:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "draining" if state.draining else "loading"}, 503)

    async def metrics_endpoint(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(batcher.run_forever()) if batcher is not None else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            executor.shutdown(wait=False, cancel_futures=True)

    routes = [
        Route("/predict", predict, methods=["POST"]),
        Route("/v1/models/model:predict", predict, methods=["POST"]),  # TF-Serving's path
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
    ]
    extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    middleware = [Middleware(_ResponseHeaders, headers=extra)] if extra else []
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=middleware,
        exception_handlers={HTTPException: _http_error},
    )


async def _http_error(request: Request, exc: Exception) -> Response:
    """404, 405 and the like as JSON, as every other answer of a replica."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    headers = exc.headers if isinstance(exc, HTTPException) else None
    detail = exc.detail if isinstance(exc, HTTPException) else "error"
    return JSONResponse({"error": detail}, status, headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadInput("bad Content-Length")
        if int(declared) > limit:
            raise BadInput(f"body of {declared} bytes exceeds {limit}", 413)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadInput(f"body exceeds {limit} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)


async def _predict(
    request: Request,
    target: Target,
    config: ReplicaConfig,
    batcher: Batcher | None,
    run_model: Callable[[list[Any]], Awaitable[list[Any]]],
) -> Response:
    try:
        body = await _read_body(request, config.body_bytes_max)
        instances = parse_instances(body, config, target.n_features)
    except BadInput as exc:
        return JSONResponse({"error": str(exc)}, exc.status)
    if not instances:
        return JSONResponse({"predictions": []})
    try:
        if batcher is not None:
            out = await batcher.submit(instances)
        else:
            out = await run_model(instances)
    except Overloaded as exc:
        return JSONResponse({"error": str(exc)}, 503, headers={"Retry-After": "1"})
    except ModelRejected as exc:
        return JSONResponse({"error": str(exc)}, 400)
    except Exception as exc:  # noqa: BLE001 - the model's failure is this request's 500, not ours
        error_id = uuid.uuid4().hex[:12]
        # The traceback goes to the replica's stderr under the id the client sees.
        print(f"lepton replica: error {error_id}:", file=sys.stderr)
        traceback.print_exception(exc, file=sys.stderr)
        return JSONResponse(
            {"error": f"model raised {type(exc).__name__}: {exc}", "error_id": error_id}, 500
        )
    try:
        return JSONResponse({"predictions": out})
    except ValueError:  # NaN or infinity in the output: JSON has no such numbers
        return JSONResponse({"error": "the model returned a number JSON cannot carry"}, 500)
