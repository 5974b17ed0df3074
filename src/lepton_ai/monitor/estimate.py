"""Calibrating the job cost model on a running cluster (``lepton estimate job``).

The job's own dataset is run on samples of its own input: every input
partition cut to the same fraction (so the sample jobs have the job's shape:
as many map tasks, the same shuffle, the same reduce), at no input, at half the
sample and at the whole sample, each ``runs`` times. ``cost.calibrate_job``
fits a line through the times: its slope is the time per item, its intercept
``r``. Read-only jobs (the sampled source, no function applied) give the
transfer's share of the slope. See docs/cost-model.md.
"""

from __future__ import annotations

import math
import pickle
import runpy
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lepton_ai.compute.api import Dataset, DistributedTask
from lepton_ai.compute.plan import ActionKind, SourceOp
from lepton_ai.data.sources import (
    InlineSource,
    RangeSource,
    Source,
    SourceLimits,
    TextSource,
    read_text_source,
)
from lepton_ai.monitor.cost import Calibration, SampleRuns, calibrate_job

SAMPLE_BYTES_MAX_DEFAULT = 16 * 1024 * 1024  # a text input's largest sample
SAMPLE_ITEMS_MAX_DEFAULT = 200_000  # an item input's largest sample
SAMPLE_FRACTION_MAX = 0.5  # never sample more than this share of the job's input
# Sample sizes as fractions of the largest. Not 0: a job without input skips its
# tasks, so its time is not the line's intercept. The larger the points, the
# closer the sample's distinct keys per partition to the job's.
SAMPLE_POINTS = (0.5, 1.0)
SAMPLE_RUNS_DEFAULT = 3  # runs per sample size (the median: one disturbed run is dropped)
SAMPLE_RUNS_MAX = 10
PROBE_BYTES = 1 << 20  # bytes of each probed text split read to count lines per byte
PROBE_SOURCES_MAX = 8  # text splits probed
JOB_TIMEOUT_S = 600.0  # one sample job


def load_dataset(target: str, task: DistributedTask) -> Dataset:
    """The Dataset ``FUNC(task)`` of a job file ``FILE[:FUNC]`` builds, as ``lepton submit``
    reads it (FUNC defaults to ``main``)."""
    path, _, func_name = target.partition(":")
    namespace = runpy.run_path(path, run_name="lepton_submit")
    func = namespace.get(func_name or "main")
    if not callable(func):
        raise ValueError(f"{path} has no function {func_name or 'main'}(task)")
    out = func(task)
    if not isinstance(out, Dataset):
        raise TypeError(
            f"{func_name or 'main'}(task) must return a Dataset to be estimated "
            f"(a Job has already started), got {type(out).__name__}"
        )
    return out


# ---------------------------------------------------------------- sizing the input


def _text_sources(sources: Sequence[Source]) -> list[TextSource]:
    return [s for s in sources if isinstance(s, TextSource)]


def items_per_byte(sources: Sequence[Source], limits: SourceLimits) -> float:
    """Lines (records) per byte of the text splits, from the first ``PROBE_BYTES`` of
    up to ``PROBE_SOURCES_MAX`` of them read here; 0.0 when there are none."""
    probed = _text_sources(sources)[:PROBE_SOURCES_MAX]
    items = size = 0
    for s in probed:
        if s.compression is not None:
            raise ValueError(f"{s.url}: a compressed input cannot be sampled; decompress it")
        end = min(s.end, s.start + PROBE_BYTES)
        items += len(read_text_source(TextSource(s.url, s.start, end, s.fmt, s.csv_header), limits))
        size += end - s.start
    return items / size if size else 0.0


def source_items(source: Source, per_byte: float) -> float:
    """Items of one input partition (a text split's: its size times ``per_byte``)."""
    if isinstance(source, RangeSource):
        return float(len(range(source.start, source.stop, source.step)))
    if isinstance(source, TextSource):
        return (source.end - source.start) * per_byte
    if isinstance(source, InlineSource):
        return float(source.count)
    count = getattr(source, "count", None)
    if count is None:
        raise ValueError(f"cannot count the items of a {type(source).__name__} input")
    return float(count)


