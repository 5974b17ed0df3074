"""Configuration, durable state, the Ready batch and errors of the Multi-Paxos core.

See ``lepton_ai.consensus.core`` for the protocol and the runtime's loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lepton_ai.consensus.log_host import NotLeader
from lepton_ai.consensus.peer_messages import (
    ZERO_BALLOT,
    Ballot,
    Entry,
    PeerMessage,
    Snapshot,
    Value,
)
from lepton_ai.errors import InvariantError, LeptonError  # InvariantError: re-exported

__all__ = [
    "DurableState",
    "InvariantError",
    "LearnerStatus",
    "NotLeader",
    "Overloaded",
    "PaxosConfig",
    "ProposalId",
    "Ready",
]


class Overloaded(LeptonError):
    """The leader's bounded pipeline and batch are full; retry after commits drain."""


@dataclass(frozen=True, slots=True)
class PaxosConfig:
    """Static settings of one replica. Every bound is named; ticks are the unit of time.

    ``members`` is the bootstrap configuration and must be identical on every initial
    replica. A replica joining later is started with the *current* members (without
    itself); it does not campaign until a committed configuration includes it.
    """

    node_id: int
    members: tuple[int, ...]
    election_ticks_min: int = 10
    election_ticks_max: int = 20
    heartbeat_ticks: int = 2
    retransmit_ticks: int = 4
    """A follower whose acknowledged slot did not move for this long is resent from it."""
    inflight_max: int = 1024
    """Slots proposed by the leader and not yet committed (the pipeline window)."""
    batch_commands_max: int = 1024
    """Client commands in one slot."""
    batch_bytes_max: int = (1 << 20) + (64 << 10)
    """Command bytes in one slot: room for one KV value of ``value_bytes_max`` (1 MiB)
    with its key (up to 1 KiB) and the command's own encoding."""
    catchup_entries_max: int = 256
    """Slots in one Accept message (catch-up and pipelining alike)."""
    snapshot_entries: int = 10_000
    """Compact the log once this many slots were applied since the last snapshot."""
    log_retain_entries: int = 1_000
    """Slots kept below the snapshot point so a slightly lagging peer needs no snapshot."""
    reads_pending_max: int = 4_096
    """Read-index requests waiting for confirmation or application."""
    leader_stickiness: bool = True
    """Ignore a Prepare while a leader was heard within ``election_ticks_min`` ticks, so a
    rejoining or flapping node does not depose a healthy leader."""
    check_quorum: bool = True
    """A leader that heard from no quorum for ``election_ticks_max`` ticks steps down."""
    learner: bool = False
    """A standby: while no configuration includes this replica it sends ``Announce`` (with
    ``address``) to the members every ``announce_ticks``, so whichever of them leads
    streams it the log. It never campaigns and never counts for a quorum until a
    committed change adds it."""
    address: str = ""
    """This replica's address as its peers dial it; opaque to the core (only announced)."""
    announce_ticks: int = 10
    learners_max: int = 8
    """Learners a leader streams the log to; announcements beyond are ignored."""
    learner_timeout_ticks: int = 100
    """A leader forgets a learner it has not heard from for this long."""

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, int) or self.node_id < 0:
            raise ValueError(f"node_id must be a non-negative int, got {self.node_id!r}")
        if len(set(self.members)) != len(self.members):
            raise ValueError(f"members has duplicates: {self.members!r}")
        if any(not isinstance(m, int) or m < 0 for m in self.members):
            raise ValueError(f"members must be non-negative ints: {self.members!r}")
        if not 1 <= self.election_ticks_min <= self.election_ticks_max:
            raise ValueError("need 1 <= election_ticks_min <= election_ticks_max")
        if not 1 <= self.heartbeat_ticks < self.election_ticks_min:
            raise ValueError("need 1 <= heartbeat_ticks < election_ticks_min")
        for name in (
            "retransmit_ticks",
            "inflight_max",
            "batch_commands_max",
            "batch_bytes_max",
            "catchup_entries_max",
            "snapshot_entries",
            "reads_pending_max",
            "announce_ticks",
            "learners_max",
            "learner_timeout_ticks",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.log_retain_entries < 0:
            raise ValueError("log_retain_entries must be >= 0")


@dataclass(frozen=True, slots=True)
class LearnerStatus:
    """What a leader knows of one learner (a standby): where it listens, the highest slot
    it acknowledged holding, and how many ticks ago it was last heard from."""

    node: int
    address: str
    match: int
    silent_ticks: int


@dataclass(slots=True)
class DurableState:
    """What a replica persisted, handed back to ``Replica`` on restart.

    ``entries``: every persisted Entry in write order; for a slot the last one wins, and
    entries at or below ``snapshot.slot`` are ignored. ``commit`` is an optional hint (it
    needs no fsync); it must never be written ahead of the entries it covers.
    """

    promised: Ballot = ZERO_BALLOT
    entries: list[Entry] = field(default_factory=list)
    snapshot: Snapshot | None = None
    commit: int = 0


@dataclass(frozen=True, slots=True)
class ProposalId:
    """Where a proposed command went: ``commands[index]`` of slot ``slot``, proposed at
    ballot ``origin``. When ``slot`` is committed, the command was chosen iff the
    committed value has ``kind == KIND_COMMANDS`` (or KIND_CONFIG for a membership
    change) and ``value.origin == origin``; otherwise it was lost and may be retried."""

    slot: int
    origin: Ballot
    index: int

    def matches(self, value: Value) -> bool:
        """True iff ``value`` (committed at ``self.slot``) is the one this proposal made."""
        return value.origin == self.origin and self.index < max(1, len(value.commands))


@dataclass(slots=True)
class Ready:
    """One batch of work for the runtime, in this order:

    1. persist ``persist_ballot``, ``persist_entries`` (in order), ``persist_snapshot`` and
       then ``persist_commit``; fsync if ``must_sync``;
    2. send ``messages`` (only after step 1: a promise or acceptance must be durable;
       a leader's ``Accept``/``Heartbeat`` carry no vote of the sender and may go before
       step 1, as the driver does to overlap the leader's and followers' fdatasyncs: the
       leader's own acceptance counts only in a later Ready, after this one is durable);
    3. restore ``snapshot_to_install`` into the state machine, if set;
    4. apply ``committed`` in order (skip KIND_NOOP, apply KIND_COMMANDS' commands in
       order, note KIND_CONFIG), answer ``reads_ready`` / ``reads_failed``;
    5. call ``Replica.advance(ready)``.
    """

    persist_ballot: Ballot | None = None
    persist_entries: list[Entry] = field(default_factory=list)
    persist_snapshot: Snapshot | None = None
    persist_commit: int | None = None
    messages: list[tuple[int, PeerMessage]] = field(default_factory=list)
    snapshot_to_install: Snapshot | None = None
    committed: list[tuple[int, Value]] = field(default_factory=list)
    reads_ready: list[int] = field(default_factory=list)
    reads_failed: list[int] = field(default_factory=list)
    leader: int | None = None
    is_leader: bool = False
    ballot: Ballot = ZERO_BALLOT
    commit: int = 0

    @property
    def must_sync(self) -> bool:
        """True when something here must be fsynced before ``messages`` leave."""
        return (
            self.persist_ballot is not None
            or bool(self.persist_entries)
            or self.persist_snapshot is not None
        )

    def is_empty(self) -> bool:
        return not (
            self.must_sync
            or self.persist_commit is not None
            or self.messages
            or self.snapshot_to_install is not None
            or self.committed
            or self.reads_ready
            or self.reads_failed
        )
