"""Bounds and timings of the serving layer, one dataclass per component.

Every queue, body, retry and wait has a named limit here (units last in names).
Defaults follow Kubernetes probes and Envoy outlier detection, made faster so a
local deployment heals in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lepton_ai.serve.policy import BackoffConfig, RouterConfig


@dataclass(frozen=True)
class ReplicaConfig:
    """One replica process: request limits and optional micro-batching."""

    body_bytes_max: int = 1 << 20  # a larger /predict body gets 413
    instances_max: int = 10_000  # instances per request
    max_batch_size: int = 0  # 0 = no micro-batching; else instances per model call
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for company
    batch_queue_max: int = 1024  # requests waiting for a batch slot; beyond that 503
    keep_alive_s: int = 75  # longer than the balancer's pool idle time, so it closes first

    def __post_init__(self) -> None:
        if self.body_bytes_max <= 0 or self.instances_max <= 0 or self.batch_queue_max <= 0:
            raise ValueError("ReplicaConfig limits must be positive")
        if self.max_batch_size < 0 or self.max_wait_ms < 0:
            raise ValueError("max_batch_size and max_wait_ms must be >= 0")


@dataclass(frozen=True)
class BalancerConfig:
    """The load balancer in front of the replicas."""

    router: RouterConfig = field(default_factory=RouterConfig)
    health_period_s: float = 1.0  # active probe of every replica's /readyz
    health_timeout_s: float = 0.5
    request_timeout_s: float = 10.0  # a client request, all attempts together
    attempt_timeout_s: float = 5.0  # one attempt on one replica (a hang costs this much)
    retries_max: int = 1  # retries on another replica, only before any response byte
    body_bytes_max: int = 1 << 20  # request body; larger gets 413 at the balancer
    response_bytes_max: int = 16 << 20
    header_bytes_max: int = 64 << 10
    pool_idle_max: int = 64  # idle keep-alive connections kept per replica
    pool_idle_s: float = 30.0  # an idle connection older than this is closed, not reused
    retry_after_s: int = 1  # Retry-After on a 503 when every replica is full
    # The client side (serve/frontend.py):
    connections_max: int = 10_000  # open client connections; beyond that 503 and close
    # Open connections of one client address; beyond that 429 and close. Above the
    # pools of common clients (httpx and aiohttp: 100, browsers: 6 per host), and
    # 10_000 / 128 = 78 addresses are needed to exhaust connections_max.
    connections_per_client_max: int = 128
    pipeline_max: int = 16  # parsed requests waiting per connection; then stop reading
    keep_alive_s: float = 75.0  # an idle client connection (between requests) is closed
    # A request head must be complete this long after its first byte (the first request
    # of a connection: after accept), else 408 and close. Go's ReadHeaderTimeout as
    # commonly set; 6.5 kB/s for the largest head (header_bytes_max).
    header_timeout_s: float = 10.0
    # A request body must arrive within body_timeout_s plus one second per
    # body_rate_min_bytes_s bytes received, else 408 and close (Apache mod_reqtimeout's
    # default "body=20,MinRate=500"): a slow but steady upload completes, a drip does not.
    body_timeout_s: float = 20.0
    body_rate_min_bytes_s: int = 500

    def __post_init__(self) -> None:
        if not 0 < self.health_timeout_s <= self.health_period_s:
            raise ValueError("need 0 < health_timeout_s <= health_period_s")
        if not 0 < self.attempt_timeout_s <= self.request_timeout_s:
            raise ValueError("need 0 < attempt_timeout_s <= request_timeout_s")
        if self.retries_max < 0 or self.pool_idle_max < 0:
            raise ValueError("retries_max and pool_idle_max must be >= 0")
        if self.connections_max <= 0 or self.pipeline_max <= 0 or self.keep_alive_s <= 0:
            raise ValueError("connections_max, pipeline_max and keep_alive_s must be positive")
        if self.connections_per_client_max <= 0 or self.body_rate_min_bytes_s <= 0:
            raise ValueError("connections_per_client_max and body_rate_min_bytes_s must be > 0")
        if self.header_timeout_s <= 0 or self.body_timeout_s <= 0:
            raise ValueError("header_timeout_s and body_timeout_s must be positive")


@dataclass(frozen=True)
class SupervisorConfig:
    """Replica processes: start-up, restart back-off, drain and stop."""

    start_timeout_s: float = 60.0  # spawn until the child reports its port
    ready_timeout_s: float = 60.0  # port reported until /readyz answers 200
    ready_poll_s: float = 0.05
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    backoff_reset_s: float = 30.0  # healthy this long -> the back-off starts over
    backoff_first_immediate: bool = True  # the first crash after a healthy run: no wait
    drain_timeout_s: float = 10.0  # in-flight requests get this long on scale-down / stop
    stop_timeout_s: float = 5.0  # SIGTERM to SIGKILL
    replicas_max: int = 64

    def __post_init__(self) -> None:
        if not 0 < self.backoff_initial_s <= self.backoff_max_s:
            raise ValueError("need 0 < backoff_initial_s <= backoff_max_s")
        if self.replicas_max <= 0:
            raise ValueError("replicas_max must be positive")

    def backoff(self) -> BackoffConfig:
        """The restart back-off of one replica, as every supervisor of replicas uses it."""
        return BackoffConfig(
            self.backoff_initial_s,
            self.backoff_max_s,
            self.backoff_reset_s,
            self.backoff_first_immediate,
        )


@dataclass(frozen=True)
class ServeConfig:
    """Everything a deployment needs besides its target."""

    replica: ReplicaConfig = field(default_factory=ReplicaConfig)
    balancer: BalancerConfig = field(default_factory=BalancerConfig)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