def cut_source(source: Source, fraction: float) -> Source:
    """The first ``fraction`` of one input partition. A stored partition (known only
    by reference) cannot be cut here: ValueError."""
    if isinstance(source, RangeSource):
        r = range(source.start, source.stop, source.step)
        sub = r[: math.ceil(len(r) * fraction)]
        return RangeSource(sub.start, sub.stop, sub.step)
    if isinstance(source, TextSource):
        end = source.start + math.ceil((source.end - source.start) * fraction)
        return TextSource(source.url, source.start, end, source.fmt, source.csv_header)
    if isinstance(source, InlineSource):
        items = pickle.loads(source.data)
        keep = math.ceil(source.count * fraction)
        return InlineSource(pickle.dumps(items[:keep], protocol=5), keep)
    raise ValueError(
        f"a {type(source).__name__} input cannot be sampled; use read_text, a range "
        "or a small parallelize() for an estimate"
    )


# ---------------------------------------------------------------- sample jobs


def _ops(ds: Dataset) -> tuple[Any, ...]:
    # The logical chain is the Dataset's own (it has no public accessor); the
    # sample jobs are this chain with its source cut.
    ops: tuple[Any, ...] = ds._ops
    return ops


def _sources(ds: Dataset) -> tuple[Source, ...]:
    head = _ops(ds)[0]
    if not isinstance(head, SourceOp):
        raise ValueError("the dataset's chain does not start with a source")
    return head.sources


def sampled(ds: Dataset, partitions: int, fraction: float, *, read_only: bool = False) -> Dataset:
    """``ds`` on its first ``partitions`` input partitions, each cut to ``fraction``;
    ``read_only``: that source alone, no function applied."""
    cut = SourceOp(tuple(cut_source(s, fraction) for s in _sources(ds)[:partitions]))
    rest = () if read_only else _ops(ds)[1:]
    return Dataset(ds._task, (cut, *rest))


def timed_run(ds: Dataset, action: ActionKind = "collect") -> float:
    """Seconds from submitting ``ds`` until its result is back here."""
    started = time.perf_counter()
    ds.submit(action, progress=False).result(timeout=JOB_TIMEOUT_S)
    return time.perf_counter() - started


@dataclass(frozen=True)
class JobEstimate:
    """What ``lepton estimate job`` found: the job's input size and the calibration."""

    N: float
    partitions: int
    sample_fraction: float
    calibration: Calibration
    samples: SampleRuns


def calibrate(
    ds: Dataset,
    nodes: int,
    *,
    runs: int = SAMPLE_RUNS_DEFAULT,
    sample_bytes_max: int = SAMPLE_BYTES_MAX_DEFAULT,
    sample_items_max: int = SAMPLE_ITEMS_MAX_DEFAULT,
) -> JobEstimate:
    """Run the sample jobs of ``ds`` on its cluster (``nodes`` worker nodes) and fit."""
    if not 1 <= runs <= SAMPLE_RUNS_MAX:
        raise ValueError(f"runs must be in 1..{SAMPLE_RUNS_MAX}, got {runs}")
    sources = _sources(ds)
    per_byte = items_per_byte(sources, ds._task.limits)
    n_items = sum(source_items(s, per_byte) for s in sources)
    if n_items <= 0:
        raise ValueError("the job has no input items to sample")
    text_bytes = sum(s.end - s.start for s in _text_sources(sources))
    size, size_max = (text_bytes, sample_bytes_max) if text_bytes else (n_items, sample_items_max)
    # Every partition cut alike: the sample jobs then spread over the nodes as the
    # job does (a job of fewer tasks than nodes can have them queued on one node).
    fraction = min(SAMPLE_FRACTION_MAX, size_max / size)
    shapes = [(len(sources), fraction * point) for point in SAMPLE_POINTS]
    timed_run(sampled(ds, *shapes[0]))  # warm-up: executors load the job's functions once
    xs: list[float] = []
    job_s: list[float] = []
    read_s: list[float] = []
    for parts, frac in shapes:
        sample = sampled(ds, parts, frac)
        xs.append(sum(source_items(s, per_byte) for s in _sources(sample)))
        job_s.append(statistics.median(timed_run(sample) for _ in range(runs)))
        reader = sampled(ds, parts, frac, read_only=True)
        read_s.append(statistics.median(timed_run(reader, "count") for _ in range(runs)))
    samples = SampleRuns(xs, job_s, xs, read_s, nodes)
    share = xs[-1] / n_items
    return JobEstimate(n_items, len(sources), share, calibrate_job(samples, per_byte), samples)


