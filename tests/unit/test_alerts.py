"""The alert rules: each raised once while it holds and cleared once after."""

from __future__ import annotations

from lepton_ai.monitor.alerts import (
    ALERTS_MAX,
    HOLD_S,
    JOB_FAILED_HOLD_S,
    Alerts,
    Snapshot,
    evaluate,
)


def keys(s: Snapshot) -> list[str]:
    return sorted(a.key for a in evaluate(s))


def test_a_healthy_cluster_raises_nothing() -> None:
    s = Snapshot(now=100.0, voters=3, voters_reachable=3, disks=(("n1", 10, 100),))
    assert evaluate(s) == []


def test_each_rule() -> None:
    s = Snapshot(
        now=1000.0,
        nodes_down=("worker-2",),
        voters=3,
        voters_reachable=2,
        objects_under_replicated=4,
        objects_unavailable=1,
        failed_jobs=(("j1", 999.0), ("j0", 1000.0 - JOB_FAILED_HOLD_S - 1)),
        replicas=(
            ("r1", "iris", 5, "failed"),
            ("r2", "iris", 9, "ready"),
            ("r3", "iris", 0, "failed"),
        ),
        disks=(("n1", 95, 100), ("n2", 89, 100), ("n3", 5, 0)),
    )
    assert keys(s) == [
        "data_unavailable",
        "data_under_replicated",
        "disk_nearly_full:n1",
        "job_failed:j1",
        "node_down:worker-2",
        "quorum_at_risk",
        "replica_crashloop:r1",
    ]
    assert {a.rule: a.severity for a in evaluate(s)}["quorum_at_risk"] == "critical"


def test_quorum_at_risk_means_one_more_loss_stops_the_cluster() -> None:
    assert keys(Snapshot(now=0, voters=3, voters_reachable=3)) == []
    assert keys(Snapshot(now=0, voters=3, voters_reachable=2)) == ["quorum_at_risk"]
    assert keys(Snapshot(now=0, voters=5, voters_reachable=4)) == []
    assert keys(Snapshot(now=0, voters=5, voters_reachable=3)) == ["quorum_at_risk"]
    assert keys(Snapshot(now=0, voters=1, voters_reachable=1)) == []  # nothing to lose


def test_raised_once_after_holding_its_time_and_cleared_once() -> None:
    alerts = Alerts()
    hold = HOLD_S["node_down"]
    assert alerts.step(Snapshot(now=1.0, nodes_down=("w1",))) == []  # pending
    assert alerts.step(Snapshot(now=1.0 + hold / 2, nodes_down=("w1",))) == []
    first = alerts.step(Snapshot(now=1.0 + hold, nodes_down=("w1",)))
    assert [(t.status, t.alert.key) for t in first] == [("firing", "node_down:w1")]
    assert alerts.step(Snapshot(now=2.0 + hold, nodes_down=("w1",))) == []
    cleared = alerts.step(Snapshot(now=3.0 + hold))
    assert [(t.status, t.alert.key, t.alert.since) for t in cleared] == [
        ("resolved", "node_down:w1", 1.0)  # since: when it started to hold
    ]
    assert alerts.step(Snapshot(now=4.0 + hold)) == []


def test_a_blip_shorter_than_the_hold_never_raises() -> None:
    # A worker killed and restarted by self-healing within a second pages nobody.
    alerts = Alerts()
    assert alerts.step(Snapshot(now=1.0, nodes_down=("w1",))) == []
    assert alerts.step(Snapshot(now=1.5)) == []
    assert alerts.step(Snapshot(now=1.0 + HOLD_S["node_down"], nodes_down=("w1",))) == []
    assert alerts.pending == {"node_down:w1": 1.0 + HOLD_S["node_down"]}


def test_a_failed_job_alert_fires_at_once_and_clears_after_its_window() -> None:
    alerts = Alerts()
    assert len(alerts.step(Snapshot(now=10.0, failed_jobs=(("j", 10.0),)))) == 1
    later = Snapshot(now=10.0 + JOB_FAILED_HOLD_S, failed_jobs=(("j", 10.0),))
    assert [t.status for t in alerts.step(later)] == ["resolved"]


def test_a_storm_is_bounded() -> None:
    alerts = Alerts()
    nodes = tuple(f"w{i}" for i in range(ALERTS_MAX * 10))
    alerts.step(Snapshot(now=1.0, nodes_down=nodes))
    raised = alerts.step(Snapshot(now=1.0 + HOLD_S["node_down"], nodes_down=nodes))
    assert len(raised) == len(alerts.active) == ALERTS_MAX
    assert len(alerts.step(Snapshot(now=100.0))) == ALERTS_MAX  # all cleared
    assert alerts.pending == {}
