"""Logical plan -> stages: what a job is, as the scheduler and the executors see it.

A ``Dataset`` chain is a list of logical operations: one source, narrow ops
(``map``, ``filter``, ``flat_map``, ``map_partitions``) and shuffles
(``reduce_by_key``, ``group_by_key``), ended by an action. ``build_plan`` cuts
it into stages at each shuffle and fuses the narrow ops in between:

    source -> narrow* -> [shuffle write]  |  [shuffle read] -> narrow* -> [shuffle write] | ...
                                                                 ... -> narrow* -> [action]

Stage ``i+1`` reads the shuffle written by stage ``i`` (a linear chain). The
last stage's tasks are *result tasks*: each applies the action to its
partition (``collect``: the items; ``count``: a number; ``reduce``: a partial
reduce) and ``finalize`` merges those partials in the client.

Every function is cloudpickled once per stage (``StageSpec.ops``); the rest of
the plan is msgspec structs, so the coordinator decodes and schedules a plan
without ever unpickling user code.
"""

from __future__ import annotations

import functools
import math
import operator
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from lepton_ai.data.outputs import WriteSpec
from lepton_ai.data.partition import PARTITIONS_MAX
from lepton_ai.data.sources import Source
from lepton_ai.storage.messages import ObjectMeta

NarrowKind = Literal["map", "filter", "flat_map", "map_partitions"]
ShuffleMode = Literal["reduce", "group", "partial"]
ActionKind = Literal["collect", "count", "reduce", "write"]

PLAN_VERSION = 1
STAGES_MAX = 64  # shuffles per job + 1
# A plan is one log command (``JobSubmitted``), and the log's commands are bounded
# (consensus ``batch_bytes_max``, 1 MiB): the data a job carries goes to storage,
# so only the functions and small inputs count here. Checked before submitting.
PLAN_BYTES_MAX = 768 * 1024
SHUFFLE_REPLICAS_MAX = 3
# A map task's report (one log command) names one bucket per reducer (~45 bytes
# each), and the job's state holds maps x reducers of them: both stay bounded.
SHUFFLE_PARTITIONS_MAX = 10_000
SHUFFLE_BLOCKS_MAX = 10_000_000  # ~1 GB of refs in each coordinator at worst
OPS_INLINE_BYTES_MAX = 64 * 1024  # a stage's pickled functions kept in the plan, at most
REDUCE_FAN_IN = 16  # partials one task of a reduce's merge tree folds


class JobOptions(msgspec.Struct, frozen=True, kw_only=True):
    """Per-job settings that travel with the job through the log.

    ``max_retries``: infrastructure failures (executor or node death, lost or
    corrupt shuffle output) tolerated per task before the job fails.
    ``retry_exceptions``: also retry a task whose user code raised (else the job
    fails at once with ``lep.TaskError``). ``speculation``: run backup copies of
    stragglers. ``name``: shown in status and events. ``task_timeout_s``: an
    attempt running longer than this (seconds from its dispatch, or from when it
    began running if it waited in line behind another attempt; input fetches
    count) is killed with its executor and counts as an infrastructure failure,
    retried up to ``max_retries``; None: no limit. It catches hung tasks that
    speculation cannot (a single-task stage has no median to compare with).
    """

    max_retries: int = 3
    retry_exceptions: bool = False
    speculation: bool = True
    name: str = ""
    task_timeout_s: float | None = None
    # Copies of each map task's shuffle file (on distinct nodes): with 2 a node's
    # death loses no finished map output, only the attempts it was running. The
    # copy cost 2% on a 100 MB group_by_key and was lost in the noise of the word
    # count (README, docs/benchmarks-compute.md), so 2 is the default.
    shuffle_replicas: int = 2

    def __post_init__(self) -> None:
        r = self.shuffle_replicas
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= SHUFFLE_REPLICAS_MAX:
            raise ValueError(
                f"shuffle_replicas must be an int in 1..{SHUFFLE_REPLICAS_MAX}, got {r!r}"
            )
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int):
            raise TypeError("max_retries must be an int")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        t = self.task_timeout_s
        if t is not None:
            if isinstance(t, bool) or not isinstance(t, (int, float)):
                raise TypeError(f"task_timeout_s must be a number or None, got {type(t).__name__}")
            if not (0 < t < math.inf):
                raise ValueError(f"task_timeout_s must be > 0 and finite, got {t}")


