"""The Prometheus metrics of the cluster's processes.

Every lepton process is its own Prometheus target: its metrics are collectors in
the process's default registry (``prometheus_client.REGISTRY``), which also carries
prometheus-client's ``process_*`` (CPU, memory, open files) and ``python_*``
families. The hot paths (a task dispatched or reported, a Paxos commit) only add to
plain ints and bucket arrays here, one event-loop thread each, no lock: a
``prometheus_client`` Counter takes a lock and checks its labels on every update,
which the balancer measured at several microseconds per request
(``serve/lb_metrics.py``). The families are built when ``/metrics`` is read.

Gauges of state that already exists somewhere (workers, jobs, phi, storage,
deployments, the Paxos log) are read at scrape time by each process's collector,
so keeping them costs nothing between scrapes.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import REGISTRY, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
METRICS_ENV = "LEPTON_METRICS"  # "0": this process collects no metrics
STAGE_LABELS_MAX = 8  # stages past this share one label value ("8+")

# Seconds: a trivial task is ~1 ms at the leader; a long one minutes.
TASK_BUCKETS_S = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 3600.0)
# Seconds: a Paxos commit on one host is ~0.5 ms; fsync 0.1-20 ms; an election ~0.3 s.
CONSENSUS_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


class Histo:
    """A histogram kept as bucket counts (the last one is +Inf) and a sum."""

    __slots__ = ("buckets", "counts", "sum")

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def add_to(self, family: HistogramMetricFamily, labels: Sequence[str] = ()) -> None:
        cumulative: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip((*map(str, self.buckets), "+Inf"), self.counts, strict=True):
            running += n
            cumulative.append((bound, running))
        family.add_metric(list(labels), cumulative, self.sum)


def histogram(name: str, doc: str, histo: Histo) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc)
    histo.add_to(family)
    return family


def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def labelled_gauge(
    name: str, doc: str, label: str | Sequence[str], rows: Iterable[tuple[Sequence[str], float]]
) -> GaugeMetricFamily:
    labels = [label] if isinstance(label, str) else list(label)
    family = GaugeMetricFamily(name, doc, labels=labels)
    for values, value in rows:
        family.add_metric(list(values), value)
    return family


def labelled_counter(
    name: str, doc: str, label: str, rows: Iterable[tuple[str, float]]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=[label])
    for value_label, value in rows:
        family.add_metric([value_label], value)
    return family


def enabled_from_env() -> bool:
    """Whether this process collects metrics: ``LEPTON_METRICS=0`` turns off the
    coordinators' and worker agents' metric sources and the leader's task timeline
    (as Ray's ``RAY_enable_metrics_collection=0``), for the last few percent of task
    throughput; ``/metrics`` then holds only the process's own runtime metrics."""
    value = os.environ.get(METRICS_ENV, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{METRICS_ENV} must be 0 (metrics off) or 1 (on), not {value!r}")
    return value == "1"


def stage_label(stage: int) -> str:
    return str(stage) if stage < STAGE_LABELS_MAX else f"{STAGE_LABELS_MAX}+"


class _Sources:
    """This process's metric sources, by name, as one collector in the default
    registry. A source is a callable returning metric families, called at scrape
    time; registering a name again replaces it (a coordinator object rebuilt in the
    same process, as tests do, takes over its name)."""

    def __init__(self) -> None:
        self.sources: dict[str, Callable[[], Iterable[Metric]]] = {}

    def collect(self) -> Iterator[Metric]:
        for source in list(self.sources.values()):
            yield from source()


_SOURCES = _Sources()
REGISTRY.register(_SOURCES)


def add_source(name: str, source: Callable[[], Iterable[Metric]]) -> None:
    _SOURCES.sources[name] = source


def remove_source(name: str) -> None:
    _SOURCES.sources.pop(name, None)


def render() -> bytes:
    return generate_latest(REGISTRY)
