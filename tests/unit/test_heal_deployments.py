"""The deployment reconciler (``heal/deployments.py``) and the spec machine (``serve/spec.py``).

A seeded simulation drives the reconciler as the leader does: agents start what
they are assigned (ready a few steps later), nodes die and join, the leader changes
(a fresh reconciler adopting what the agents report), specs change (scale, update,
rollback). Invariants: never more on a node than its slots, a rollout never drops
the ready count below what was ready and wanted, and at quiet the wanted count of
the wanted version is ready. A failure prints its seed.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from dataclasses import dataclass, field

import pytest

from lepton_ai.heal.autoscale import Autoscaler, Load, ScaleDecision, wanted_replicas
from lepton_ai.heal.deployments import (
    Assign,
    DeployEvent,
    DeploymentReconciler,
    NodeServe,
    Publish,
)
from lepton_ai.serve.spec import (
    DEPLOYMENTS_MAX,
    Autoscale,
    DeleteDeployment,
    DeploymentsMachine,
    DeploymentSpec,
    PutDeployment,
    ReplicaAssignment,
    ReplicaReport,
    RollbackDeployment,
    ScaleDeployment,
    decode_deploy_command,
    encode_deploy_command,
)


# ------------------------------------------------------------------ a simulated agent
@dataclass
class Agent:
    slots: int
    assigned: list[ReplicaAssignment] = field(default_factory=list)
    age: dict[str, int] = field(default_factory=dict)  # replica id -> steps since its start
    broken: set[str] = field(default_factory=set)  # targets that never get ready

    def view(self, node: str) -> NodeServe:
        reports = tuple(
            ReplicaReport(
                a.replica_id,
                a.deployment,
                a.version,
                "ready" if self._ready(a) else "starting",
                url=f"http://{node}/{a.replica_id}" if self._ready(a) else "",
            )
            for a in self.assigned
        )
        return NodeServe(self.slots, reports, f"http://{node}:80")

    def _ready(self, a: ReplicaAssignment) -> bool:
        return self.age.get(a.replica_id, 0) >= 2 and a.target not in self.broken

    def tick(self) -> None:
        for a in self.assigned:
            self.age[a.replica_id] = self.age.get(a.replica_id, 0) + 1

    def take(self, replicas: list[ReplicaAssignment]) -> None:
        # Ids name replicas: one the agent runs keeps running (its target known here).
        known = {a.replica_id: a for a in self.assigned}
        self.assigned = [known.get(a.replica_id, a) for a in replicas]


def _spec(
    name: str = "iris", replicas: int = 3, version: int = 1, target: str = "m:v1"
) -> DeploymentSpec:
    return DeploymentSpec(name, target, replicas, version)


def _run(
    rec: DeploymentReconciler,
    specs: dict[str, DeploymentSpec],
    agents: dict[str, Agent],
    steps: int = 1,
) -> list[object]:
    out: list[object] = []
    for _ in range(steps):
        acts = rec.step(specs, {n: a.view(n) for n, a in agents.items()})
        for act in acts:
            if isinstance(act, Assign):
                agents[act.node].take(act.replicas)
        for a in agents.values():
            a.tick()
        out += acts
    return out


def _ready(agents: dict[str, Agent], name: str, version: int | None = None) -> int:
    return sum(
        1
        for n, a in agents.items()
        for r in a.view(n).replicas
        if r.deployment == name and r.state == "ready" and version in (None, r.version)
    )


def test_replicas_spread_over_nodes_and_respect_slots() -> None:
    agents = {"a": Agent(2), "b": Agent(2), "c": Agent(1)}
    rec = DeploymentReconciler(epoch=1)
    acts = _run(rec, {"iris": _spec(replicas=3)}, agents, 4)
    assert sorted(len(a.assigned) for a in agents.values()) == [1, 1, 1]  # one per node
    assert _ready(agents, "iris") == 3
    published = [a for a in acts if isinstance(a, Publish)]
    assert len(published[-1].endpoints) == 3
    # Five more than the slots hold: placed up to 5 in all, then "unschedulable" once.
    acts = _run(rec, {"iris": _spec(replicas=8)}, agents, 3)
    assert sum(len(a.assigned) for a in agents.values()) == 5
    stuck = [a for a in acts if isinstance(a, DeployEvent) and a.kind == "unschedulable"]
    assert len(stuck) == 1, stuck


def test_a_lost_node_s_replicas_are_placed_on_the_survivors() -> None:
    agents = {"a": Agent(4), "b": Agent(4), "c": Agent(4)}
    rec = DeploymentReconciler(epoch=1)
    _run(rec, {"iris": _spec(replicas=3)}, agents, 4)
    del agents["b"]
    acts = _run(rec, {"iris": _spec(replicas=3)}, agents, 4)
    lost = [a for a in acts if isinstance(a, DeployEvent) and a.kind == "replica_lost"]
    assert len(lost) == 1 and "node b" in lost[0].detail
    assert _ready(agents, "iris") == 3 and sorted(len(a.assigned) for a in agents.values()) == [
        1,
        2,
    ]


def test_a_node_that_comes_back_gets_its_share_again_without_a_gap() -> None:
    """Both replicas end up on one node after the other died; when a node joins, one
    moves there (a new one ready first, then the crowded node's goes)."""
    agents = {"a": Agent(4), "b": Agent(4)}
    rec = DeploymentReconciler(epoch=1)
    specs = {"iris": _spec(replicas=2)}
    _run(rec, specs, agents, 4)
    del agents["b"]
    _run(rec, specs, agents, 4)
    assert len(agents["a"].assigned) == 2
    agents["c"] = Agent(4)
    moved = []
    for _ in range(10):
        moved += [
            a
            for a in _run(rec, specs, agents)
            if isinstance(a, DeployEvent) and "spread" in a.detail
        ]
        assert _ready(agents, "iris") >= 2  # never fewer ready than wanted
    assert [len(a.assigned) for a in agents.values()] == [1, 1] and len(moved) == 1, moved


def test_rolling_update_keeps_the_ready_count_and_surges_by_one() -> None:
    agents = {"a": Agent(4), "b": Agent(4)}
    rec = DeploymentReconciler(epoch=1)
    _run(rec, {"iris": _spec(replicas=3)}, agents, 4)
    specs = {"iris": _spec(replicas=3, version=2, target="m:v2")}
    for _ in range(40):
        _run(rec, specs, agents)
        total = sum(len(a.assigned) for a in agents.values())
        assert total <= 4, "more than one replica beyond the wanted count"
        assert _ready(agents, "iris") >= 3
    assert _ready(agents, "iris", 2) == 3 and _ready(agents, "iris", 1) == 0


def test_a_new_version_that_never_gets_ready_leaves_the_old_one_serving() -> None:
    agents = {"a": Agent(4), "b": Agent(4)}
    for a in agents.values():
        a.broken.add("m:bad")
    rec = DeploymentReconciler(epoch=1)
    _run(rec, {"iris": _spec(replicas=2)}, agents, 4)
    _run(rec, {"iris": _spec(replicas=2, version=2, target="m:bad")}, agents, 20)
    assert _ready(agents, "iris", 1) == 2
    assert sum(len(a.assigned) for a in agents.values()) == 3  # one surge replica trying


def test_a_new_leader_adopts_running_replicas_and_restarts_none() -> None:
    agents = {"a": Agent(4), "b": Agent(4)}
    specs = {"iris": _spec(replicas=3)}
    _run(DeploymentReconciler(epoch=1), specs, agents, 4)
    before = {n: [r.replica_id for r in a.assigned] for n, a in agents.items()}
    acts = _run(DeploymentReconciler(epoch=2), specs, agents, 3)
    assert {n: [r.replica_id for r in a.assigned] for n, a in agents.items()} == before
    assert not [a for a in acts if isinstance(a, DeployEvent)], acts


def test_delete_and_scale_down_remove_not_ready_first() -> None:
    agents = {"a": Agent(8)}
    rec = DeploymentReconciler(epoch=1)
    _run(rec, {"iris": _spec(replicas=2)}, agents, 4)
    _run(rec, {"iris": _spec(replicas=4)}, agents, 1)  # two new ones, not ready yet
    ready_ids = {r.replica_id for r in agents["a"].view("a").replicas if r.state == "ready"}
    _run(rec, {"iris": _spec(replicas=2)}, agents, 1)
    assert {a.replica_id for a in agents["a"].assigned} == ready_ids
    acts = _run(rec, {}, agents, 1)
    assert agents["a"].assigned == []
    assert [a.endpoints for a in acts if isinstance(a, Publish)] == [[]]


SEEDS = int(os.environ.get("LEPTON_SIM_SEEDS", "200"))


@pytest.mark.parametrize("seed", range(SEEDS))
def test_simulated_nodes_leaders_and_spec_changes(seed: int) -> None:
    rng = random.Random(seed)
    agents = {f"n{i}": Agent(rng.randint(1, 4)) for i in range(rng.randint(1, 5))}
    next_node = len(agents)
    specs = {f"d{i}": _spec(f"d{i}", rng.randint(0, 3)) for i in range(rng.randint(1, 3))}
    rec = DeploymentReconciler(epoch=1)
    for step in range(300):
        if step < 200 and rng.random() < 0.05:
            _fault(rng, agents, specs)
            if rng.random() < 0.3 and len(agents) < 6:
                agents[f"n{next_node}"] = Agent(rng.randint(1, 4))
                next_node += 1
        if step < 200 and rng.random() < 0.02:
            rec = DeploymentReconciler(epoch=rec.epoch + 1)  # a new leader
        _run(rec, specs, agents)
        for n, a in agents.items():
            assert len(a.assigned) <= a.slots, f"seed {seed}: node {n} over its slots"
        ids = Counter(r.replica_id for a in agents.values() for r in a.assigned)
        assert all(c == 1 for c in ids.values()), f"seed {seed}: a replica on two nodes"
    slots = sum(a.slots for a in agents.values())
    if sum(s.replicas for s in specs.values()) <= slots:
        for name, spec in specs.items():
            got = _ready(agents, name, spec.version)
            assert got == spec.replicas, f"seed {seed}: {name} {got}/{spec.replicas} ready"
            assert _ready(agents, name) == spec.replicas, f"seed {seed}: {name} old ones left"
            # Spread: no node with a free slot holds 2+ fewer of it than the fullest.
            per = Counter(n for n, a in agents.items() for r in a.assigned if r.deployment == name)
            free = [n for n, a in agents.items() if len(a.assigned) < a.slots]
            most = max(per.values(), default=0)
            assert all(most - per[n] < 2 for n in free), f"seed {seed}: {name} bunched {per}"


def _fault(rng: random.Random, agents: dict[str, Agent], specs: dict[str, DeploymentSpec]) -> None:
    what = rng.choice(("kill", "scale", "update"))
    if what == "kill" and len(agents) > 1:
        del agents[rng.choice(sorted(agents))]
    name = rng.choice(sorted(specs))
    s = specs[name]
    if what == "scale":
        specs[name] = _spec(name, rng.randint(0, 4), s.version, s.target)
    elif what == "update":
        specs[name] = _spec(name, s.replicas, s.version + 1, f"m:v{s.version + 1}")


# ------------------------------------------------------------------ the spec machine
def test_machine_versions_scale_rollback_and_delete() -> None:
    m = DeploymentsMachine()
    res = m.apply_command(PutDeployment(DeploymentSpec("iris", "m:v1", 2)))
    assert res.ok and res.spec is not None and res.spec.version == 1
    # A create retried after it committed is done; another create of the name is refused.
    assert m.apply_command(PutDeployment(DeploymentSpec("iris", "m:v1", 2), create_only=True)).ok
    taken = m.apply_command(PutDeployment(DeploymentSpec("iris", "m:v9", 2), create_only=True))
    assert not taken.ok and taken.kind == "exists"
    assert m.apply_command(ScaleDeployment("iris", 4)).spec == DeploymentSpec("iris", "m:v1", 4, 1)
    res = m.apply_command(PutDeployment(DeploymentSpec("iris", "m:v2", 4)))
    assert res.spec is not None and res.spec.version == 2
    stale = m.apply_command(PutDeployment(DeploymentSpec("iris", "m:v3", 4), expect_version=1))
    assert not stale.ok and "version 2" in stale.error
    back = m.apply_command(RollbackDeployment("iris"))
    assert back.spec == DeploymentSpec("iris", "m:v1", 4, 3)
    again = m.apply_command(RollbackDeployment("iris"))  # undoes the undo, as kubectl does
    assert again.spec is not None and again.spec.target == "m:v2" and again.spec.version == 4
    copy = DeploymentsMachine()
    copy.restore(m.snapshot())
    assert copy.specs == m.specs and copy.history == m.history
    assert m.apply_command(DeleteDeployment("iris")).ok
    assert not m.apply_command(DeleteDeployment("iris")).ok
    assert not m.apply_command(RollbackDeployment("iris")).ok


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        (DeploymentSpec("Iris", "m:f", 1), "deployment name"),
        (DeploymentSpec("-x", "m:f", 1), "deployment name"),
        (DeploymentSpec("x" * 64, "m:f", 1), "deployment name"),
        (DeploymentSpec("iris", "m:f", 65), "replicas"),
        (DeploymentSpec("iris", "m:f", -1), "replicas"),
        (DeploymentSpec("iris", "", 1), "target"),
        (DeploymentSpec("iris", "m:f", 1, max_batch_size=-1), "max_batch_size"),
    ],
)
def test_machine_refuses_bad_specs_and_changes_nothing(spec: DeploymentSpec, words: str) -> None:
    m = DeploymentsMachine()
    res = m.apply_command(PutDeployment(spec))
    assert not res.ok and words in res.error and m.specs == {}


