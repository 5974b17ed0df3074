"""Coordinator group membership: a pure reconciler that replaces a dead voter by a standby.

Desired state: ``voters`` coordinators vote in the Paxos group and all of them answer.
Observed state (what the leader's consensus core knows, converted to seconds by the
shell, ``node/coord_membership.py``): the committed configuration, whether a change is
pending in the log, how long each voter has been silent, and the standbys (learners)
the leader streams the log to, with how far each has caught up.

Rules, one configuration change at a time (the core allows no more):

* Nothing while a change is in flight (ours, or any pending in the log).
* Fewer voters than ``voters`` and a caught-up, recently heard standby: promote it
  (``AddMember``), provided the live voters alone are a majority of the grown group,
  so the change commits even if that standby vanishes mid-promotion.
* A voter silent for more than ``replace_after_s`` and a standby ready to take its
  place: remove the voter first (``RemoveMember``). The live voters are then a full
  quorum of the smaller group, and the next step promotes the standby. Never remove
  when no standby could replace it, nor the leader itself.
* A failed change is retried with ``Backoff``; each retry re-reads the observation, so a
  voter that came back meanwhile is not removed (flapping), and a new leader's
  reconciler starts from what is committed (a removal done by its predecessor leaves the
  group short: it promotes next).

``EXIT_REMOVED`` is the exit code of a coordinator that learns a committed change
removed it: a supervisor must not restart it (it would only be refused again).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from lepton_ai.heal.backoff import Backoff

EXIT_REMOVED = 3
"""Process exit code of a coordinator removed from the Paxos group (do not restart)."""


@dataclass(frozen=True)
class MembershipConfig:
    voters: int
    """The configured number of voting coordinators (the bootstrap group's size)."""
    replace_after_s: float = 10.0
    """A voter silent this long is replaced by a standby (when one is ready)."""
    caught_up_slots: int = 64
    """A standby at most this many slots behind the commit point counts as caught up."""
    standby_silent_max_s: float = 1.5
    """A standby not heard from for this long is not promoted (it may be gone)."""
    backoff: Backoff = field(default_factory=lambda: Backoff(initial_s=0.5, max_s=5.0))

    def __post_init__(self) -> None:
        if self.voters < 1:
            raise ValueError(f"voters must be >= 1, got {self.voters}")
        if not self.replace_after_s > 0:
            raise ValueError(f"replace_after_s must be > 0, got {self.replace_after_s}")
        if self.caught_up_slots < 0 or not self.standby_silent_max_s > 0:
            raise ValueError("need caught_up_slots >= 0 and standby_silent_max_s > 0")


@dataclass(frozen=True)
class StandbyView:
    """A learner as the leader sees it: the highest slot it acknowledged (``match``)."""

    node: int
    address: str
    match: int
    silent_s: float


@dataclass(frozen=True)
class Observed:
    leader: int
    """This replica (the leader running the reconciler)."""
    members: tuple[int, ...]
    """The committed configuration."""
    pending: bool
    """A configuration change is in the log and not yet committed."""
    commit: int
    silent_s: Mapping[int, float]
    """Every other member of ``members``: seconds since the leader last heard from it."""
    standbys: tuple[StandbyView, ...] = ()


@dataclass(frozen=True)
class RemoveMember:
    node: int
    silent_s: float
    replacement: int
    """The standby expected to take its place (promoted by a later step)."""


@dataclass(frozen=True)
class AddMember:
    node: int
    address: str


MembershipAction = RemoveMember | AddMember


def majority(n: int) -> int:
    return n // 2 + 1


class MembershipReconciler:
    """Run by the leader only: ``step`` at a steady interval, ``finished`` when the change
    it asked for committed or failed. A new leadership starts a new reconciler."""

    def __init__(self, config: MembershipConfig) -> None:
        self.config = config
        self.in_flight: MembershipAction | None = None
        self.failures = 0
        self.last_failure_at = 0.0
        self.changes = 0

    def step(self, observed: Observed, now: float) -> list[MembershipAction]:
        """The change to make now, if any (at most one, and none while one is pending)."""
        if self.in_flight is not None or observed.pending:
            return []
        if not self.config.backoff.ready(now, self.last_failure_at, self.failures):
            return []
        action = self._decide(observed)
        if action is not None:
            self.in_flight = action
            return [action]
        return []

    def finished(self, action: MembershipAction, ok: bool, now: float) -> None:
        """The change ``action`` committed (``ok``) or failed (retried after a back-off,
        re-deciding from the observation then)."""
        if action != self.in_flight:
            return  # a stale report (from before a reset): ignore it
        self.in_flight = None
        if ok:
            self.failures = 0
            self.changes += 1
        else:
            self.failures += 1
            self.last_failure_at = now

    def _decide(self, observed: Observed) -> MembershipAction | None:
        members = observed.members
        live = [m for m in members if self._live(observed, m)]
        silent = {m: observed.silent_s.get(m, float("inf")) for m in members if m not in live}
        dead = sorted(silent, key=lambda m: (-silent[m], m))
        ready = self._ready_standbys(observed)
        if not ready:
            return None
        if len(members) < self.config.voters:
            # The live voters alone must carry the grown group: then the add commits even
            # if the standby dies mid-promotion (it is replaced in turn later).
            if len(live) >= majority(len(members) + 1):
                best = ready[0]
                return AddMember(best.node, best.address)
            return None
        if not dead:
            return None
        victim = dead[0]
        # The removal needs a quorum of the current group from the live voters, and so
        # does the promotion after it (the group grows back to this size).
        if len(live) >= majority(len(members)):
            return RemoveMember(victim, silent[victim], ready[0].node)
        return None

    def _live(self, observed: Observed, member: int) -> bool:
        if member == observed.leader:
            return True
        silent = observed.silent_s.get(member)
        return silent is not None and silent <= self.config.replace_after_s

    def _ready_standbys(self, observed: Observed) -> list[StandbyView]:
        """Standbys fit to vote: recently heard and caught up; the most caught up first."""
        floor = observed.commit - self.config.caught_up_slots
        fit = [
            s
            for s in observed.standbys
            if s.node not in observed.members
            and s.silent_s <= self.config.standby_silent_max_s
            and s.match >= floor
        ]
        return sorted(fit, key=lambda s: (-s.match, s.node))

    def status(self) -> dict[str, object]:
        return {
            "in_flight": repr(self.in_flight) if self.in_flight is not None else None,
            "failures": self.failures,
            "changes": self.changes,
        }
