"""Routing, outlier ejection and restart back-off: the serving layer's sans-I/O core.

No clocks, sockets or random sources here. The balancer passes ``now`` (monotonic
seconds) and an object with ``randrange`` into every decision, so tests drive
these classes directly and replay any sequence exactly.

Rules (after Envoy's outlier detection and Kubernetes probes):

* A replica is *routable* when it passed its last readiness probe, is not
  draining, not a standby (a warm spare), not ejected, and has fewer than
  ``outstanding_max`` requests in flight (the bounded per-replica queue).
* Least-outstanding routing picks the routable replica with the fewest requests
  in flight; among equals, the most recently used one (deterministic: warm caches
  at low load, while the counts still spread load once replicas are busy). p2c
  compares two random candidates and breaks ties at random.
* Passive ejection: a refused connection ejects at once; timeouts, resets and
  5xx answers eject after ``consecutive_failures_max`` in a row. An ejection
  lasts ``ejection_base_s * 2**k`` (k = earlier ejections, capped). Ejections
  for failures other than a refusal never take more than ``ejected_fraction_max``
  of the replicas out, so a request that makes every replica fail (a poison
  input) cannot empty the pool.
* Active health: ``health_failures_max`` failed probes in a row mark the
  replica dead (the supervisor restarts it).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Protocol

from lepton_ai.heal.backoff import Backoff


class Rng(Protocol):
    def randrange(self, stop: int, /) -> int: ...


class Outcome(enum.Enum):
    OK = "ok"  # any answer below 500 (a 4xx is the client's fault, not the replica's)
    SERVER_ERROR = "5xx"
    REFUSED = "refused"  # a new connection was refused: nothing listens there
    RESET = "reset"  # the connection broke before any response byte
    TIMEOUT = "timeout"  # no response byte within the attempt timeout


class Policy(enum.Enum):
    LEAST_OUTSTANDING = "least_outstanding"
    POWER_OF_TWO = "p2c"


@dataclass(frozen=True)
class RouterConfig:
    policy: Policy = Policy.LEAST_OUTSTANDING
    outstanding_max: int = 64  # per replica; all full -> 503 + Retry-After
    consecutive_failures_max: int = 3
    ejection_base_s: float = 10.0
    ejection_max_s: float = 300.0
    ejected_fraction_max: float = 0.5
    health_failures_max: int = 3

    def __post_init__(self) -> None:
        if self.outstanding_max <= 0 or self.consecutive_failures_max <= 0:
            raise ValueError("outstanding_max and consecutive_failures_max must be positive")
        if self.health_failures_max <= 0:
            raise ValueError("health_failures_max must be positive")
        if not 0 < self.ejection_base_s <= self.ejection_max_s:
            raise ValueError("need 0 < ejection_base_s <= ejection_max_s")
        if not 0.0 <= self.ejected_fraction_max <= 1.0:
            raise ValueError("ejected_fraction_max must be in [0, 1]")


@dataclass
class ReplicaView:
    """What the router knows about one replica (a snapshot for status and metrics)."""

    replica_id: int
    ready: bool = False
    draining: bool = False
    standby: bool = False  # a warm spare: started and probed, but no traffic until promoted
    outstanding: int = 0
    consecutive_failures: int = 0
    health_failures: int = 0
    ejected_until: float = -math.inf
    ejections: int = 0
    requests: int = 0
    failures: int = 0
    last_used: int = 0  # the router's request count when this replica last got one

    def ejected(self, now: float) -> bool:
        return now < self.ejected_until


class Router:
    """Chooses a replica per request and keeps the per-replica bookkeeping."""

    def __init__(self, config: RouterConfig | None = None) -> None:
        self.config = config or RouterConfig()
        self._replicas: dict[int, ReplicaView] = {}
        self._begins = 0  # attempts begun: a logical clock for ``last_used``

    # -- membership -----------------------------------------------------------------
    def add(self, replica_id: int) -> None:
        if replica_id in self._replicas:
            raise ValueError(f"replica {replica_id} is already known")
        self._replicas[replica_id] = ReplicaView(replica_id)

    def remove(self, replica_id: int) -> None:
        """Forget a replica (it exited). Its in-flight requests finish as failures."""
        self._replicas.pop(replica_id, None)

    def drain(self, replica_id: int) -> None:
        view = self._replicas.get(replica_id)
        if view is not None:
            view.draining = True

    def set_standby(self, replica_id: int, standby: bool) -> None:
        view = self._replicas.get(replica_id)
        if view is not None:
            view.standby = standby

    def __contains__(self, replica_id: int) -> bool:
        return replica_id in self._replicas

    def view(self, replica_id: int) -> ReplicaView | None:
        return self._replicas.get(replica_id)

    def views(self) -> list[ReplicaView]:
        return list(self._replicas.values())

    def outstanding(self, replica_id: int) -> int:
        view = self._replicas.get(replica_id)
        return 0 if view is None else view.outstanding

    # -- active health ------------------------------------------------------------------
    def health_result(self, replica_id: int, *, alive: bool, ready: bool) -> bool:
        """Record one probe. Returns True when the replica has failed liveness."""
        view = self._replicas.get(replica_id)
        if view is None:
            return False
        if not alive:
            # One slow probe on a busy host is not a verdict; a hang is caught sooner by
            # request outcomes (passive ejection) anyway.
            view.health_failures += 1
            if view.health_failures < self.config.health_failures_max:
                return False
            view.ready = False
            return True
        view.health_failures = 0
        view.ready = ready
        return False

    # -- routing ------------------------------------------------------------------------
    def routable(self, now: float, exclude: frozenset[int] = frozenset()) -> list[ReplicaView]:
        limit = self.config.outstanding_max
        return [
            v
            for v in self._replicas.values()
            if v.ready
            and not v.draining
            and not v.standby
            and not v.ejected(now)
            and v.outstanding < limit
            and v.replica_id not in exclude
        ]

    def any_ready(self, now: float) -> bool:
        return any(
            v.ready and not v.draining and not v.standby and not v.ejected(now)
            for v in self._replicas.values()
        )

    def pick(self, now: float, rng: Rng, exclude: frozenset[int] = frozenset()) -> int | None:
        """The replica for the next attempt, or None when every candidate is full or gone."""
        if self.config.policy is Policy.POWER_OF_TWO:
            candidates = self.routable(now, exclude)
            if len(candidates) > 2:
                first = candidates[rng.randrange(len(candidates))]
                second = candidates[rng.randrange(len(candidates) - 1)]
                if second is first:
                    second = candidates[-1]
                return min(first, second, key=lambda v: v.outstanding).replica_id
        # Least outstanding (also p2c's choice among two), in one pass since this runs
        # once per request: the same filter as ``routable``, keeping the least loaded.
        low = self.config.outstanding_max
        best: list[ReplicaView] = []
        for v in self._replicas.values():
            n = v.outstanding
            if (
                n <= low
                and v.ready
                and not v.draining
                and not v.standby
                and now >= v.ejected_until
                and v.replica_id not in exclude
            ):
                if n < low:
                    low = n
                    best = [v]
                elif n == low and n < self.config.outstanding_max:
                    best.append(v)
        if not best:
            return None
        if len(best) == 1:
            return best[0].replica_id
        if self.config.policy is Policy.POWER_OF_TWO:
            return best[rng.randrange(len(best))].replica_id
        # Among equally loaded replicas the most recently used one: its process has the
        # model's code and data warm in CPU caches (a random pick among idle replicas
        # measurably raised p50 at low load). Load still spreads by the counts above:
        # a busy replica is never picked over an idle one.
        return max(best, key=_last_used).replica_id

    def begin(self, replica_id: int) -> None:
        view = self._replicas.get(replica_id)
        if view is None:
            raise ValueError(f"unknown replica {replica_id}")
        view.outstanding += 1
        view.requests += 1
        self._begins += 1
        view.last_used = self._begins

    def finish(self, replica_id: int, outcome: Outcome, now: float) -> bool:
        """Record an attempt's outcome. Returns True when this ejected the replica."""
        view = self._replicas.get(replica_id)
        if view is None:
            return False  # it exited meanwhile; nothing to account
        if view.outstanding <= 0:
            raise AssertionError(f"replica {replica_id}: finish() without begin()")
        view.outstanding -= 1
        if outcome is Outcome.OK:
            view.consecutive_failures = 0
            return False
        view.failures += 1
        view.consecutive_failures += 1
        if view.ejected(now):
            return False
        if outcome is Outcome.REFUSED:
            # Nothing listens there: ejecting cannot cost capacity, so no panic threshold.
            return self._eject(view, now, capped=False)
        if view.consecutive_failures >= self.config.consecutive_failures_max:
            return self._eject(view, now, capped=True)
        return False

    def _eject(self, view: ReplicaView, now: float, *, capped: bool) -> bool:
        ejected = sum(1 for v in self._replicas.values() if v.ejected(now))
        limit = math.floor(len(self._replicas) * self.config.ejected_fraction_max)
        if capped and ejected + 1 > limit:
            return False  # panic threshold: better a flaky replica than none
        span = self.config.ejection_base_s * 2 ** min(view.ejections, 16)
        view.ejected_until = now + min(span, self.config.ejection_max_s)
        view.ejections += 1
        view.consecutive_failures = 0
        return True