# ---------------------------------------------------------------- consensus

CONSENSUS_WRITES_DEFAULT = 20  # timed KV writes (and reads)
CONSENSUS_WRITES_MAX = 1000
APPLY_WAIT_S = 5.0  # how long a write may take to reach every replica
ELECTION_WAIT_S = 30.0  # how long --measure-election waits for a new leader
_PROBE_KEY = "_lepton/estimate/probe"


@dataclass(frozen=True)
class ConsensusEstimate:
    """Measured ``p``, ``d``, ``u``, ``e`` (None: not measured) and how."""

    m: int
    p: float
    d: float
    u: float
    e: float | None
    how: dict[str, str]


def _timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def _apply_lag(kv: Any, addresses: list[str]) -> float:
    """Seconds from a committed write until every replica reports it applied."""
    kv.put(_PROBE_KEY, time.time())
    done = time.perf_counter()
    target = max(kv.status(a).commit_index for a in addresses)
    deadline = done + APPLY_WAIT_S
    pending = list(addresses)
    while pending and time.perf_counter() < deadline:
        pending = [a for a in pending if kv.status(a).applied_index < target]
    if pending:
        raise TimeoutError(f"replicas {pending} did not apply a write within {APPLY_WAIT_S} s")
    return time.perf_counter() - done


def elections_from_timeline(events: list[dict[str, Any]]) -> list[float]:
    """Seconds from each injected coordinator fault to the next ``leader_elected``."""
    out: list[float] = []
    fault: float | None = None
    for e in events:
        detail = str(e.get("detail", ""))
        if e["kind"] == "fault_injected" and ("leader" in detail or "coordinator" in detail):
            fault = float(e["t"])
        elif e["kind"] == "leader_elected" and fault is not None:
            out.append(float(e["t"]) - fault)
            fault = None
    return out


def measure_election(cluster: Any) -> float:
    """Kill the leader (``cluster.kill("leader")``) and time the next ``leader_elected``."""
    killed_at = time.time()
    cluster.kill("leader")
    deadline = time.monotonic() + ELECTION_WAIT_S
    while time.monotonic() < deadline:
        found = [e for e in cluster.events() if e["kind"] == "leader_elected"]
        after = [float(e["t"]) for e in found if float(e["t"]) > killed_at]
        if after:
            return min(after) - killed_at
        time.sleep(0.05)
    raise TimeoutError(f"no leader was elected within {ELECTION_WAIT_S} s of killing the leader")


