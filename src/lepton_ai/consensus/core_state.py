"""The state every Multi-Paxos replica role shares: ``ReplicaState`` (no I/O).

The fields of a replica (log, promise, role, timers, the outbox of the next ``Ready``),
restoring them from durable state, and the helpers both sides of the protocol use:
queueing a message, stepping down, raising the promise, the membership views.
``core_acceptor.AcceptorSide`` and ``core_proposer.ProposerSide`` build on it;
``core.Replica`` combines them (see ``lepton_ai.consensus.core`` for the protocol).
"""

from __future__ import annotations

from collections.abc import Callable

from lepton_ai.consensus.core_leader import LeaderState
from lepton_ai.consensus.core_log import Log
from lepton_ai.consensus.core_types import DurableState, InvariantError, PaxosConfig
from lepton_ai.consensus.peer_messages import (
    ZERO_BALLOT,
    Ballot,
    Entry,
    PeerMessage,
    Promise,
    Snapshot,
)

FOLLOWER = "follower"
CANDIDATE = "candidate"
LEADER = "leader"


class ReplicaState:
    """The fields of one replica and the helpers every role uses."""

    def __init__(
        self,
        config: PaxosConfig,
        durable: DurableState | None = None,
        *,
        random_fn: Callable[[], float],
    ) -> None:
        if not isinstance(config, PaxosConfig):
            raise TypeError("config must be a PaxosConfig")
        self.config = config
        self.node_id = config.node_id
        self._random = random_fn
        self.log = Log(config.members)
        self.promised: Ballot = ZERO_BALLOT
        self.role = FOLLOWER
        self.leader_id: int | None = None
        self.max_round = 0
        self.ticks = 0
        self.dropped_messages = 0
        self._election_elapsed = 0
        self._heard_elapsed = config.election_ticks_max
        self._election_timeout = self._random_timeout()
        self._heartbeat_elapsed = 0
        self._through = 0
        self._through_ballot: Ballot | None = None
        self._ldr: LeaderState | None = None
        self._promises: dict[int, Promise] = {}
        self._prepared: set[int] = set()
        self._applied = 0
        self._pending_self_through = 0
        self._ready_out = False
        self._commit_written = 0
        self._out_ballot = False
        self._out_entries: list[Entry] = []
        self._out_snapshot: Snapshot | None = None
        self._out_install: Snapshot | None = None
        self._out_messages: list[tuple[int, PeerMessage]] = []
        self._out_reads_failed: list[int] = []
        self._announce_elapsed = config.announce_ticks - 1  # the first tick announces
        # Ever a member (bootstrap or a committed configuration): then leaving every
        # configuration means a committed change removed this replica (``removed``).
        self._member_seen = config.node_id in config.members
        self._removed = False
        if durable is not None:
            self._restore(durable)

    # -- role and promise ------------------------------------------------------------

    def _step_down(self, new_leader: int | None) -> None:
        ldr = self._ldr
        if ldr is not None:
            self._out_reads_failed.extend(rid for rid, _, _ in ldr.reads)
        self._ldr = None
        self._promises = {}
        self.role = FOLLOWER
        self.leader_id = new_leader

    def _set_promised(self, ballot: Ballot) -> None:
        if ballot < self.promised:
            raise InvariantError(f"promise would go back from {self.promised} to {ballot}")
        if ballot != self.promised:
            self.promised = ballot
            self._out_ballot = True

    # -- outbox (what the next Ready carries) ----------------------------------------

    def _send(self, to: int, msg: PeerMessage) -> None:
        self._out_messages.append((to, msg))

    # -- membership ------------------------------------------------------------------

    def _known_members_with_self(self) -> set[int]:
        out = set(self.log.committed_config())
        pending = self.log.pending_config()
        if pending is not None:
            out.update(pending[1])
        return out

    def _known_members(self) -> list[int]:
        return sorted(self._known_members_with_self() - {self.node_id})

    # -- timers and restart ----------------------------------------------------------

    def _random_timeout(self) -> int:
        lo, hi = self.config.election_ticks_min, self.config.election_ticks_max
        r = self._random()
        if not 0.0 <= r < 1.0:
            raise ValueError("random_fn must return a float in [0, 1)")
        return lo + int(r * (hi - lo + 1))

    def _clear_outbox(self) -> None:
        self._out_ballot = False
        self._out_entries = []
        self._out_snapshot = None
        self._out_install = None
        self._out_messages = []
        self._out_reads_failed = []

    def _outbox_nonempty(self) -> bool:
        return bool(
            self._out_ballot
            or self._out_entries
            or self._out_snapshot is not None
            or self._out_install is not None
            or self._out_messages
            or self._out_reads_failed
        )

    def _restore(self, durable: DurableState) -> None:
        self.promised = durable.promised
        self.max_round = durable.promised[0]
        if durable.snapshot is not None and durable.snapshot.slot > 0:
            self.log.install(durable.snapshot)
            self._applied = durable.snapshot.slot
            self._out_install = durable.snapshot
        for entry in durable.entries:
            if entry.slot > self.log.snapshot.slot:
                self.log.put(entry)
        self.log.advance_commit(self.log.held_through(durable.commit))
        self._commit_written = self.log.commit
        held = [self.log.snapshot.members]
        held += [m for s, m in self.log.config_slots.items() if s <= self.log.commit]
        self._member_seen = self._member_seen or any(self.node_id in m for m in held)
