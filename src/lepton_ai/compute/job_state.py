"""The jobs' durable state: a deterministic state machine fed by log commands.

Only facts that must survive a coordinator failover live here: a job and its
plan, the first accepted output of each task, the loss of an output, and the
job's outcome. Which executor runs what is soft state in the scheduler.

Rules that make output exactly-once:

* ``TaskFinished`` is accepted only if the task has no recorded outcome; the
  first one in log order wins, every later one (a retry, a speculative copy, a
  result reported to an old leader) is rejected and changes nothing.
* ``OutputLost`` names the attempt whose output is gone; it clears the outcome
  only if that attempt is still the recorded one, so a stale loss report cannot
  erase a newer result.

The machine is pure: time comes inside commands (``*_at`` fields set by the
proposer), so every replica computes the same state. Use it directly as the
``StateMachine`` of a ``LogHost`` (``apply(bytes) -> bytes``), or embed it in a
larger machine with ``apply_command`` and ``encode_command``/``decode_command``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from lepton_ai.compute.plan import JobOptions, decode_plan, finalize
from lepton_ai.data.outputs import LEP, WriteSpec, WrittenPart, commit_parts, part_name
from lepton_ai.errors import InvariantError, JobCancelled, JobFailed, TaskError
from lepton_ai.storage.messages import ObjectMeta

JobStatus = Literal["running", "finished", "failed"]
ErrorKind = Literal["user", "infra", "lost", "invalid", "cancelled"]


class OutputRef(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True):
    """Where one output of a task lives.

    A map task reports one ref per shuffle bucket (index = reducer partition):
    ``block`` in the block store of ``worker``, ``size_bytes`` long (0 = empty
    bucket, nothing to fetch). A result task reports exactly one ref: a small
    result inline in ``data`` (it lives in the log), a bigger one as ``obj``, a
    stored object replicated on the nodes (the data plane; only its reference is
    in the log), so no command's size depends on the user's data.
    """

    worker: str
    block: str
    size_bytes: int
    data: bytes | None = None
    obj: ObjectMeta | None = None
    # Other workers holding a copy of a map task's shuffle file (``shuffle_replicas``):
    # the output survives the loss of ``worker`` while one of them lives.
    replicas: list[str] = []


class ErrorInfo(msgspec.Struct, frozen=True):
    """Why a job failed; ``kind == "user"`` means user code raised (``TaskError``)."""

    kind: ErrorKind
    message: str
    stage: int = -1
    partition: int = -1
    exc_type: str = ""
    traceback: str = ""

    def to_exception(self) -> JobFailed:
        if self.kind == "cancelled":
            return JobCancelled(self.message)
        if self.kind == "user":
            msg = f"{self.exc_type}: {self.message}" if self.exc_type else self.message
            return TaskError(
                msg, stage=self.stage, partition=self.partition, traceback=self.traceback
            )
        where = f" (stage {self.stage}, partition {self.partition})" if self.stage >= 0 else ""
        return JobFailed(f"{self.message}{where}")


class TaskOutcome(msgspec.Struct, frozen=True):
    """The accepted result of one task: which attempt produced it, and where its outputs are."""

    epoch: int
    attempt: int
    worker: str
    outputs: list[OutputRef]
    duration_s: float = 0.0


# ------------------------------------------------------------------ commands


class JobSubmitted(msgspec.Struct, frozen=True, tag=True):
    job_id: str
    plan: bytes
    options: JobOptions
    submitted_at: float = 0.0


class TaskFinished(msgspec.Struct, frozen=True, tag=True):
    job_id: str
    stage: int
    partition: int
    epoch: int
    attempt: int
    worker: str
    outputs: list[OutputRef]
    duration_s: float = 0.0


class OutputLost(msgspec.Struct, frozen=True, tag=True):
    """The outputs of this (task, attempt) can no longer be fetched; run the task again."""

    job_id: str
    stage: int
    partition: int
    epoch: int
    attempt: int


class JobFinished(msgspec.Struct, frozen=True, tag=True):
    job_id: str
    finished_at: float = 0.0


class JobFailedCmd(msgspec.Struct, frozen=True, tag="JobFailed"):
    job_id: str
    error: ErrorInfo
    finished_at: float = 0.0


class JobDeleted(msgspec.Struct, frozen=True, tag=True):
    job_id: str


JobCommand = JobSubmitted | TaskFinished | OutputLost | JobFinished | JobFailedCmd | JobDeleted


class ApplyResult(msgspec.Struct, frozen=True):
    """What ``apply`` returns to the proposer: accepted, or why not (nothing changed)."""

    accepted: bool
    reason: str = ""


_cmd_encoder = msgspec.msgpack.Encoder()
_cmd_decoder = msgspec.msgpack.Decoder(JobCommand)
_result_decoder = msgspec.msgpack.Decoder(ApplyResult)


def encode_command(cmd: JobCommand) -> bytes:
    return _cmd_encoder.encode(cmd)


def decode_command(data: bytes) -> JobCommand:
    """ValueError on bytes that are not a job command."""
    try:
        cmd: JobCommand = _cmd_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise ValueError(f"malformed job command: {exc}") from exc
    return cmd


def encode_apply_result(result: ApplyResult) -> bytes:
    return _cmd_encoder.encode(result)


def decode_apply_result(data: bytes) -> ApplyResult:
    return _result_decoder.decode(data)


# ------------------------------------------------------------------ state


class JobRecord(msgspec.Struct):
    """One job. ``outcomes[stage][partition]`` is the accepted TaskOutcome or None."""

    job_id: str
    seq: int
    plan: bytes
    options: JobOptions
    status: JobStatus
    outcomes: list[list[TaskOutcome | None]]
    submitted_at: float = 0.0
    finished_at: float = 0.0
    error: ErrorInfo | None = None
    results_accepted: int = 0  # TaskFinished accepted (audit: exactly once per output)
    results_rejected: int = 0

    def stage_done(self, stage: int) -> bool:
        return all(o is not None for o in self.outcomes[stage])

    def progress(self) -> tuple[int, int]:
        """(tasks with an accepted result, total tasks) over all stages. A finished job
        counts every task done: its earlier stages' outcomes are dropped once the last
        stage no longer needs them."""
        total = sum(len(stage) for stage in self.outcomes)
        if self.status == "finished":
            return total, total
        done = sum(o is not None for stage in self.outcomes for o in stage)
        return done, total

    def result_refs(self) -> list[OutputRef]:
        """The result tasks' outputs in partition order (job must be finished)."""
        if self.status != "finished":
            raise ValueError(f"job {self.job_id} is {self.status}, not finished")
        refs: list[OutputRef] = []
        for o in self.outcomes[-1]:
            if o is None or (o.outputs[0].data is None and o.outputs[0].obj is None):
                raise InvariantError(f"finished job {self.job_id} lacks a result part")
            refs.append(o.outputs[0])
        return refs

    def result(self, fetch: Callable[[ObjectMeta], bytes] | None = None) -> Any:
        """The job's value (``plan.finalize``), or raise its TaskError/JobFailed.

        Runs the action's merge (for ``reduce``, the user's op) in the caller;
        ``fetch`` reads the parts that are stored objects (from the data plane).
        """
        if self.status == "failed":
            raise (self.error or ErrorInfo("lost", "job failed")).to_exception()
        plan = decode_plan(self.plan)
        spec = plan.result_stage.result
        if spec is not None and spec.write is not None:
            return written_urls(spec.write, self.result_refs())
        parts: list[bytes] = []
        for ref in self.result_refs():
            if ref.data is not None:
                parts.append(ref.data)
            elif fetch is None or ref.obj is None:
                raise ValueError(f"job {self.job_id}: a result part is stored; pass fetch")
            else:
                parts.append(fetch(ref.obj))
        return finalize(plan, parts)