def _histogram_means(
    text: str, names: tuple[str, ...]
) -> tuple[bool, dict[str, tuple[float, float]]]:
    """Whether the exposition is the leading coordinator's, and (sum, count) of each
    named histogram in it."""
    from prometheus_client.parser import text_string_to_metric_families

    leading = False
    out: dict[str, tuple[float, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "lepton_coordinator_leading":
            leading = any(s.value == 1 for s in family.samples)
        if family.name not in names:
            continue
        total = sum(s.value for s in family.samples if s.name.endswith("_sum"))
        count = sum(s.value for s in family.samples if s.name.endswith("_count"))
        out[family.name] = (total, count)
    return leading, out


@dataclass(frozen=True)
class MetricTerms:
    p: float
    d: float
    u: float
    e: float | None  # None: no replica has timed an election


def consensus_from_metrics(cluster: Any) -> MetricTerms | None:
    """p, d, u, e as means of the coordinators' Paxos histograms: p and d from the
    leader, u and e over every replica; None when the cluster does not export them
    (or nothing was timed yet)."""
    import httpx

    scrape = getattr(cluster, "scrape_targets", None)
    if not callable(scrape):
        return None
    groups = [g for g in scrape() if g["labels"].get("lepton_role") == "coordinator"]
    names = ("lepton_paxos_propose_seconds", "lepton_paxos_decide_seconds")
    leader: dict[str, tuple[float, float]] = {}
    apply_sum = apply_count = election_sum = election_count = 0.0
    for g in groups:
        url = f"{g['labels'].get('__scheme__', 'http')}://{g['targets'][0]}/metrics"
        try:
            reply = httpx.get(url, timeout=5.0, verify=_verify(cluster), headers=_bearer())
            reply.raise_for_status()
        except httpx.HTTPError:
            continue
        wanted = (*names, "lepton_paxos_apply_seconds", "lepton_paxos_election_seconds")
        leading, means = _histogram_means(reply.text, wanted)
        total, count = means.get("lepton_paxos_apply_seconds", (0.0, 0.0))
        apply_sum, apply_count = apply_sum + total, apply_count + count
        total, count = means.get("lepton_paxos_election_seconds", (0.0, 0.0))
        election_sum, election_count = election_sum + total, election_count + count
        if leading:
            leader = means
    if not leader or not apply_count or not all(leader.get(n, (0, 0))[1] for n in names):
        return None
    p, d = (leader[n][0] / leader[n][1] for n in names)
    e = election_sum / election_count if election_count else None
    return MetricTerms(p, d, apply_sum / apply_count, e)


def _bearer() -> dict[str, str]:
    from lepton_ai.wire.http_auth import http_token

    token = http_token()
    return {"authorization": f"Bearer {token}"} if token else {}


def _verify(cluster: Any) -> Any:
    tls = getattr(cluster, "tls", None)
    return tls.client if tls is not None else True


def measure_consensus(
    cluster: Any, writes: int = CONSENSUS_WRITES_DEFAULT, election: bool = False
) -> ConsensusEstimate:
    """``p``, ``d``, ``u``, ``e`` of the cluster's Paxos log, measured from this client."""
    kv = cluster.kv
    if kv is None:
        raise ValueError("consensus needs replicated coordinators (a cluster of 3 or 5)")
    if not 1 <= writes <= CONSENSUS_WRITES_MAX:
        raise ValueError(f"writes must be in 1..{CONSENSUS_WRITES_MAX}, got {writes}")
    addresses = list(kv.addresses)
    m = len(addresses)
    kv.put(_PROBE_KEY, 0)  # opens the session and finds the leader: not timed
    p = statistics.median(_timed(lambda: kv.get(_PROBE_KEY)) for _ in range(writes))
    put = statistics.median(_timed(lambda: kv.put(_PROBE_KEY, 1)) for _ in range(writes))
    lag = statistics.median(_apply_lag(kv, addresses) for _ in range(max(1, writes // 4)))
    how = {
        "p": f"median of {writes} KV reads: a request's round trip through the leader",
        "d": f"median of {writes} KV writes less p: accept at a majority, fsync, commit",
        "u": f"median time until all {m} replicas applied a committed write (polled), / m",
    }
    from_metrics = consensus_from_metrics(cluster)
    if from_metrics is not None:
        # The replicas' own timings (consensus/timings.py): each stage apart, where the
        # client can only time whole round trips.
        p = from_metrics.p
        put, lag = p + from_metrics.d, from_metrics.u * m
        how = {
            "p": "mean of the leader's lepton_paxos_propose_seconds (arrival to Accept sent)",
            "d": "mean of the leader's lepton_paxos_decide_seconds (Accept sent to chosen)",
            "u": "mean of the replicas' lepton_paxos_apply_seconds (one command applied)",
        }
    e: float | None = None
    if election:
        e = measure_election(cluster)
        how["e"] = "killed the leader (--measure-election) and timed the next leader_elected"
    else:
        past = elections_from_timeline(cluster.events())
        if past:
            e = statistics.median(past)
            how["e"] = f"median of {len(past)} leader kill -> leader_elected gaps in the timeline"
        elif from_metrics is not None and from_metrics.e is not None:
            e = from_metrics.e
            how["e"] = (
                "mean of the replicas' lepton_paxos_election_seconds (no leader known -> one)"
            )
    kv.delete(_PROBE_KEY)
    return ConsensusEstimate(m, p, max(put - p, 0.0), lag / m, e, how)
