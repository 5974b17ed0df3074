"""The user-facing compute API: ``DistributedTask`` and the lazy ``Dataset``.

    task = lep.DistributedTask(cluster)
    counts = (task.read_text("logs/*.log")
                  .flat_map(str.split)
                  .map(lambda w: (w, 1))
                  .reduce_by_key(operator.add, partitions=8)
                  .collect())

Transformations are lazy and only record a logical chain; an action (``collect``,
``count``, ``reduce``) or ``submit`` turns the chain into a ``JobPlan`` (see
``plan.py``) and hands it to the cluster through the ``JobRunner`` protocol
below. Bad input fails at the call with TypeError/ValueError; a function that
cannot be pickled fails at ``submit``/the action with TypeError.

The cluster side (node layer) implements ``JobRunner``; waiting, progress and
fetching the result belong to ``lepton_ai.compute.job.Job``.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from lepton_ai.compute.plan import (
    PLAN_BYTES_MAX,
    SHUFFLE_PARTITIONS_MAX,
    ActionKind,
    JobOptions,
    LogicalOp,
    NarrowKind,
    NarrowOp,
    ShuffleOp,
    SourceOp,
    build_plan,
    decode_plan,
    encode_plan,
    store_large_ops,
)
from lepton_ai.data.outputs import OutputFormat, WriteSpec, normalize_url
from lepton_ai.data.partition import check_partitions, split_evenly
from lepton_ai.data.sources import (
    BlobStorer,
    SourceLimits,
    TextFormat,
    inline_sources,
    range_sources,
    text_sources,
)
from lepton_ai.errors import LimitExceeded

if TYPE_CHECKING:
    from lepton_ai.compute.job import Job

DEFAULT_PARTITIONS = 8


@runtime_checkable
class JobRunner(Protocol):
    """What a cluster object offers the Dataset API (implemented by the node layer).

    ``submit_plan`` sends an encoded ``JobPlan`` (``plan.encode_plan``) with its
    options to the leading coordinator, which commits ``JobSubmitted`` to the
    log, and returns the job id once it is committed. It raises
    ``lepton_ai.errors.Unavailable`` if no leader answers in time. The caller
    then waits with ``Job(cluster, job_id).result(timeout=)``.

    Optional extras, used when present: ``default_parallelism: int`` (partitions
    when none are given; else 8) and ``put_blob(data) -> key`` (see ``_blob_storer``).
    """

    def submit_plan(self, plan: bytes, options: JobOptions) -> str: ...


def _blob_storer(cluster: object) -> BlobStorer | None:
    """The cluster's optional ``put_blob(data: bytes) -> key``.

    A cluster that offers it stores big ``parallelize`` chunks outside the plan
    (and so outside the coordinator's log); its executors must then pass
    ``fetch_blob`` to ``tasks.run_task``. Without it, chunks travel inline.
    """
    put = getattr(cluster, "put_blob", None)
    return put if callable(put) else None


def _now(ref: Any) -> Any:
    """A ``put_blob`` result, waited for if it is a future."""
    return ref.result() if isinstance(ref, concurrent.futures.Future) else ref


def _check_callable(fn: object, what: str) -> None:
    if not callable(fn):
        raise TypeError(f"{what} must be callable, got {type(fn).__name__}")


def _check_runner(cluster: object) -> JobRunner:
    if not isinstance(cluster, JobRunner):
        raise TypeError(
            f"DistributedTask needs a cluster (lep.LocalCluster or lep.connect(...)), "
            f"got {type(cluster).__name__}"
        )
    return cluster


class DistributedTask:
    """Entry point of the compute API, bound to one cluster.

    Keyword options are the defaults of every job started from this task:
    ``max_retries=3``, ``retry_exceptions=False``, ``speculation=True``,
    ``task_timeout_s=None`` (seconds an attempt may run before it is killed and
    retried as an infrastructure failure; see ``plan.JobOptions``),
    ``shuffle_replicas=2`` (copies of each map output on distinct nodes: a node's
    death then costs only the attempts it was running; 1 saves the copies),
    ``progress=None`` (None: a rich progress bar when stderr is a TTY and the
    job runs longer than a second; False: never; True: always).
    """

    def __init__(
        self,
        cluster: Any,
        *,
        max_retries: int = 3,
        retry_exceptions: bool = False,
        speculation: bool = True,
        task_timeout_s: float | None = None,
        progress: bool | None = None,
        limits: SourceLimits | None = None,
        shuffle_replicas: int = 2,
    ) -> None:
        self.cluster: JobRunner = _check_runner(cluster)
        self.options = JobOptions(
            max_retries=max_retries,
            retry_exceptions=bool(retry_exceptions),
            speculation=bool(speculation),
            task_timeout_s=task_timeout_s,
            shuffle_replicas=shuffle_replicas,
        )
        if progress is not None and not isinstance(progress, bool):
            raise TypeError("progress must be None, True or False")
        self.progress = progress
        self.limits = limits or SourceLimits()
        self._last: Dataset | None = None

    def _default_partitions(self) -> int:
        n = getattr(self.cluster, "default_parallelism", DEFAULT_PARTITIONS)
        return n if isinstance(n, int) and n > 0 else DEFAULT_PARTITIONS

    def parallelize(self, data: Iterable[Any], partitions: int | None = None) -> Dataset:
        """A dataset of the items of ``data`` (any iterable, a ``range`` or a numpy array).

        Items keep their order across partitions. A numpy array is split along
        axis 0 into ``partitions`` chunks; its items are the rows, and
        ``map_partitions`` receives the ndarray chunk itself. A ``range`` travels
        as its bounds. Other iterables are materialised and pickled into the plan.
        """
        parts = self._default_partitions() if partitions is None else check_partitions(partitions)
        if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
            raise TypeError(f"parallelize() needs an iterable of items, got {type(data).__name__}")
        if isinstance(data, range):
            return Dataset(self, (SourceOp(tuple(range_sources(data, parts))),))
        chunks: list[Any]
        if type(data).__module__ == "numpy" and type(data).__name__ == "ndarray":
            import numpy as np

            arr: Any = data
            if arr.ndim == 0:
                raise ValueError("parallelize() needs an array with at least one dimension")
            chunks = list(np.array_split(arr, parts))
        else:
            chunks = [list(c) for c in split_evenly(list(data), parts)]
        sources = inline_sources(chunks, self.limits, _blob_storer(self.cluster))
        return Dataset(self, (SourceOp(tuple(sources)),))

    def read_text(self, path: str, partitions: int | None = None) -> Dataset:
        """A dataset of the lines (without newline) of the files at ``path``.

        ``path`` is a local path, a directory, a glob (``logs/*.log``) or an fsspec
        URL. Files are split into byte ranges (at least ``partitions`` of them when
        the files are big enough; default one per 32 MiB); each executor reads its
        range itself. FileNotFoundError if nothing matches.
        """
        return self._read(path, partitions, "text")

    def read_jsonl(self, path: str, partitions: int | None = None) -> Dataset:
        """Like ``read_text`` but each non-blank line is parsed with ``json.loads``."""
        return self._read(path, partitions, "jsonl")

    def read_csv(self, path: str, partitions: int | None = None, *, header: bool = True) -> Dataset:
        """Rows of CSV files: dicts keyed by the header row, or lists if ``header=False``.

        Records must not contain newlines inside quoted fields (files are split by line).
        """
        return self._read(path, partitions, "csv", header)

    def _read(
        self, path: str, partitions: int | None, fmt: TextFormat, header: bool = True
    ) -> Dataset:
        if partitions is not None:
            check_partitions(partitions)
        sources = text_sources(path, partitions, fmt=fmt, csv_header=header, limits=self.limits)
        return Dataset(self, (SourceOp(tuple(sources)),))

    def read_parquet(
        self,
        path: str,
        partitions: int | None = None,
        columns: list[str] | None = None,
    ) -> Dataset:
        """Rows of Parquet files as dicts (column -> value), only ``columns`` if given.

        ``path`` as for ``read_text``. Partitions are runs of whole row groups of
        one file, balanced by rows (``partitions`` is a target; a file with few
        row groups gives fewer); the client reads only the files' footers.
        Needs pyarrow (``pip install 'lepton-ai[parquet]'``, else ImportError).
        FileNotFoundError if nothing matches; ValueError for a file that is not
        Parquet or lacks one of ``columns``.
        """
        from lepton_ai.data.parquet import parquet_sources

        if partitions is not None:
            check_partitions(partitions)
        sources = parquet_sources(path, partitions, columns, self.limits)
        return Dataset(self, (SourceOp(tuple(sources)),))

    def map(
        self, fn: Callable[[Any], Any], data: Iterable[Any], partitions: int | None = None
    ) -> Dataset:
        """The seed's convenience: ``parallelize(data, partitions).map(fn)``, remembered.

        Lazy like any Dataset: call ``.collect()`` on it, or ``task.reduce(op)``
        to reduce the most recent ``task.map`` result across the cluster.
        """
        _check_callable(fn, "map function")
        ds = self.parallelize(data, partitions).map(fn)
        self._last = ds
        return ds

    def reduce(self, op: Callable[[Any, Any], Any] | None = None) -> Any:
        """Reduce the dataset of the last ``task.map`` call with ``op(a, b)``.

        ``op=None`` sums (``operator.add``; 0 for an empty dataset). ValueError if
        ``task.map`` was never called.
        """
        if self._last is None:
            raise ValueError("task.reduce() needs a previous task.map(fn, data)")
        return self._last.reduce(op)


class Dataset:
    """A lazy, partitioned collection. Transformations return new Datasets."""

    def __init__(self, task: DistributedTask, ops: tuple[LogicalOp, ...]) -> None:
        self._task = task
        self._ops = ops

    def __repr__(self) -> str:
        steps = [
            f"{op.kind}" if isinstance(op, NarrowOp) else f"{op.mode}_by_key[{op.partitions}]"
            for op in self._ops[1:]
            if isinstance(op, (NarrowOp, ShuffleOp))
        ]
        return f"Dataset(partitions={self.num_partitions}, ops=[{', '.join(steps)}])"

    def _narrow(self, kind: NarrowKind, fn: Callable[..., Any]) -> Dataset:
        _check_callable(fn, f"{kind} function")
        return Dataset(self._task, (*self._ops, NarrowOp(kind, fn)))

    @property
    def num_partitions(self) -> int:
        n = len(self._ops[0].sources) if isinstance(self._ops[0], SourceOp) else 0
        for op in self._ops:
            if isinstance(op, ShuffleOp):
                n = op.partitions
        return n

    def map(self, fn: Callable[[Any], Any]) -> Dataset:
        """Apply ``fn`` to each item."""
        return self._narrow("map", fn)

    def filter(self, pred: Callable[[Any], Any]) -> Dataset:
        """Keep the items for which ``pred(item)`` is true."""
        return self._narrow("filter", pred)

    def flat_map(self, fn: Callable[[Any], Iterable[Any]]) -> Dataset:
        """Replace each item by the items of the iterable ``fn(item)``."""
        return self._narrow("flat_map", fn)

    def map_partitions(self, fn: Callable[[Iterable[Any]], Iterable[Any]]) -> Dataset:
        """Replace each partition by ``fn(partition)`` (an iterable of items).

        The partition is an iterable: a ``range``/list/ndarray chunk when this
        is the first operation after the source, an iterator otherwise.
        """
        return self._narrow("map_partitions", fn)

    def reduce_by_key(
        self, op: Callable[[Any, Any], Any], partitions: int | None = None
    ) -> Dataset:
        """(key, value) items -> one (key, op-folded value) per key, hash-partitioned.

        ``op`` must be associative and commutative: values are combined map-side
        first. Keys must be hashable; see ``data.partition.stable_hash``.
        """
        _check_callable(op, "reduce_by_key op")
        parts = self._shuffle_partitions(partitions)
        return Dataset(self._task, (*self._ops, ShuffleOp("reduce", parts, op)))

    def group_by_key(self, partitions: int | None = None) -> Dataset:
        """(key, value) items -> (key, [values...]) per key; value order is unspecified."""
        return Dataset(
            self._task, (*self._ops, ShuffleOp("group", self._shuffle_partitions(partitions)))
        )

    def _shuffle_partitions(self, partitions: int | None) -> int:
        """Reducers of a shuffle: given, else as many as this dataset's partitions, at
        most ``SHUFFLE_PARTITIONS_MAX`` (each map task's report, one log command, names
        one bucket per reducer)."""
        if partitions is None:
            return max(1, min(self.num_partitions, SHUFFLE_PARTITIONS_MAX))
        parts = check_partitions(partitions)
        if parts > SHUFFLE_PARTITIONS_MAX:
            raise LimitExceeded(
                f"a shuffle has at most SHUFFLE_PARTITIONS_MAX={SHUFFLE_PARTITIONS_MAX} "
                f"partitions, got {parts}"
            )
        return parts

    # ------------------------------------------------------------- actions

    def submit(
        self,
        action: ActionKind = "collect",
        op: Callable[[Any, Any], Any] | None = None,
        **options: Any,
    ) -> Job:
        """Start a job and return at once (detached); ``job.result()`` waits for it.

        ``action`` is ``"collect"`` (default), ``"count"`` or ``"reduce"`` (with
        ``op``, None = sum). Options as for ``DistributedTask`` (``max_retries``,
        ``retry_exceptions``, ``speculation``, ``task_timeout_s``, ``shuffle_replicas``,
        ``progress``, plus ``name``).
        """
        if action not in ("collect", "count", "reduce"):
            raise ValueError(f"action must be collect, count or reduce, got {action!r}")
        if op is not None:
            if action != "reduce":
                raise ValueError("op is only used by the reduce action")
            _check_callable(op, "reduce op")
        return self._start(action, op, options)

    def collect(self, *, timeout: float | None = None, **options: Any) -> list[Any]:
        """All items, in partition order."""
        result: list[Any] = self._start("collect", None, options).result(timeout=timeout)
        return result

    def count(self, *, timeout: float | None = None, **options: Any) -> int:
        """The number of items."""
        result: int = self._start("count", None, options).result(timeout=timeout)
        return result

    def reduce(
        self,
        op: Callable[[Any, Any], Any] | None = None,
        *,
        timeout: float | None = None,
        **options: Any,
    ) -> Any:
        """Fold all items with ``op(a, b)`` (associative). ``op=None`` sums, 0 when empty.

        ValueError (raised by ``Job.result``) for an empty dataset with an explicit op.
        """
        if op is not None:
            _check_callable(op, "reduce op")
        return self._start("reduce", op, options).result(timeout=timeout)

    def write_text(self, url: str, *, timeout: float | None = None, **options: Any) -> list[str]:
        """Write the items as lines (``str(item)``), one file per partition; see ``write_jsonl``."""
        return self._write(url, "text", timeout, options)

    def write_jsonl(self, url: str, *, timeout: float | None = None, **options: Any) -> list[str]:
        """Write the items as JSON lines, one file per partition, exactly once.

        ``url``: ``lep://prefix`` (the cluster's storage) or any fsspec URL or
        path. Files are ``part-00000.jsonl``...; what an earlier write left there
        is replaced. With ``lep://`` the parts appear together, in one log command,
        when the job finishes; elsewhere a ``_SUCCESS`` file is written last.
        Returns the files' URLs, in partition order.
        """
        return self._write(url, "jsonl", timeout, options)

    def write_parquet(self, url: str, *, timeout: float | None = None, **options: Any) -> list[str]:
        """Write dict items as Parquet files (pyarrow), one per partition; see ``write_jsonl``."""
        return self._write(url, "parquet", timeout, options)

    def _write(
        self, url: str, fmt: OutputFormat, timeout: float | None, options: dict[str, Any]
    ) -> list[str]:
        output = WriteSpec(normalize_url(url), fmt)
        urls: list[str] = self._start("write", None, options, output).result(timeout=timeout)
        return urls

    def plan_bytes(
        self,
        action: ActionKind = "collect",
        op: Callable[..., Any] | None = None,
        output: WriteSpec | None = None,
    ) -> bytes:
        """The encoded ``JobPlan`` this dataset would submit (for tools and tests)."""
        return encode_plan(build_plan(self._ops, action, op, output))

    def _start(
        self,
        action: ActionKind,
        op: Callable[..., Any] | None,
        options: dict[str, Any],
        output: WriteSpec | None = None,
    ) -> Job:
        progress = options.pop("progress", self._task.progress)
        if progress is not None and not isinstance(progress, bool):
            raise TypeError("progress must be None, True or False")
        base = self._task.options
        known = {
            "max_retries",
            "retry_exceptions",
            "speculation",
            "task_timeout_s",
            "name",
            "shuffle_replicas",
        }
        unknown = set(options) - known
        if unknown:
            raise TypeError(f"unknown job option(s): {', '.join(sorted(unknown))}")
        merged = JobOptions(
            max_retries=options.get("max_retries", base.max_retries),
            retry_exceptions=bool(options.get("retry_exceptions", base.retry_exceptions)),
            speculation=bool(options.get("speculation", base.speculation)),
            name=str(options.get("name", base.name)),
            task_timeout_s=options.get("task_timeout_s", base.task_timeout_s),
            shuffle_replicas=options.get("shuffle_replicas", base.shuffle_replicas),
        )
        plan = self.plan_bytes(action, op, output)  # TypeError if a function cannot be pickled
        put = _blob_storer(self._task.cluster)
        if len(plan) > PLAN_BYTES_MAX and put is not None:
            # Functions capturing big objects: stored on the nodes, referenced here.
            plan = encode_plan(store_large_ops(decode_plan(plan), lambda b: _now(put(b))))
        if len(plan) > PLAN_BYTES_MAX:
            raise LimitExceeded(
                f"the job's plan is {len(plan)} bytes, over PLAN_BYTES_MAX={PLAN_BYTES_MAX}: "
                "its functions capture large objects; put them in cluster.storage and "
                "read them inside the function, or pass them as data (parallelize)"
            )
        job_id = self._task.cluster.submit_plan(plan, merged)
        from lepton_ai.compute.job import Job

        return Job(self._task.cluster, job_id, progress=progress)