def written_urls(spec: WriteSpec, refs: list[OutputRef]) -> list[str]:
    """A finished write job's output files, in partition order (committing a
    non-``lep://`` output here: see ``data.outputs``)."""
    if spec.url.startswith(LEP):
        return [f"{spec.url}/{part_name(p, spec.fmt)}" for p in range(len(refs))]
    parts = [msgspec.msgpack.decode(r.data or b"", type=WrittenPart) for r in refs]
    return commit_parts(spec, [p.temp for p in parts])


class JobState(msgspec.Struct):
    jobs: dict[str, JobRecord] = {}
    next_seq: int = 0


@dataclass(frozen=True)
class JobStateConfig:
    """Must be identical on every replica (it changes what ``apply`` does)."""

    finished_jobs_max: int = 256  # finished/failed jobs kept for result retrieval
    jobs_max: int = 10_000  # all jobs, running included; JobSubmitted past it is rejected


_state_encoder = msgspec.msgpack.Encoder()
_state_decoder = msgspec.msgpack.Decoder(JobState)

_OK = ApplyResult(True)


class JobStateMachine:
    """The deterministic job state machine (``consensus.log_host.StateMachine``)."""

    def __init__(self, config: JobStateConfig | None = None) -> None:
        self.config = config or JobStateConfig()
        self.state = JobState()

    # StateMachine protocol --------------------------------------------------

    def apply(self, command: bytes) -> bytes:
        try:
            cmd = decode_command(command)
        except ValueError as exc:
            return _cmd_encoder.encode(ApplyResult(False, str(exc)))
        return _cmd_encoder.encode(self.apply_command(cmd))

    def snapshot(self) -> bytes:
        return _state_encoder.encode(self.state)

    def restore(self, data: bytes) -> None:
        self.state = _state_decoder.decode(data)

    # typed interface ----------------------------------------------------------

    def job(self, job_id: str) -> JobRecord | None:
        return self.state.jobs.get(job_id)

    def apply_command(self, cmd: JobCommand) -> ApplyResult:
        """Apply one command; a rejected command changes nothing and says why."""
        if isinstance(cmd, JobSubmitted):
            return self._submitted(cmd)
        if isinstance(cmd, JobDeleted):
            if self.state.jobs.pop(cmd.job_id, None) is None:
                return ApplyResult(False, "unknown job")
            return _OK
        job = self.state.jobs.get(cmd.job_id)
        if job is None:
            return ApplyResult(False, "unknown job")
        if job.status != "running":
            if isinstance(cmd, TaskFinished):
                job.results_rejected += 1
            return ApplyResult(False, f"job is {job.status}")
        if isinstance(cmd, TaskFinished):
            return self._task_finished(job, cmd)
        if isinstance(cmd, OutputLost):
            return self._output_lost(job, cmd)
        if isinstance(cmd, JobFinished):
            # Only the results matter: map outputs may have been lost after their use.
            if not job.stage_done(len(job.outcomes) - 1):
                return ApplyResult(False, "job has unfinished result tasks")
            self._close(job, "finished", cmd.finished_at, None)
            return _OK
        self._close(job, "failed", cmd.finished_at, cmd.error)
        return _OK

    def _submitted(self, cmd: JobSubmitted) -> ApplyResult:
        if cmd.job_id in self.state.jobs:
            return ApplyResult(False, "duplicate job id")  # idempotent re-submit
        if len(self.state.jobs) >= self.config.jobs_max:
            return ApplyResult(False, f"too many jobs (jobs_max={self.config.jobs_max})")
        try:
            plan = decode_plan(cmd.plan)
        except ValueError as exc:
            return ApplyResult(False, str(exc))
        outcomes: list[list[TaskOutcome | None]] = [[None] * s.num_partitions for s in plan.stages]
        self.state.jobs[cmd.job_id] = JobRecord(
            job_id=cmd.job_id,
            seq=self.state.next_seq,
            plan=cmd.plan,
            options=cmd.options,
            status="running",
            outcomes=outcomes,
            submitted_at=cmd.submitted_at,
        )
        self.state.next_seq += 1
        return _OK

    def _task_finished(self, job: JobRecord, cmd: TaskFinished) -> ApplyResult:
        if not (0 <= cmd.stage < len(job.outcomes)) or not (
            0 <= cmd.partition < len(job.outcomes[cmd.stage])
        ):
            return ApplyResult(False, "no such task")
        last = cmd.stage == len(job.outcomes) - 1
        if last:
            if len(cmd.outputs) != 1 or (cmd.outputs[0].data is None) == (
                cmd.outputs[0].obj is None
            ):
                return ApplyResult(False, "a result task reports one inline or stored output")
        elif cmd.stage + 1 < len(job.outcomes) and len(cmd.outputs) != len(
            job.outcomes[cmd.stage + 1]
        ):
            return ApplyResult(False, "a map task reports one output per bucket")
        if job.outcomes[cmd.stage][cmd.partition] is not None:
            job.results_rejected += 1
            return ApplyResult(False, "task already finished")  # first result wins
        job.outcomes[cmd.stage][cmd.partition] = TaskOutcome(
            cmd.epoch, cmd.attempt, cmd.worker, cmd.outputs, cmd.duration_s
        )
        job.results_accepted += 1
        return _OK

    def _output_lost(self, job: JobRecord, cmd: OutputLost) -> ApplyResult:
        if not (0 <= cmd.stage < len(job.outcomes) - 1) or not (
            0 <= cmd.partition < len(job.outcomes[cmd.stage])
        ):
            return ApplyResult(False, "no such map task")
        cur = job.outcomes[cmd.stage][cmd.partition]
        if cur is None or (cur.epoch, cur.attempt) != (cmd.epoch, cmd.attempt):
            return ApplyResult(False, "stale loss report")
        job.outcomes[cmd.stage][cmd.partition] = None
        return _OK

    def _close(self, job: JobRecord, status: JobStatus, at: float, error: ErrorInfo | None) -> None:
        job.status = status
        job.finished_at = at
        job.error = error
        # Shuffle outputs are garbage once the job is closed (the block stores may drop
        # them); a finished job keeps its result parts, a failed one keeps nothing.
        keep = 1 if status == "finished" else 0
        for i in range(len(job.outcomes) - keep):
            job.outcomes[i] = [None] * len(job.outcomes[i])
        self._evict()

    def _evict(self) -> None:
        done = [j for j in self.state.jobs.values() if j.status != "running"]
        excess = len(done) - self.config.finished_jobs_max
        if excess > 0:
            done.sort(key=lambda j: j.seq)
            for j in done[:excess]:
                del self.state.jobs[j.job_id]