def _last_used(view: ReplicaView) -> int:
    return view.last_used


@dataclass(frozen=True)
class BackoffConfig:
    initial_s: float = 1.0
    max_s: float = 60.0
    reset_s: float = 30.0
    # A replica that crashes once after running fine comes back at once (that is the
    # SIGKILL-under-load case); False makes even the first restart wait initial_s.
    first_immediate: bool = True


class RestartBackoff:
    """Restart delay for one replica slot (Kubernetes CrashLoopBackOff, made faster).

    The first exit after a healthy run restarts at once (``first_immediate``);
    each further exit without ``reset_s`` of health in between doubles the delay
    from ``initial_s`` (1 s) up to ``max_s`` (60 s). This class only counts the
    exits in a row; the delay for a count is ``heal.backoff.Backoff``'s, as for
    every other restart loop.
    """

    def __init__(self, config: BackoffConfig | None = None) -> None:
        self.config = config or BackoffConfig()
        self._delays = Backoff(self.config.initial_s, 2.0, self.config.max_s)
        self.crashes = 0
        self._healthy_since: float | None = None

    def healthy(self, now: float) -> None:
        """The replica is up and ready (called on every good probe; the first one counts)."""
        if self._healthy_since is None:
            self._healthy_since = now

    def unhealthy(self) -> None:
        self._healthy_since = None

    def on_exit(self, now: float) -> float:
        """The replica exited (or was killed for failing liveness): seconds to wait."""
        since = self._healthy_since
        if since is not None and now - since >= self.config.reset_s:
            self.crashes = 0
        self._healthy_since = None
        self.crashes += 1
        # With first_immediate the first crash of a streak is forgiven: it waits
        # next_delay(0) == 0, and the second one waits initial_s.
        failures = self.crashes - 1 if self.config.first_immediate else self.crashes
        return self._delays.next_delay(failures)
