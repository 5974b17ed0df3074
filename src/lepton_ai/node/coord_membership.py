"""The coordinators' membership shell: standbys replace dead voters; a removed one exits.

Runs on every coordinator replica, a small loop every ``STEP_INTERVAL_S``:

* On the leader (confirmed: its ``LeaderElected`` committed) it observes the consensus
  core (committed members, a pending change, each voter's silence, the learners and
  their acknowledged slot), steps ``heal.membership.MembershipReconciler`` and carries
  out its action with ``ReplicaDriver.change_members_cb``; each committed change goes on
  the replicated timeline (``coordinator_removed``, ``standby_promoted``). A new
  leadership starts a new reconciler, which continues from what is committed.
* On any replica, once its core knows a committed change removed it
  (``Replica.removed``), the loop raises ``MemberRemoved``: the program logs it and
  exits with ``EXIT_REMOVED`` (3), so a supervisor does not restart it forever.

A standby is started as ``lepton coordinator --standby --id N --peers <voters and
itself>``; see ``node.replicated.serve_replicated``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from lepton_ai.consensus.driver import ReplicaDriver
from lepton_ai.errors import LeptonError
from lepton_ai.heal.membership import (
    EXIT_REMOVED,
    AddMember,
    MembershipAction,
    MembershipConfig,
    MembershipReconciler,
    Observed,
    RemoveMember,
    StandbyView,
)
from lepton_ai.monitor.events import EventKind

__all__ = ["EXIT_REMOVED", "MemberRemoved", "MembershipShell"]

log = logging.getLogger("lepton_ai.coordinator.membership")

STEP_INTERVAL_S = 0.25


class MemberRemoved(LeptonError):
    """A committed membership change removed this coordinator: it must stop for good."""


class Timeline(Protocol):
    """What the shell needs of the coordinator."""

    @property
    def leading(self) -> bool: ...

    def event(
        self, kind: EventKind, detail: str = "", job_id: str = "", t: float = 0.0
    ) -> None: ...


class MembershipShell:
    """Owns the reconciler of the current leadership; ``run`` until cancelled or removed."""

    def __init__(
        self,
        timeline: Timeline,
        driver: ReplicaDriver,
        config: MembershipConfig,
        *,
        interval_s: float = STEP_INTERVAL_S,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self.timeline = timeline
        self.driver = driver
        self.config = config
        self.interval_s = interval_s
        self.reconciler: MembershipReconciler | None = None
        self._term: tuple[int, int] | None = None  # the ballot the reconciler serves

    async def run(self) -> None:
        while True:
            if self.driver.removed:
                node = self.driver.node_id
                log.error(
                    "coordinator %s: a committed membership change removed it from the "
                    "group; exiting with code %d (do not restart it)",
                    node,
                    EXIT_REMOVED,
                )
                raise MemberRemoved(f"coordinator {node} was removed from the group")
            self.step(time.monotonic())
            await asyncio.sleep(self.interval_s)

    def step(self, now: float) -> None:
        """One reconciliation on a confirmed leader; forget the reconciler otherwise."""
        driver = self.driver
        if not (driver.is_leader and self.timeline.leading):
            self.reconciler = None
            self._term = None
            return
        ballot = driver.core.promised
        if self.reconciler is None or self._term != ballot:
            self.reconciler = MembershipReconciler(self.config)
            self._term = ballot
        for action in self.reconciler.step(self.observe(), now):
            self._carry_out(self.reconciler, action)

    def observe(self) -> Observed:
        core = self.driver.core
        tick_s = self.driver.config.tick_s
        standbys = tuple(
            StandbyView(s.node, s.address, s.match, s.silent_ticks * tick_s)
            for s in core.learner_status()
        )
        return Observed(
            leader=core.node_id,
            members=core.members,
            pending=core.log.pending_config() is not None,
            commit=core.commit,
            silent_s={m: t * tick_s for m, t in core.member_silence_ticks().items()},
            standbys=standbys,
        )

    def _carry_out(self, reconciler: MembershipReconciler, action: MembershipAction) -> None:
        if isinstance(action, RemoveMember):
            add, node, address = False, action.node, ""
            log.warning(
                "coordinator %s unheard for %.1f s: removing it (standby %s replaces it)",
                action.node,
                action.silent_s,
                action.replacement,
            )
        else:
            add, node, address = True, action.node, action.address
            log.warning("promoting standby %s (%s) to voter", action.node, action.address)

        def done(result: bytes | None, error: BaseException | None) -> None:
            ok = error is None
            reconciler.finished(action, ok, time.monotonic())
            if not ok:
                log.warning("membership change %r failed: %s", action, error)
            elif reconciler is self.reconciler:
                self._record(action)

        self.driver.change_members_cb(add, node, address, done)

    def _record(self, action: MembershipAction) -> None:
        if isinstance(action, RemoveMember):
            self.timeline.event(
                EventKind.COORDINATOR_REMOVED,
                f"coordinator {action.node} removed after {action.silent_s:.1f} s unheard; "
                f"standby {action.replacement} replaces it",
            )
        elif isinstance(action, AddMember):
            self.timeline.event(
                EventKind.STANDBY_PROMOTED, f"standby {action.node} ({action.address}) now votes"
            )
