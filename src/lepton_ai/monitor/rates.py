"""Live rates for the dashboard, from the cluster's own ``/metrics``: each
deployment's requests per second and mean latency (summed over every node's
balancer) and the leader's Paxos commit index and mean commit latency.

Counters only say "so many since start"; a rate needs two readings. ``Rates`` keeps
the previous totals and reports the change over the time between two snapshots
(the first snapshot has no rate). Scrapes are bounded: at most ``TARGETS_MAX``
targets, each with a short timeout, so a dead node costs one timeout, not a hung
dashboard.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

TARGETS_MAX = 32  # balancers and coordinators scraped per snapshot
SCRAPE_TIMEOUT_S = 0.5


@dataclass
class _Totals:
    at: float
    values: dict[str, tuple[float, float, float]]  # key -> (requests, latency sum, count)


@dataclass
class Rates:
    """Counters' previous readings; ``update`` annotates the snapshot's views."""

    verify: ssl.SSLContext | bool = True
    bearer: str | None = None
    _last: _Totals | None = field(default=None, repr=False)
    # One client for every snapshot: its kept-alive connections (one per target) spare
    # each snapshot a TCP (and TLS) handshake per target. Reads come one at a time
    # (the dashboard fetches one snapshot at a time; ``lepton top`` draws in one loop).
    _client: httpx.Client | None = field(default=None, repr=False)

    def read(self, urls: Iterable[str]) -> dict[str, dict[str, float]]:
        """Per key ("deployment:NAME" or "paxos"), the rates since the last call."""
        totals: dict[str, tuple[float, float, float]] = {}
        gauges: dict[str, dict[str, float]] = {}
        client = self._http()
        for url in list(urls)[:TARGETS_MAX]:
            try:
                reply = client.get(url)
                reply.raise_for_status()
            except httpx.HTTPError:
                continue  # a node gone for the moment: its share is missing once
            _add(totals, gauges, reply.text)
        now = time.monotonic()
        out = {k: dict(v) for k, v in gauges.items()}
        last, self._last = self._last, _Totals(now, totals)
        if last is None or now <= last.at:
            return out
        for key, (n, total_s, count) in totals.items():
            n0, s0, c0 = last.values.get(key, (0.0, 0.0, 0.0))
            if n < n0 or count < c0:
                continue  # a restarted process: its counters began again
            rate = out.setdefault(key, {})
            rate["per_s"] = (n - n0) / (now - last.at)
            if count > c0:
                rate["latency_ms"] = (total_s - s0) / (count - c0) * 1000
        return out

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _http(self) -> httpx.Client:
        if self._client is None:
            headers = {"authorization": f"Bearer {self.bearer}"} if self.bearer else {}
            self._client = httpx.Client(
                timeout=SCRAPE_TIMEOUT_S,
                verify=self.verify,
                headers=headers,
                limits=httpx.Limits(max_keepalive_connections=TARGETS_MAX),
            )
        return self._client


def _add(
    totals: dict[str, tuple[float, float, float]],
    gauges: dict[str, dict[str, float]],
    text: str,
) -> None:
    """Fold one target's exposition into the totals (summing across targets). Commit
    latency is the leader's alone: a follower proposes nothing."""
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    leading = any(s.name == "lepton_coordinator_leading" and s.value == 1 for s in samples)

    def bump(key: str, n: float = 0.0, total_s: float = 0.0, count: float = 0.0) -> None:
        a, b, c = totals.get(key, (0.0, 0.0, 0.0))
        totals[key] = (a + n, b + total_s, c + count)

    for sample in samples:
        name, value = sample.name, sample.value
        dep = sample.labels.get("deployment")
        if name == "lepton_lb_requests_total" and dep:
            bump(f"deployment:{dep}", n=value)
        elif name == "lepton_lb_request_seconds_sum" and dep:
            bump(f"deployment:{dep}", total_s=value)
        elif name == "lepton_lb_request_seconds_count" and dep:
            bump(f"deployment:{dep}", count=value)
        elif name == "lepton_paxos_commit_seconds_sum" and leading:
            bump("paxos", total_s=value)
        elif name == "lepton_paxos_commit_seconds_count" and leading:
            bump("paxos", n=value, count=value)
        elif name == "lepton_paxos_commit_index":
            paxos = gauges.setdefault("paxos", {})
            paxos["commit_index"] = max(paxos.get("commit_index", 0.0), value)


def annotate(snapshot: dict[str, Any], rates: dict[str, dict[str, float]]) -> None:
    """Put the rates into the snapshot's deployment and coordinator views."""
    for dep in snapshot.get("deployments", []):
        rate = rates.get(f"deployment:{dep['name']}", {})
        if "per_s" in rate:
            dep["requests_per_s"] = round(rate["per_s"], 2)
        if "latency_ms" in rate:
            dep["latency_ms"] = round(rate["latency_ms"], 2)
    paxos = rates.get("paxos", {})
    for m in snapshot.get("members", []):
        if m.get("role") == "coordinator" and m.get("health") == "leader":
            if "commit_index" in paxos:
                m["commit_index"] = int(paxos["commit_index"])
            if "latency_ms" in paxos:
                m["commit_latency_ms"] = round(paxos["latency_ms"], 3)
