"""The leader's alerting shell: steps ``monitor.alerts`` once a second with what the
coordinator knows, puts each raise and clear on the replicated timeline
(``alert_raised``/``alert_cleared``), and POSTs them to a webhook if one is set.

The webhook gets one JSON document per transition, shaped like a one-alert
Alertmanager notification (``status`` "firing" or "resolved", ``labels``,
``annotations``, ``startsAt``), so receivers written for Alertmanager work. Posts are
retried with back-off for ``WEBHOOK_GIVE_UP_S`` and then dropped with a warning; at
most ``WEBHOOK_QUEUE_MAX`` wait, the oldest dropped first: a dead receiver never
holds the leader's memory or its loop.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import httpx

from lepton_ai.heal.backoff import Backoff
from lepton_ai.monitor.alerts import Alerts, Snapshot, Transition
from lepton_ai.monitor.events import EventKind

if TYPE_CHECKING:
    from lepton_ai.node.coordinator import Coordinator

log = logging.getLogger("lepton_ai.alerts")

INTERVAL_S = 1.0  # how often the rules are evaluated
WEBHOOK_QUEUE_MAX = 1_000
WEBHOOK_TIMEOUT_S = 5.0
WEBHOOK_GIVE_UP_S = 120.0


class AlertShell:
    def __init__(self, coordinator: Coordinator, webhook_url: str = "") -> None:
        self.c = coordinator
        self.webhook_url = webhook_url
        self.alerts = Alerts()
        # Worker names registered this term (at registration: one that dies before
        # the next evaluation is still missed). Bounded by the workers that can join.
        self.seen: set[str] = set()
        self.outbox: deque[dict[str, Any]] = deque(maxlen=WEBHOOK_QUEUE_MAX)
        self._wake = asyncio.Event()
        self._last = 0.0

    def became_leader(self) -> None:
        self.alerts = Alerts()
        self.seen = set()

    def tick(self, now: float) -> None:
        """From the coordinator's tick loop, while leading."""
        if now - self._last < INTERVAL_S:
            return
        self._last = now
        for transition in self.alerts.step(self.snapshot()):
            self._publish(transition)

    def snapshot(self) -> Snapshot:
        c = self.c
        names = {v.name for v in c.workers.values()}
        self.seen |= names
        voters, reachable = c.quorum()
        under, lost = c.storage.state.copies_down(c.storage.live_views())
        failed = tuple(
            (r.job_id, r.finished_at)
            for r in c.machine.jobs.state.jobs.values()
            if r.status == "failed"
        )
        replicas = tuple(
            (r.replica_id, r.deployment, r.restarts, r.state)
            for v in c.workers.values()
            for r in v.replicas
        )
        disks = tuple(
            (v.node or v.name, v.storage.used_bytes, v.storage.capacity_bytes)
            for v in c.workers.values()
            if v.storage is not None
        )
        return Snapshot(
            now=time.time(),
            nodes_down=tuple(sorted(self.seen - names)),
            voters=voters,
            voters_reachable=reachable,
            objects_under_replicated=under,
            objects_unavailable=lost,
            failed_jobs=failed,
            replicas=replicas,
            disks=disks,
        )

    def _publish(self, t: Transition) -> None:
        a = t.alert
        kind = EventKind.ALERT_RAISED if t.status == "firing" else EventKind.ALERT_CLEARED
        job_id = a.subject if a.rule == "job_failed" else ""
        self.c.event(kind, f"{a.severity} {a.key}: {a.detail}", job_id)
        if self.webhook_url:
            self.outbox.append(notification(t))
            self._wake.set()

    async def run(self) -> None:
        """Deliver the webhook's queue, in order, until cancelled."""
        if not self.webhook_url:
            return
        async with httpx.AsyncClient(timeout=WEBHOOK_TIMEOUT_S) as client:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self.outbox:
                    await self._deliver(client, self.outbox[0])
                    if self.outbox:
                        self.outbox.popleft()

    async def _deliver(self, client: httpx.AsyncClient, doc: dict[str, Any]) -> None:
        backoff = Backoff(0.5, 2.0, 30.0)
        deadline = time.monotonic() + WEBHOOK_GIVE_UP_S
        failures = 0
        while True:
            try:
                reply = await client.post(self.webhook_url, json=doc)
                if reply.status_code < 500 and reply.status_code != 429:
                    return  # delivered (a 4xx will not get better by retrying)
                why = f"HTTP {reply.status_code}"
            except httpx.HTTPError as exc:
                why = f"{type(exc).__name__}: {exc}"
            failures += 1
            if time.monotonic() >= deadline:
                log.warning(
                    "alert webhook: giving up on %s after %d tries (%s)",
                    doc["labels"]["alertname"],
                    failures,
                    why,
                )
                return
            await asyncio.sleep(backoff.next_delay(failures))


def notification(t: Transition) -> dict[str, Any]:
    a = t.alert
    labels: dict[str, str] = {"alertname": a.rule, "severity": a.severity}
    if a.subject:
        labels["subject"] = a.subject
    return {
        "status": t.status,
        "labels": labels,
        "annotations": {"summary": a.detail},
        "startsAt": _rfc3339(a.since),
        "endsAt": _rfc3339(time.time()) if t.status == "resolved" else "",
    }


def _rfc3339(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat()
