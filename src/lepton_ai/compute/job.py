"""The client-side handle of a submitted job.

    job = ds.submit()                    # returns at once; the job lives in the log
    job.id, job.status(), job.progress()
    job.result(timeout=60)               # waits; raises lep.TaskError / lep.JobFailed
    lep.Job(cluster, job.id).result()    # from any process that can reach the cluster

``result`` long-polls the coordinator and shows a rich progress bar on stderr
when the job runs longer than a second and stderr is a terminal (``progress=True``
forces it, ``progress=False`` turns it off).
"""

from __future__ import annotations

import sys
import time
from typing import Any, Protocol, runtime_checkable

import msgspec

from lepton_ai.compute.job_state import JobRecord
from lepton_ai.errors import Unavailable

PROGRESS_AFTER_S = 1.0
POLL_S = 0.5  # long-poll slice while a progress bar shows (its refresh rate)
POLL_QUIET_S = 10.0  # long-poll slice otherwise
UNAVAILABLE_GRACE_S = 15.0  # how long a result() keeps retrying an unreachable coordinator


@runtime_checkable
class JobSource(Protocol):
    """What a cluster handle offers a Job (``node.cluster_handle.Cluster`` implements it)."""

    def job_info(self, job_id: str, wait_s: float = 0.0) -> Any: ...

    def events(self, job_id: str | None = None) -> list[dict[str, Any]]: ...


_record_decoder = msgspec.msgpack.Decoder(JobRecord)


class Job:
    def __init__(self, cluster: Any, job_id: str, *, progress: bool | None = None) -> None:
        if not isinstance(cluster, JobSource):
            raise TypeError(f"Job needs a cluster handle, got {type(cluster).__name__}")
        if not isinstance(job_id, str) or not job_id:
            raise ValueError(f"job id must be a non-empty string, got {job_id!r}")
        if progress is not None and not isinstance(progress, bool):
            raise TypeError("progress must be None, True or False")
        self.cluster = cluster
        self.id = job_id
        self.progress_mode = progress
        self._record: JobRecord | None = None

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def status(self) -> str:
        """ "running", "finished" or "failed"; KeyError if the cluster does not know the job."""
        info = self.cluster.job_info(self.id, 0.0)
        return str(info.status)

    def progress(self) -> tuple[int, int]:
        """(tasks done, total tasks)."""
        info = self.cluster.job_info(self.id, 0.0)
        return int(info.done), int(info.total)

    def cancel(self) -> None:
        """Stop the job: its running attempts are killed, its executors freed, and
        ``result()`` raises ``lep.JobCancelled``. ValueError if it already ended."""
        cancel = getattr(self.cluster, "cancel_job", None)
        if cancel is None:
            raise TypeError(f"{type(self.cluster).__name__} cannot cancel jobs")
        cancel(self.id)

    def events(self) -> list[dict[str, Any]]:
        """This job's timeline: submission, faults, detection, retries, completion."""
        return self.cluster.events(self.id)

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the job and return its value; TimeoutError after ``timeout`` seconds."""
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout must be >= 0, got {timeout}")
        if self._record is None:
            self._record = self._wait(timeout)
        # Big result parts are stored objects on the nodes: streamed from a live
        # replica by the cluster handle (``Cluster.fetch_object``).
        fetch = getattr(self.cluster, "fetch_object", None)
        return self._record.result(fetch if callable(fetch) else None)

    def report(self, calibration: Any = None) -> Any:
        """The cost model's terms for this finished job, predicted and measured: a
        ``lep.cost.JobReport`` (print it for a table). ``calibration``: a
        ``lep.cost.Calibration``; default, the last ``lepton estimate job``'s on this
        cluster. ValueError unless the job finished. See docs/cost-model.md."""
        from lepton_ai.monitor.estimate_report import job_report

        return job_report(self.cluster, self.id, calibration)

    def _show_bar(self) -> bool:
        if self.progress_mode is not None:
            return self.progress_mode
        return sys.stderr.isatty()

    def _wait(self, timeout: float | None) -> JobRecord:
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        bar: Any = None
        lost_at: float | None = None
        try:
            while True:
                show = self._show_bar() and time.monotonic() - start >= PROGRESS_AFTER_S
                step = POLL_S if self._show_bar() else POLL_QUIET_S
                if not show and self._show_bar():
                    step = max(0.0, PROGRESS_AFTER_S - (time.monotonic() - start))
                if deadline is not None:
                    step = min(step, max(0.0, deadline - time.monotonic()))
                try:
                    info = self.cluster.job_info(self.id, step)
                except Unavailable:
                    # A coordinator restarting or failing over: the job lives in the
                    # log, so keep asking until our deadline (or a grace period).
                    lost_at = lost_at or time.monotonic()
                    if time.monotonic() - lost_at > UNAVAILABLE_GRACE_S:
                        raise
                    time.sleep(0.1)
                    continue
                lost_at = None
                if info.record is not None:
                    record: JobRecord = _record_decoder.decode(info.record)
                    return record
                if show:
                    bar = bar or _Bar(self.id)
                    bar.update(info.done, info.total)
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"job {self.id} still running after {timeout} s "
                        f"({info.done}/{info.total} tasks)"
                    )
        finally:
            if bar is not None:
                bar.close()


class _Bar:
    def __init__(self, job_id: str) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        self.progress = Progress(
            f"job {job_id}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self.task = self.progress.add_task("tasks", total=None)
        self.progress.start()

    def update(self, done: int, total: int) -> None:
        self.progress.update(self.task, completed=done, total=total)

    def close(self) -> None:
        self.progress.stop()
