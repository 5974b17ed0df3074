"""The autoscaler: replicas follow the requests in flight, with delays against flapping.

For a deployment with an ``Autoscale`` policy the leader feeds, every tick, the
requests in flight at its replicas (summed over every node's balancer). The wanted
count is ``ceil(in_flight / target_inflight)`` clamped to ``[min, max]``. As the
Kubernetes HorizontalPodAutoscaler's stabilization windows do, a scale-up happens
only when every sample of the last ``scale_up_delay_s`` wanted more (to the
smallest of them), a scale-down only when every sample of the last
``scale_down_delay_s`` wanted fewer (to the largest): a burst must last to add
replicas, a lull must last to remove them.

Pure: no asyncio, sockets, time, os or random (the purity test covers ``heal/``).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from lepton_ai.serve.spec import Autoscale

SAMPLES_MAX = 10_000  # per deployment: a 10-minute window at 0.1 s ticks, and no more


@dataclass(frozen=True)
class Load:
    """One deployment now: its replica count, how many are ready, requests in flight."""

    replicas: int
    ready: int
    in_flight: int


@dataclass(frozen=True)
class ScaleDecision:
    replicas: int
    detail: str  # the numbers that drove it, for the event log


@dataclass
class _Window:
    samples: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=SAMPLES_MAX))
    since: float | None = None  # when sampling began (a window needs its full length)


@dataclass
class Autoscaler:
    """Run by the leader only; a new leader starts with empty windows."""

    _windows: dict[str, _Window] = field(default_factory=dict)

    def step(self, name: str, policy: Autoscale, load: Load, now: float) -> ScaleDecision | None:
        """A new replica count for deployment ``name``, or None."""
        replicas, in_flight = load.replicas, load.in_flight
        wanted = wanted_replicas(policy, in_flight)
        win = self._windows.setdefault(name, _Window())
        if win.since is None:
            win.since = now
        win.samples.append((now, wanted))
        horizon = now - max(policy.scale_up_delay_s, policy.scale_down_delay_s)
        while win.samples and win.samples[0][0] < horizon:
            win.samples.popleft()
        target = self._decide(win, policy, replicas, now)
        if target is None or target == replicas:
            return None
        self._windows[name] = _Window()  # judge the new count on fresh samples
        why = (
            f"{name}: {replicas} -> {target} replicas ({in_flight} requests in flight at "
            f"{load.ready} ready, target {policy.target_inflight:g} per replica, "
            f"bounds {policy.min_replicas}..{policy.max_replicas})"
        )
        return ScaleDecision(target, why)

    def _decide(self, win: _Window, policy: Autoscale, replicas: int, now: float) -> int | None:
        since = win.since if win.since is not None else now
        if replicas < policy.min_replicas or replicas > policy.max_replicas:
            return min(max(replicas, policy.min_replicas), policy.max_replicas)
        up = [w for t, w in win.samples if t >= now - policy.scale_up_delay_s]
        if now - since >= policy.scale_up_delay_s and up and min(up) > replicas:
            return min(up)
        down = [w for t, w in win.samples if t >= now - policy.scale_down_delay_s]
        if now - since >= policy.scale_down_delay_s and down and max(down) < replicas:
            return max(down)
        return None

    def forget(self, keep: set[str]) -> None:
        """Drop the windows of deployments no longer autoscaled."""
        for name in [n for n in self._windows if n not in keep]:
            del self._windows[name]


def wanted_replicas(policy: Autoscale, in_flight: int) -> int:
    raw = math.ceil(max(in_flight, 0) / policy.target_inflight)
    return min(max(raw, policy.min_replicas), policy.max_replicas)