class ShuffleWrite(msgspec.Struct, frozen=True):
    """The stage ends by hash-partitioning (key, value) pairs into ``num_buckets`` buckets.

    ``mode == "reduce"``: values of a key are combined map-side with the op in
    ``op`` (cloudpickled); ``"group"``: gathered into lists; ``"partial"``: the
    whole partition is folded with ``op`` into one partial (``reduce`` action).
    """

    num_buckets: int
    mode: ShuffleMode
    op: bytes | None = None


class ShuffleRead(msgspec.Struct, frozen=True):
    """The stage starts by merging bucket ``partition`` of every task of ``parent``."""

    parent: int
    num_maps: int
    mode: ShuffleMode
    op: bytes | None = None


class ResultSpec(msgspec.Struct, frozen=True):
    """The action folded into the last stage; ``op`` is the cloudpickled reduce op."""

    kind: ActionKind
    op: bytes | None = None
    write: WriteSpec | None = None  # kind "write": where each partition goes


class StageSpec(msgspec.Struct, frozen=True):
    """One stage: ``num_partitions`` tasks running the same fused pipeline.

    Exactly one of ``sources`` (one per partition) / ``shuffle_read`` is set, and
    exactly one of ``shuffle_write`` / ``result``. ``ops`` is a cloudpickled
    ``list[tuple[NarrowKind, Callable]]``; ``op_names`` is for display only.
    ``ops_ref``: the same pickle stored in the cluster's storage instead (``ops``
    is then empty): functions capturing large objects (a model, a lookup table)
    would otherwise make the plan, one log command, too big.
    """

    stage_id: int
    num_partitions: int
    ops: bytes
    op_names: list[str]
    sources: list[Source] | None = None
    shuffle_read: ShuffleRead | None = None
    shuffle_write: ShuffleWrite | None = None
    result: ResultSpec | None = None
    ops_ref: ObjectMeta | None = None

    @property
    def parent(self) -> int | None:
        return self.shuffle_read.parent if self.shuffle_read is not None else None

    @property
    def is_result(self) -> bool:
        return self.result is not None


class JobPlan(msgspec.Struct, frozen=True):
    """A job: stages in order; stage ``i > 0`` reads the shuffle of stage ``i - 1``."""

    stages: list[StageSpec]
    version: int = PLAN_VERSION

    @property
    def result_stage(self) -> StageSpec:
        return self.stages[-1]

    def describe(self) -> str:
        parts = []
        for s in self.stages:
            tail = f"shuffle->{s.shuffle_write.num_buckets}" if s.shuffle_write else "result"
            parts.append(f"stage {s.stage_id}[{s.num_partitions}]: {'|'.join(s.op_names)} {tail}")
        return "; ".join(parts)


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(JobPlan)


def encode_plan(plan: JobPlan) -> bytes:
    return _encoder.encode(plan)


def decode_plan(data: bytes) -> JobPlan:
    """Decode and validate a plan; ValueError on malformed input. Never unpickles."""
    try:
        plan = _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise ValueError(f"malformed job plan: {exc}") from exc
    validate_plan(plan)
    return plan


def store_large_ops(plan: JobPlan, put: Callable[[bytes], Any]) -> JobPlan:
    """The plan with every stage's functions over ``OPS_INLINE_BYTES_MAX`` stored by
    ``put(bytes) -> ObjectMeta`` and referenced (``StageSpec.ops_ref``)."""
    stages = [
        msgspec.structs.replace(s, ops=b"", ops_ref=put(s.ops))
        if len(s.ops) > OPS_INLINE_BYTES_MAX
        else s
        for s in plan.stages
    ]
    return msgspec.structs.replace(plan, stages=stages)


