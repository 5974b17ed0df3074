"""The sans-I/O Multi-Paxos replica: ``Replica`` (no asyncio, sockets, clocks or randomness).

Protocol
--------
* Ballots are ``(round, node_id)``. A replica whose election timeout (a random number of
  ticks in ``[election_ticks_min, election_ticks_max]``, drawn from the injected
  ``random_fn``) expires becomes a candidate: it promises itself a ballot above every
  round it has seen and sends ``Prepare(ballot, commit)``.
* Phase 1 runs once per leadership. Each ``Promise`` carries the acceptor's accepted
  values above the candidate's commit point. With a majority of every configuration it
  knows of (committed and pending), the candidate keeps, per slot, a value known chosen,
  else the value accepted at the highest ballot, else a no-op; it re-proposes them all at
  its ballot and appends one no-op (``start_slot``).
* Phase 2 is per slot, pipelined: the leader seals client commands into batches (one
  slot per batch, ``batch_commands_max`` / ``batch_bytes_max``) while at most
  ``inflight_max`` slots are uncommitted, and streams contiguous runs of slots in
  ``Accept`` messages. Acknowledgements are cumulative (``Accepted.through``: every slot
  up to it accepted at this ballot or known chosen), so a slot is chosen once a majority
  of the current configuration (and of a pending one) acknowledged it. The commit point
  rides on every Accept and Heartbeat; a follower marks a slot chosen only if it accepted
  it at the leader's ballot.
* An acceptor refuses a lower ballot with ``Nack(NACK_STALE, promised)``; the proposer
  steps down and later campaigns above it. A message whose leader ballot is not the
  sender's own is dropped (a peer cannot speak for another).
* A lagging peer is resent from its acknowledged slot (``gap`` or no progress for
  ``retransmit_ticks``); one below the leader's compacted log gets ``InstallSnapshot``.
* Membership changes one replica at a time: a KIND_CONFIG entry takes effect when
  committed; only one may be pending, and only after the leader's ``start_slot`` commits.
* Read index: ``read_index(id)`` records the commit point, a heartbeat round confirms the
  leadership with a majority, and the read is reported in ``Ready.reads_ready`` once the
  state machine has applied that point.

Runtime loop (etcd-raft style)::

    replica = Replica(config, durable_state_or_None, random_fn=rng.random)
    while True:
        # feed events: replica.step(msg), replica.tick(), replica.propose(cmd), ...
        if replica.has_ready():
            rd = replica.ready()
            persist(rd)            # ballot, entries, snapshot, commit; fsync if rd.must_sync
            send(rd.messages)      # only after persisting
            apply(rd)              # snapshot_to_install, committed, reads
            replica.advance(rd)
            if replica.compaction_due():
                replica.compact(state_machine.snapshot())

Notes for the runtime
---------------------
* Node ids are ints; ``NotLeader.leader`` is ``str(leader id)`` or None.
* A pending (uncommitted) configuration may need its new member for a quorum, so the
  leader sends to it before the change commits: open a link to any peer a message is
  addressed to (or when a KIND_CONFIG value appears in ``persist_entries``).
* A replica joining later is started with ``members`` = the current members, without
  itself; it is caught up (snapshot, then log) and campaigns only once a configuration
  that includes it is in its log.
* Message sizes: an Accept carries at most ``catchup_entries_max`` slots and about
  ``batch_bytes_max`` bytes; a Promise at most ``catchup_entries_max + inflight_max``
  slots (a candidate further behind is refused); an InstallSnapshot carries the whole
  snapshot (no chunking), so the frame limit must exceed the largest snapshot.
* ``persist_commit`` needs no fsync, but must be written after the entries it covers.

Where the core lives
--------------------
``core.py`` holds ``Replica``'s public API and Ready loop; ``core_state`` the fields
both sides share (log, promise, role, outbox); ``core_acceptor`` the acceptor side;
``core_proposer`` the candidate and leader side; ``core_leader`` the leader's per-peer
bookkeeping and the merge of promises; ``core_log`` the log; ``core_types`` the
configuration, ``Ready`` and errors.
"""

from __future__ import annotations

from collections.abc import Callable