def test_machine_bounds_deployments_and_history() -> None:
    m = DeploymentsMachine()
    for i in range(DEPLOYMENTS_MAX):
        assert m.apply_command(PutDeployment(DeploymentSpec(f"d{i}", "m:f", 0))).ok
    res = m.apply_command(PutDeployment(DeploymentSpec("one-more", "m:f", 0)))
    assert not res.ok and str(DEPLOYMENTS_MAX) in res.error
    for v in range(100):
        m.apply_command(PutDeployment(DeploymentSpec("d0", f"m:v{v}", 0)))
    assert len(m.history["d0"]) == 11 and m.specs["d0"].version == 101


def test_commands_round_trip_and_foreign_bytes_are_refused() -> None:
    cmd = PutDeployment(DeploymentSpec("iris", "m:f", 2), expect_version=3)
    assert decode_deploy_command(encode_deploy_command(cmd)) == cmd
    with pytest.raises(ValueError):
        decode_deploy_command(b"\x81\xa4type\xa3Put")


# ------------------------------------------------------------------ the autoscaler
POLICY = Autoscale(1, 4, target_inflight=2.0, scale_up_delay_s=1.0, scale_down_delay_s=5.0)


def _feed(
    scaler: Autoscaler, replicas: int, in_flight: int, t0: float, t1: float
) -> tuple[float, ScaleDecision | None]:
    """Samples every 0.1 s from t0 until a decision or t1; (when, decision)."""
    t = t0
    while t <= t1:
        d = scaler.step("iris", POLICY, Load(replicas, replicas, in_flight), t)
        if d is not None:
            return t, d
        t = round(t + 0.1, 1)
    return t, None