def validate_plan(plan: JobPlan) -> None:
    """Check the structural invariants the scheduler relies on; ValueError if broken."""
    if plan.version != PLAN_VERSION:
        raise ValueError(f"unsupported plan version {plan.version}")
    if not plan.stages:
        raise ValueError("a plan needs at least one stage")
    if len(plan.stages) > STAGES_MAX:
        raise ValueError(f"a plan has at most {STAGES_MAX} stages, got {len(plan.stages)}")
    for i, s in enumerate(plan.stages):
        if s.stage_id != i or not 0 < s.num_partitions <= PARTITIONS_MAX:
            raise ValueError(f"stage {i}: bad id {s.stage_id} or partitions {s.num_partitions}")
        last = i == len(plan.stages) - 1
        if (s.result is not None) != last or (s.shuffle_write is not None) == last:
            raise ValueError(f"stage {i}: only the last stage has a result")
        if s.result is not None and (s.result.kind == "write") != (s.result.write is not None):
            raise ValueError("a write action (and only it) names where to write")
        if i == 0:
            if s.sources is None or len(s.sources) != s.num_partitions:
                raise ValueError("stage 0 needs one source per partition")
            continue
        prev = plan.stages[i - 1]
        if s.num_partitions > SHUFFLE_PARTITIONS_MAX:
            raise ValueError(f"stage {i}: over SHUFFLE_PARTITIONS_MAX={SHUFFLE_PARTITIONS_MAX}")
        if s.num_partitions * prev.num_partitions > SHUFFLE_BLOCKS_MAX:
            raise ValueError(
                f"stage {i}: {prev.num_partitions} maps x {s.num_partitions} reducers is over "
                f"SHUFFLE_BLOCKS_MAX={SHUFFLE_BLOCKS_MAX}; use fewer partitions"
            )
        rd = s.shuffle_read
        if rd is None or rd.parent != i - 1 or rd.num_maps != prev.num_partitions:
            raise ValueError(f"stage {i}: must read the shuffle of stage {i - 1}")
        if prev.shuffle_write is None or prev.shuffle_write.num_buckets != s.num_partitions:
            raise ValueError(f"stage {i}: bucket count differs from its partitions")


# ------------------------------------------------------------ logical operations


@dataclass(frozen=True)
class SourceOp:
    sources: tuple[Source, ...]


@dataclass(frozen=True)
class NarrowOp:
    kind: NarrowKind
    fn: Callable[..., Any]


@dataclass(frozen=True)
class ShuffleOp:
    mode: ShuffleMode
    partitions: int
    op: Callable[[Any, Any], Any] | None = None


LogicalOp = SourceOp | NarrowOp | ShuffleOp


def dumps_function(obj: Any, what: str) -> bytes:
    """cloudpickle ``obj``; an unpicklable function raises TypeError naming ``what``."""
    from lepton_ai.compute import pickling

    try:
        data: bytes = pickling.dumps(obj)
    except Exception as exc:
        raise TypeError(f"{what} cannot be pickled to ship to workers: {exc}") from exc
    return data


def _fn_name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def build_plan(
    ops: Sequence[LogicalOp],
    action: ActionKind,
    op: Callable[[Any, Any], Any] | None = None,
    output: WriteSpec | None = None,
) -> JobPlan:
    """Cut a logical chain into stages. TypeError if a function cannot be pickled."""
    if not ops or not isinstance(ops[0], SourceOp):
        raise ValueError("a dataset chain starts with a source")
    groups: list[tuple[list[NarrowOp], ShuffleOp | None]] = [([], None)]
    for lop in ops[1:]:
        if isinstance(lop, NarrowOp):
            groups[-1][0].append(lop)
        elif isinstance(lop, ShuffleOp):
            groups[-1] = (groups[-1][0], lop)
            groups.append(([], None))
        else:
            raise ValueError("a source can only start a chain")
    sources = list(ops[0].sources)
    stages: list[StageSpec] = []
    prev_shuffle: tuple[ShuffleOp, bytes | None] | None = None
    for i, (narrow, shuffle) in enumerate(groups):
        names = [f"{n.kind}({_fn_name(n.fn)})" for n in narrow]
        blob = dumps_function([(n.kind, n.fn) for n in narrow], f"stage {i} ({', '.join(names)})")
        read = None
        if prev_shuffle is not None:
            pop, pblob = prev_shuffle
            read = ShuffleRead(i - 1, stages[-1].num_partitions, pop.mode, pblob)
        n_parts = len(sources) if i == 0 else stages[-1].shuffle_write.num_buckets  # type: ignore[union-attr]
        write = result = None
        if shuffle is not None:
            sop = None if shuffle.op is None else dumps_function(shuffle.op, "reduce_by_key op")
            write = ShuffleWrite(shuffle.partitions, shuffle.mode, sop)
            prev_shuffle = (shuffle, sop)
        else:
            rop = None if op is None else dumps_function(op, f"{action} op")
            result = ResultSpec(action, rop, output)
        stages.append(
            StageSpec(
                stage_id=i,
                num_partitions=n_parts,
                ops=blob,
                op_names=names,
                sources=sources if i == 0 else None,
                shuffle_read=read,
                shuffle_write=write,
                result=result,
            )
        )
    if action == "reduce" and stages[-1].num_partitions > 1:
        stages = _final_merge_stage(stages)
    plan = JobPlan(stages)
    validate_plan(plan)
    return plan