from lepton_ai.consensus.core_acceptor import AcceptorSide
from lepton_ai.consensus.core_leader import Batch, learner_status
from lepton_ai.consensus.core_proposer import ProposerSide
from lepton_ai.consensus.core_state import CANDIDATE, LEADER
from lepton_ai.consensus.core_types import (
    DurableState,
    InvariantError,
    LearnerStatus,
    NotLeader,
    Overloaded,
    PaxosConfig,
    ProposalId,
    Ready,
)
from lepton_ai.consensus.peer_messages import (
    Accept,
    Accepted,
    Announce,
    Heartbeat,
    HeartbeatAck,
    InstallSnapshot,
    Nack,
    PeerMessage,
    Prepare,
    Promise,
    Snapshot,
)

__all__ = [
    "DurableState",
    "InvariantError",
    "LearnerStatus",
    "NotLeader",
    "Overloaded",
    "PaxosConfig",
    "ProposalId",
    "Ready",
    "Replica",
]


class Replica(AcceptorSide, ProposerSide):
    """One Multi-Paxos replica as a deterministic state machine (see the module docstring).

    The acceptor side (``core_acceptor``) and the proposer side (``core_proposer``) share
    the fields of ``core_state.ReplicaState``; this class adds the public API and the
    Ready loop."""

    # -- public API ------------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        return self.role == LEADER

    @property
    def commit(self) -> int:
        return self.log.commit

    @property
    def applied(self) -> int:
        """Highest slot handed to the runtime for application (after ``advance``)."""
        return self._applied

    @property
    def members(self) -> tuple[int, ...]:
        """The committed configuration."""
        return self.log.committed_config()

    @property
    def removed(self) -> bool:
        """True once this replica knows a committed change removed it: it saw itself in a
        configuration and the committed one (and any pending one) leaves it out, or a
        member further ahead refused its Prepare with ``NACK_NOT_MEMBER``. It never
        campaigns again; the runtime should stop it (ids are never reused)."""
        if self._removed:
            return True
        return self._member_seen and self.node_id not in self._known_members_with_self()

    def learner_status(self) -> list[LearnerStatus]:
        """Leader only (else empty): the learners it streams the log to, by id."""
        return [] if self._ldr is None else learner_status(self._ldr, self.ticks)

    def learner_addresses(self) -> dict[int, str]:
        """Leader only (else empty): learner id -> announced address (do not modify)."""
        return {} if self._ldr is None else self._ldr.learners

    def member_silence_ticks(self) -> dict[int, int]:
        """Leader only (else empty): ticks since each other member of the committed
        configuration was last heard from (counted from this leadership's start)."""
        if self._ldr is None:
            return {}
        return self._ldr.silence(self.log.committed_config(), self.node_id, self.ticks)

    def step(self, msg: PeerMessage) -> None:
        """Handle one message from a peer. Misbehaving input is dropped (counted in
        ``dropped_messages``), never raised: a confused peer cannot stop this replica."""
        handler = _HANDLERS.get(type(msg))
        if handler is None:
            raise TypeError(f"not a peer message: {type(msg).__name__}")
        if msg.src == self.node_id or msg.src < 0:
            self.dropped_messages += 1
            return
        handler(self, msg)

    def tick(self) -> None:
        """Advance logical time by one tick."""
        self.ticks += 1
        self._heard_elapsed += 1
        if self.role == LEADER:
            self._tick_leader()
            return
        self._election_elapsed += 1
        if self._election_elapsed >= self._election_timeout and self._eligible():
            self.campaign()
        self._maybe_announce()

    def _maybe_announce(self) -> None:
        """A learner outside the committed configuration tells every member it exists,
        so a leader (also a new one, within ``announce_ticks``) streams it the log."""
        members = self.log.committed_config()
        if not self.config.learner or self.removed or self.node_id in members:
            return
        self._announce_elapsed += 1
        if self._announce_elapsed < self.config.announce_ticks:
            return
        self._announce_elapsed = 0
        msg = Announce(src=self.node_id, ballot=self.promised, address=self.config.address)
        for peer in members:
            self._send(peer, msg)

    def _eligible(self) -> bool:
        return not self.removed and self.node_id in self._known_members_with_self()

    def campaign(self) -> None:
        """Start Phase 1 with a fresh ballot now (also used by tests and leader transfer)."""
        if not self._eligible():
            raise ValueError(f"node {self.node_id} is not a member; it cannot campaign")
        self._step_down(None)
        self.max_round = max(self.max_round, self.promised[0]) + 1
        ballot = (self.max_round, self.node_id)
        self._set_promised(ballot)
        self.role = CANDIDATE
        self._election_elapsed = 0
        self._election_timeout = self._random_timeout()
        self._promises = {self.node_id: self._promise_for(ballot, self.log.commit)}
        self._prepared = set(self._known_members())
        for peer in self._known_members():
            self._send(peer, Prepare(src=self.node_id, ballot=ballot, commit=self.log.commit))
        self._check_promises()

    def propose(self, command: bytes) -> ProposalId:
        """Add a client command to the open batch (leader only).

        Raises ``NotLeader`` on a follower, ``Overloaded`` when the pipeline window and the
        batch are full, ``TypeError``/``ValueError`` for a bad command."""
        if not isinstance(command, bytes):
            raise TypeError("command must be bytes")
        if len(command) > self.config.batch_bytes_max:
            raise ValueError(f"command of {len(command)} bytes exceeds batch_bytes_max")
        ldr = self._leader_state()
        batch = ldr.batch
        if batch is not None and (
            len(batch.commands) >= self.config.batch_commands_max
            or batch.size_bytes + len(command) > self.config.batch_bytes_max
        ):
            if not self._seal_batch(ldr):
                raise Overloaded("pipeline window and batch are full")
            batch = None
        if batch is None:
            batch = ldr.batch = Batch(slot=self.log.last + 1)
        batch.commands.append(command)
        batch.size_bytes += len(command)
        return ProposalId(slot=batch.slot, origin=ldr.ballot, index=len(batch.commands) - 1)

    def add_member(self, node_id: int, payload: bytes = b"") -> ProposalId:
        """Propose the committed configuration plus ``node_id`` (leader only)."""
        members = self.log.committed_config()
        if node_id in members:
            raise ValueError(f"node {node_id} is already a member")
        return self._propose_config((*members, node_id), payload)

    def remove_member(self, node_id: int, payload: bytes = b"") -> ProposalId:
        """Propose the committed configuration minus ``node_id`` (leader only). A leader
        that removes itself steps down once the change commits."""
        members = self.log.committed_config()
        if node_id not in members:
            raise ValueError(f"node {node_id} is not a member")
        if len(members) == 1:
            raise ValueError("cannot remove the last member")
        return self._propose_config(tuple(m for m in members if m != node_id), payload)

    def read_index(self, request_id: int) -> None:
        """Start a linearizable read; ``request_id`` comes back in ``Ready.reads_ready``
        (safe to read local state after that Ready is applied) or ``reads_failed``."""
        if not isinstance(request_id, int):
            raise TypeError("request_id must be an int")
        ldr = self._leader_state()
        if len(ldr.reads) >= self.config.reads_pending_max:
            raise Overloaded("too many pending reads")
        index = max(self.log.commit, ldr.start_slot)
        if ldr.read_seq == ldr.read_seq_sent:
            ldr.read_seq += 1
        ldr.reads.append((request_id, ldr.read_seq, index))

    def compaction_due(self) -> bool:
        """True when the runtime should call ``compact(state_machine.snapshot())`` now."""
        if self._ready_out or self._out_install is not None:
            return False  # the state machine is not at ``applied`` right now
        return self._applied - self.log.snapshot.slot >= self.config.snapshot_entries

    def compact(self, data: bytes) -> None:
        """Record ``data`` (the state machine after applying ``applied``) as the snapshot
        and drop older log entries; the snapshot is in the next Ready's persist_snapshot."""
        if not isinstance(data, bytes):
            raise TypeError("snapshot data must be bytes")
        if self._ready_out or self._out_install is not None:
            raise ValueError("compact() only after advance(), with no snapshot install pending")
        slot = self._applied
        snap = Snapshot(slot=slot, members=self.log.config_at(slot), data=data)
        self.log.compact(snap, self.config.log_retain_entries)
        self._out_snapshot = snap

    def status(self) -> dict[str, object]:
        """A summary for ``lepton cluster status``."""
        peers: dict[int, int] = {}
        if self._ldr is not None:
            peers = {p: st.match for p, st in self._ldr.peers.items()}
        return {
            "id": self.node_id,
            "role": self.role,
            "leader": self.leader_id,
            "ballot": list(self.promised),
            "commit": self.log.commit,
            "applied": self._applied,
            "last_slot": self.log.last,
            "snapshot_slot": self.log.snapshot.slot,
            "members": list(self.log.committed_config()),
            "peer_match": peers,
            "learners": [s.node for s in self.learner_status()],
            "removed": self.removed,
        }

    # -- ready loop ------------------------------------------------------------------

    def has_ready(self) -> bool:
        if self._ready_out:
            return False
        if self._outbox_nonempty() or self.log.commit > self._applied:
            return True
        ldr = self._ldr
        if ldr is None:
            return False
        window_open = self.log.last - self.log.commit < self.config.inflight_max
        return (
            (ldr.batch is not None and window_open)
            or ldr.read_seq > ldr.read_seq_sent
            or self._unsent(ldr)
            or (
                bool(ldr.reads)
                and self._read_releasable(ldr, *ldr.reads[0][1:], applied=self.log.commit)
            )
        )

    def ready(self) -> Ready:
        """Collect everything the runtime must persist, send and apply (see ``Ready``)."""
        if self._ready_out:
            raise ValueError("ready() called twice without advance()")
        ldr = self._ldr
        self._pending_self_through = 0
        if ldr is not None:
            self._seal_batch(ldr)
            if ldr.read_seq > ldr.read_seq_sent:
                self._broadcast_heartbeat(ldr)
            for peer in ldr.peers:
                self._send_entries(ldr, peer)
            self._pending_self_through = self.log.last
        committed = [(s, self.log.value(s)) for s in range(self._applied + 1, self.log.commit + 1)]
        if not self._member_seen and self.node_id in self.log.committed_config():
            self._member_seen = True
        rd = Ready(
            persist_ballot=self.promised if self._out_ballot else None,
            persist_entries=self._out_entries,
            persist_snapshot=self._out_snapshot,
            persist_commit=self.log.commit if self._commit_written != self.log.commit else None,
            messages=self._out_messages,
            snapshot_to_install=self._out_install,
            committed=committed,
            reads_failed=self._out_reads_failed,
            leader=self.leader_id,
            is_leader=self.role == LEADER,
            ballot=self.promised,
            commit=self.log.commit,
        )
        self._applied = self.log.commit
        if ldr is not None:
            rd.reads_ready = self._ready_reads(ldr)
        self._commit_written = self.log.commit
        self._clear_outbox()
        self._ready_out = True
        return rd

    def advance(self, rd: Ready) -> None:
        """The runtime persisted, sent and applied ``rd``."""
        if not self._ready_out:
            raise ValueError("advance() without a ready()")
        self._ready_out = False
        ldr = self._ldr
        if ldr is not None and rd.is_leader and rd.ballot == ldr.ballot:
            ldr.self_match = max(ldr.self_match, self._pending_self_through)
            self._leader_commit(ldr)


_HANDLERS: dict[type, Callable[[Replica, PeerMessage], None]] = {
    Prepare: Replica._on_prepare,  # type: ignore[dict-item]
    Promise: Replica._on_promise,  # type: ignore[dict-item]
    Accept: Replica._on_accept,  # type: ignore[dict-item]
    Accepted: Replica._on_accepted,  # type: ignore[dict-item]
    Nack: Replica._on_nack,  # type: ignore[dict-item]
    Heartbeat: Replica._on_heartbeat,  # type: ignore[dict-item]
    HeartbeatAck: Replica._on_heartbeat_ack,  # type: ignore[dict-item]
    InstallSnapshot: Replica._on_install_snapshot,  # type: ignore[dict-item]
    Announce: Replica._on_announce,  # type: ignore[dict-item]
}
