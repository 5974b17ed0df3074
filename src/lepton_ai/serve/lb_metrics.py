"""The balancer's Prometheus metrics, kept as plain integers until scraped.

A ``prometheus_client`` Counter or Histogram takes a lock and checks its labels
on every update; per request that was several microseconds of the balancer's
CPU. Here the hot path adds to ints (one event loop thread, no lock needed) and
``render`` builds the metric families only when ``/metrics`` is read. Names and
types are what the ``Counter``/``Histogram`` objects exposed before.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from lepton_ai.serve.policy import Outcome

CONTENT_TYPE = CONTENT_TYPE_LATEST
# prometheus_client's default latency buckets (seconds).
_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
_STATUSES_MAX = 64  # distinct status codes tracked; the rest are counted as "other"


class BalancerMetrics:
    def __init__(self) -> None:
        self.by_status: dict[int, int] = {}
        self.other_status = 0
        self.by_outcome: dict[Outcome, int] = dict.fromkeys(Outcome, 0)
        self.retries = 0
        self.ejections = 0
        self.shed = 0
        self.latency_counts = [0] * (len(_BUCKETS_S) + 1)  # the last one is +Inf
        self.latency_sum_s = 0.0
        self.ready = 0  # set by the balancer just before a scrape
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(self)

    # -- hot path ----------------------------------------------------------------------
    def count(self, status: int) -> None:
        n = self.by_status.get(status)
        if n is not None:
            self.by_status[status] = n + 1
        elif len(self.by_status) < _STATUSES_MAX:
            self.by_status[status] = 1
        else:
            self.other_status += 1

    def attempt(self, outcome: Outcome) -> None:
        self.by_outcome[outcome] += 1

    def observe(self, seconds: float) -> None:
        self.latency_counts[bisect.bisect_left(_BUCKETS_S, seconds)] += 1
        self.latency_sum_s += seconds

    # -- scrape ------------------------------------------------------------------------
    def render(self) -> bytes:
        return generate_latest(self._registry)

    def collect(self) -> Iterator[Metric]:
        return _families([], [([], self)])


def render_grouped(label: str, groups: Mapping[str, BalancerMetrics]) -> bytes:
    """Several balancers' metrics in one scrape, told apart by ``label`` (a node's
    balancer has one per deployment; its own requests go under the value "")."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Grouped(label, groups))
    return generate_latest(registry)


class _Grouped(Collector):
    def __init__(self, label: str, groups: Mapping[str, BalancerMetrics]) -> None:
        self.label = label
        self.groups = groups

    def collect(self) -> Iterator[Metric]:
        return _families([self.label], [([v], m) for v, m in self.groups.items()])


def _families(
    names: list[str], groups: list[tuple[list[str], BalancerMetrics]]
) -> Iterator[Metric]:
    """The metric families of ``groups``: each one's label values (for ``names``) and counts."""
    requests = CounterMetricFamily(
        "lepton_lb_requests", "client requests by status", labels=[*names, "code"]
    )
    attempts = CounterMetricFamily(
        "lepton_lb_attempts", "upstream attempts by outcome", labels=[*names, "outcome"]
    )
    retries = CounterMetricFamily(
        "lepton_lb_retries", "attempts retried on another replica", labels=names
    )
    ejections = CounterMetricFamily(
        "lepton_lb_ejections", "passive outlier ejections", labels=names
    )
    shed = CounterMetricFamily("lepton_lb_shed", "requests answered 503 (no room)", labels=names)
    latency = HistogramMetricFamily(
        "lepton_lb_request_seconds", "client request latency", labels=names
    )
    ready = GaugeMetricFamily(
        "lepton_lb_ready_replicas", "replicas ready and not ejected", labels=names
    )
    for values, m in groups:
        for status, n in sorted(m.by_status.items()):
            requests.add_metric([*values, str(status)], n)
        if m.other_status:
            requests.add_metric([*values, "other"], m.other_status)
        for outcome, n in m.by_outcome.items():
            if n:
                attempts.add_metric([*values, outcome.value], n)
        retries.add_metric(values, m.retries)
        ejections.add_metric(values, m.ejections)
        shed.add_metric(values, m.shed)
        latency.add_metric(values, _buckets(m), m.latency_sum_s)
        ready.add_metric(values, m.ready)
    yield from (requests, attempts, retries, ejections, shed, latency, ready)


def _buckets(m: BalancerMetrics) -> list[tuple[str, float]]:
    cumulative = 0
    buckets: list[tuple[str, float]] = []
    for bound, n in zip((*_BUCKETS_S, float("inf")), m.latency_counts, strict=True):
        cumulative += n
        buckets.append(("+Inf" if bound == float("inf") else str(bound), cumulative))
    return buckets