def _final_merge_stage(stages: list[StageSpec]) -> list[StageSpec]:
    """``reduce``: partials go through one-bucket shuffles to a single merging task.

    Each task of the last stage folds its partition into one partial and writes
    it as a ``"partial"`` bucket; one final task folds the partials in partition
    order. Only the final value then travels in the log (``TaskFinished``) instead
    of one partial per partition - with partials like word-count Counters, that is
    the difference between one and N large log entries.

    With more than ``REDUCE_FAN_IN`` partitions the partials are merged as a tree:
    an intermediate stage of ``ceil(n / REDUCE_FAN_IN)`` tasks, each folding a
    contiguous run of partitions (so the order, and a non-commutative op, is kept),
    spreads the merge over the executors instead of one task doing it all.
    """
    last = stages[-1]
    spec = last.result
    if spec is None:
        raise AssertionError("the last stage carries the action")
    out = list(stages[:-1])
    producer = last
    while True:
        n = producer.num_partitions
        groups = 1 if n <= REDUCE_FAN_IN else -(-n // REDUCE_FAN_IN)
        out.append(
            msgspec.structs.replace(
                producer, shuffle_write=ShuffleWrite(groups, "partial", spec.op), result=None
            )
        )
        merge = StageSpec(
            stage_id=producer.stage_id + 1,
            num_partitions=groups,
            ops=dumps_function([], "partial merge"),
            op_names=[],
            shuffle_read=ShuffleRead(producer.stage_id, n, "partial", spec.op),
        )
        if groups == 1:
            out.append(msgspec.structs.replace(merge, result=spec))
            return out
        producer = merge


def partial_bucket(partition: int, num_partitions: int, num_buckets: int) -> int:
    """The merge task (bucket) that folds ``partition``'s partial: contiguous runs."""
    return partition * num_buckets // num_partitions


# ------------------------------------------------------------ result merging


def finalize(plan: JobPlan, parts: Sequence[bytes]) -> Any:
    """Merge the result tasks' outputs (in partition order) into the action's value.

    ``collect``: the list of all items in partition order. ``count``: an int.
    ``reduce``: the op folded over the partitions' partials, left to right;
    ValueError if the dataset was empty (like ``functools.reduce``), except that
    the default op (``None`` = sum) returns 0 for an empty dataset.
    """
    spec = plan.result_stage.result
    if spec is None or len(parts) != plan.result_stage.num_partitions:
        raise ValueError(f"expected {plan.result_stage.num_partitions} result parts")
    values = [pickle.loads(p) for p in parts]
    if spec.kind == "collect":
        out: list[Any] = []
        for v in values:
            out.extend(v)
        return out
    if spec.kind == "count":
        return sum(values)
    fn = operator.add if spec.op is None else pickle.loads(spec.op)
    # A reduce partial is () for an empty partition, else (value,): None is a valid value.
    partials = [v[0] for v in values if len(v) == 1]
    if not partials:
        if spec.op is None:
            return 0
        raise ValueError("reduce() of an empty dataset")
    return functools.reduce(fn, partials)