def test_autoscaler_scales_up_after_the_delay_and_down_after_a_longer_one() -> None:
    s = Autoscaler()
    assert wanted_replicas(POLICY, 7) == 4 and wanted_replicas(POLICY, 0) == 1
    assert wanted_replicas(POLICY, 1_000) == 4  # clamped to max_replicas
    t, d = _feed(s, 1, 7, 0.0, 10.0)
    assert d is not None and d.replicas == 4 and t == pytest.approx(1.0)
    assert "7 requests in flight" in d.detail and "1 -> 4" in d.detail
    # A short lull does not scale down; a long one does, to what the lull still wants.
    t, d = _feed(s, 4, 3, t, t + 4.0)
    assert d is None
    t, d = _feed(s, 4, 3, t, t + 10.0)
    assert d is not None and d.replicas == 2


def test_autoscaler_ignores_a_burst_shorter_than_the_up_delay() -> None:
    s = Autoscaler()
    t, d = _feed(s, 1, 8, 0.0, 0.5)
    assert d is None
    t, d = _feed(s, 1, 0, t + 0.1, t + 3.0)  # the burst is over before the delay
    assert d is None


def test_autoscaler_brings_a_count_back_inside_the_bounds_at_once() -> None:
    s = Autoscaler()
    d = s.step("iris", POLICY, Load(9, 9, 0), 0.0)
    assert d is not None and d.replicas == 4


@pytest.mark.parametrize(
    "bad",
    [
        Autoscale(3, 2),
        Autoscale(0, 0),
        Autoscale(1, 65),
        Autoscale(1, 2, target_inflight=0),
        Autoscale(1, 2, scale_down_delay_s=-1),
    ],
)
def test_bad_autoscale_policies_are_refused(bad: Autoscale) -> None:
    m = DeploymentsMachine()
    res = m.apply_command(PutDeployment(DeploymentSpec("iris", "m:f", 1, autoscale=bad)))
    assert not res.ok and m.specs == {}


def test_a_policy_change_keeps_the_version() -> None:
    m = DeploymentsMachine()
    m.apply_command(PutDeployment(DeploymentSpec("iris", "m:f", 1)))
    res = m.apply_command(PutDeployment(DeploymentSpec("iris", "m:f", 1, autoscale=POLICY)))
    assert res.spec is not None and res.spec.version == 1 and res.spec.autoscale == POLICY
