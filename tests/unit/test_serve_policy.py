"""The serving core (routing, outlier ejection, restart back-off), driven directly.

Time and randomness are arguments, so each test states the clock and the seed.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from lepton_ai.serve.policy import (
    BackoffConfig,
    Outcome,
    Policy,
    RestartBackoff,
    Router,
    RouterConfig,
)


def _router(n: int = 3, **kw: object) -> Router:
    router = Router(RouterConfig(**kw))  # type: ignore[arg-type]
    for i in range(n):
        router.add(i)
        router.health_result(i, alive=True, ready=True)
    return router


def test_only_ready_replicas_get_traffic() -> None:
    router = Router()
    router.add(0)
    router.add(1)
    rng = random.Random(1)
    assert router.pick(0.0, rng) is None  # nobody ready yet
    router.health_result(1, alive=True, ready=True)
    assert {router.pick(0.0, rng) for _ in range(20)} == {1}


class _NoRng:
    """Least-outstanding routing is deterministic: it must not draw."""

    def randrange(self, stop: int, /) -> int:
        raise AssertionError("least-outstanding routing drew a random number")


def test_least_outstanding_prefers_the_idle_replica_then_the_most_recently_used() -> None:
    router = _router(3)
    rng = _NoRng()
    router.begin(0)
    router.begin(0)
    router.begin(1)
    assert router.pick(0.0, rng) == 2  # the idle one beats the busy ones
    router.finish(0, Outcome.OK, 0.0)
    router.finish(0, Outcome.OK, 0.0)
    router.finish(1, Outcome.OK, 0.0)
    # All idle: the one used last (warm caches), every time.
    assert {router.pick(0.0, rng) for _ in range(20)} == {1}
    # A closed loop at concurrency 1 stays on that replica.
    for _ in range(10):
        replica = router.pick(0.0, rng)
        assert replica is not None
        router.begin(replica)
        router.finish(replica, Outcome.OK, 0.0)
    assert [router.outstanding(i) for i in range(3)] == [0, 0, 0]
    assert [v.requests for v in router.views()] == [2, 11, 0]
    # Excluding it (a retry) goes to the next most recent among the idle ones.
    assert router.pick(0.0, rng, frozenset({1})) == 0


def test_least_outstanding_still_spreads_when_every_replica_is_busy() -> None:
    router = _router(3)
    rng = _NoRng()
    router.begin(2)
    router.finish(2, Outcome.OK, 0.0)  # replica 2 is the warm one
    for _ in range(8):  # concurrency 8 over 3 replicas
        replica = router.pick(0.0, rng)
        assert replica is not None
        router.begin(replica)
    assert sorted(router.outstanding(i) for i in range(3)) == [2, 3, 3]
    assert router.outstanding(2) == 3  # ties went to the warm one, not past the others
    # Whichever replica finishes first gets the next request.
    busiest = max(range(3), key=router.outstanding)
    router.finish(busiest, Outcome.OK, 0.0)
    router.finish(busiest, Outcome.OK, 0.0)
    assert router.pick(0.0, rng) == busiest


def test_power_of_two_choices_never_picks_the_busiest() -> None:
    router = _router(3, policy=Policy.POWER_OF_TWO)
    rng = random.Random(3)
    for _ in range(5):
        router.begin(1)
    picks = Counter(router.pick(0.0, rng) for _ in range(200))
    assert picks[1] == 0 and picks[0] > 0 and picks[2] > 0


def test_power_of_two_choices_breaks_ties_at_random_as_before() -> None:
    router = _router(2, policy=Policy.POWER_OF_TWO)  # two candidates: least outstanding
    rng = random.Random(5)
    picks: Counter[int] = Counter()
    for _ in range(100):
        replica = router.pick(0.0, rng)
        assert replica is not None
        router.begin(replica)
        router.finish(replica, Outcome.OK, 0.0)
        picks[replica] += 1
    assert min(picks.values()) > 20


def test_bounded_queue_per_replica_then_none() -> None:
    router = _router(2, outstanding_max=2)
    rng = random.Random(4)
    for _ in range(4):
        replica = router.pick(0.0, rng)
        assert replica is not None
        router.begin(replica)
    assert router.pick(0.0, rng) is None  # all full: the shell answers 503 + Retry-After
    assert router.any_ready(0.0)


def test_refused_connection_ejects_at_once_and_ejection_expires() -> None:
    router = _router(3, ejection_base_s=10.0)
    router.begin(0)
    assert router.finish(0, Outcome.REFUSED, now=5.0)
    assert 0 not in {v.replica_id for v in router.routable(5.0)}
    assert 0 not in {v.replica_id for v in router.routable(14.9)}
    assert 0 in {v.replica_id for v in router.routable(15.0)}


def test_consecutive_5xx_eject_and_a_success_resets_the_count() -> None:
    router = _router(3, consecutive_failures_max=3)
    for outcome in (Outcome.SERVER_ERROR, Outcome.TIMEOUT, Outcome.OK, Outcome.SERVER_ERROR):
        router.begin(1)
        assert not router.finish(1, outcome, 0.0)
    router.begin(1)
    assert not router.finish(1, Outcome.RESET, 0.0)
    router.begin(1)
    assert router.finish(1, Outcome.SERVER_ERROR, 0.0)
    view = router.view(1)
    assert view is not None and view.ejections == 1


def test_ejection_time_doubles_and_is_capped() -> None:
    router = _router(4, ejection_base_s=10.0, ejection_max_s=25.0)
    spans = []
    now = 0.0
    for _ in range(3):
        router.begin(0)
        assert router.finish(0, Outcome.REFUSED, now)
        view = router.view(0)
        assert view is not None
        spans.append(view.ejected_until - now)
        now = view.ejected_until
    assert spans == [10.0, 20.0, 25.0]


def test_5xx_never_eject_more_than_the_allowed_fraction() -> None:
    router = _router(3, ejected_fraction_max=0.5, consecutive_failures_max=1)
    router.begin(0)
    router.begin(1)
    assert router.finish(0, Outcome.SERVER_ERROR, 0.0)
    assert not router.finish(1, Outcome.TIMEOUT, 0.0)  # would leave 1 of 3: panic threshold
    single = _router(1, consecutive_failures_max=1)
    single.begin(0)
    assert not single.finish(0, Outcome.SERVER_ERROR, 0.0)  # the only replica stays
    # A refused connection is no capacity at all: it is ejected regardless.
    router.begin(2)
    assert router.finish(2, Outcome.REFUSED, 0.0)


def test_health_probes_need_three_failures_and_a_success_resets() -> None:
    router = _router(1, health_failures_max=3)
    assert not router.health_result(0, alive=False, ready=False)
    assert not router.health_result(0, alive=False, ready=False)
    assert router.pick(0.0, random.Random(0)) == 0  # still in rotation after 2 slow probes
    assert not router.health_result(0, alive=True, ready=True)
    assert not router.health_result(0, alive=False, ready=False)
    assert not router.health_result(0, alive=False, ready=False)
    assert router.health_result(0, alive=False, ready=False)  # third in a row: dead
    assert router.pick(0.0, random.Random(0)) is None


def test_answered_but_not_ready_leaves_rotation_without_being_dead() -> None:
    router = _router(2)
    assert not router.health_result(0, alive=True, ready=False)
    assert {router.pick(0.0, random.Random(i)) for i in range(10)} == {1}


def test_a_standby_gets_no_traffic_until_promoted() -> None:
    router = _router(2)
    router.set_standby(1, True)
    assert {router.pick(0.0, random.Random(i)) for i in range(20)} == {0}
    router.remove(0)
    assert router.pick(0.0, random.Random(0)) is None and not router.any_ready(0.0)
    router.set_standby(1, False)
    assert router.pick(0.0, random.Random(0)) == 1


def test_draining_and_removed_replicas_get_no_new_requests() -> None:
    router = _router(3)
    router.drain(0)
    router.remove(1)
    assert {router.pick(0.0, random.Random(i)) for i in range(20)} == {2}
    assert not router.finish(1, Outcome.OK, 0.0)  # a late finish for a removed replica


def test_misuse_is_a_clear_error() -> None:
    router = _router(1)
    with pytest.raises(ValueError):
        router.add(0)
    with pytest.raises(ValueError):
        router.begin(7)
    with pytest.raises(AssertionError):
        router.finish(0, Outcome.OK, 0.0)  # finish without begin
    with pytest.raises(ValueError):
        RouterConfig(outstanding_max=0)
    with pytest.raises(ValueError):
        RouterConfig(ejected_fraction_max=1.5)


def test_backoff_first_restart_immediate_then_doubles_to_cap_then_resets() -> None:
    backoff = RestartBackoff(BackoffConfig(initial_s=1.0, max_s=60.0, reset_s=30.0))
    delays = [backoff.on_exit(float(t)) for t in range(9)]
    assert delays == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    backoff.healthy(100.0)
    backoff.healthy(110.0)  # only the start of the healthy streak counts
    assert backoff.on_exit(125.0) == 60.0  # 25 s healthy: not long enough
    backoff.healthy(200.0)
    assert backoff.on_exit(230.0) == 0.0  # 30 s healthy: starts over
    assert backoff.on_exit(231.0) == 1.0


def test_backoff_can_wait_from_the_first_restart() -> None:
    backoff = RestartBackoff(BackoffConfig(initial_s=1.0, max_s=60.0, first_immediate=False))
    assert [backoff.on_exit(float(t)) for t in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
