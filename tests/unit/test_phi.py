"""Phi-accrual failure detector: detection time, no false suspicion under jitter, bounds."""

from __future__ import annotations

import random

import pytest

from lepton_ai.monitor.phi import PhiAccrualDetector, PhiConfig, phi_value


def _feed(
    det: PhiAccrualDetector, node: str, until: float, rng: random.Random, jitter: float
) -> float:
    t = 0.0
    while t < until:
        det.heartbeat(node, t)
        t += 0.1 + rng.uniform(-jitter, jitter)
    return t - 0.1


@pytest.mark.parametrize("jitter", [0.0, 0.03, 0.08])
def test_dead_node_is_suspected_within_two_seconds(jitter: float) -> None:
    rng = random.Random(1)
    det = PhiAccrualDetector()
    _feed(det, "a", 30.0, rng, jitter)
    last = det.last_heartbeat("a")
    assert last is not None
    t = last
    while not det.is_suspect("a", t):
        t += 0.01
    assert 0.5 < t - last <= 2.0
    assert det.suspects(t) == ["a"]


def test_regular_heartbeats_with_jitter_are_never_suspected() -> None:
    rng = random.Random(2)
    det = PhiAccrualDetector()
    t = 0.0
    for _ in range(3000):
        det.heartbeat("a", t)
        # occasional 300 ms scheduling hiccups on a loaded machine
        gap = 0.1 + rng.uniform(-0.05, 0.05) + (0.3 if rng.random() < 0.01 else 0.0)
        for probe in (t + gap / 2, t + gap):
            assert not det.is_suspect("a", probe), (t, gap, det.phi("a", probe))
        t += gap


def test_phi_grows_with_silence_and_unknown_nodes_are_fine() -> None:
    det = PhiAccrualDetector()
    for i in range(20):
        det.heartbeat("a", i * 0.1)
    values = [det.phi("a", 1.9 + d) for d in (0.0, 0.2, 0.5, 1.0, 5.0, 100.0)]
    assert values == sorted(values) and values[-1] > 8
    assert det.phi("ghost", 5.0) == 0.0 and not det.is_suspect("ghost", 5.0)
    det.heartbeat("a", 0.5)  # reordered old heartbeat: ignored
    assert det.last_heartbeat("a") == pytest.approx(1.9)
    det.remove("a")
    assert det.nodes() == [] and det.suspects(10.0) == []
    assert phi_value(1e9, 0.1, 0.1) > 100 and phi_value(-1e9, 0.1, 0.1) == 0.0


def test_window_and_node_count_are_bounded() -> None:
    det = PhiAccrualDetector(PhiConfig(window_max=5, nodes_max=2))
    for i in range(100):
        det.heartbeat("a", i * 1.0)
    assert len(det._nodes["a"].samples) == 5
    det.heartbeat("b", 0.0)
    with pytest.raises(ValueError):
        det.heartbeat("c", 0.0)
    with pytest.raises(ValueError):
        PhiConfig(threshold=0)
    with pytest.raises(ValueError):
        PhiConfig(min_std_dev_s=0)


def test_slow_steady_senders_adapt() -> None:
    det = PhiAccrualDetector(PhiConfig(silence_max_s=100.0))
    for i in range(50):
        det.heartbeat("slow", i * 2.0)
    assert not det.is_suspect("slow", 98.0 + 2.2)  # 2 s is its normal interval
    assert det.is_suspect("slow", 98.0 + 6.0)


def test_rearm_after_the_observer_was_paused() -> None:
    det = PhiAccrualDetector()
    for i in range(20):
        det.heartbeat("a", i * 0.1)
        det.heartbeat("b", i * 0.1)
    assert det.suspects(30.0) == ["a", "b"]  # the observer slept 28 s
    det.rearm(30.0)
    assert det.suspects(30.5) == []
    assert len(det._nodes["a"].samples) == 21  # no bogus 28 s interval
