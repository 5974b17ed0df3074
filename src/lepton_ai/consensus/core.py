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
"""

from __future__ import annotations

from collections.abc import Callable

from lepton_ai.consensus.core_leader import (
    Batch,
    LeaderState,
    Merged,
    Peer,
    entries_above,
    expire_learners,
    has_quorum,
    learner_status,
    merge_promises,
    noop,
    note_learner,
    quorum_slot,
    replicate,
)
from lepton_ai.consensus.core_log import Log
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
    KIND_COMMANDS,
    KIND_CONFIG,
    NACK_BEHIND,
    NACK_NOT_MEMBER,
    NACK_STALE,
    ZERO_BALLOT,
    Accept,
    Accepted,
    Announce,
    Ballot,
    Entry,
    Heartbeat,
    HeartbeatAck,
    InstallSnapshot,
    Nack,
    PeerMessage,
    Prepare,
    Promise,
    Snapshot,
    Value,
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

FOLLOWER = "follower"
CANDIDATE = "candidate"
LEADER = "leader"


class Replica:
    """One Multi-Paxos replica as a deterministic state machine (see the module docstring)."""

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

    # -- acceptor side ---------------------------------------------------------------

    def _on_prepare(self, m: Prepare) -> None:
        cfg = self.config
        if m.ballot[1] != m.src:
            self.dropped_messages += 1
            return
        if m.src not in self._known_members_with_self() and m.commit < self.log.commit:
            # Only when this replica is ahead: one that lags may not know of the change
            # that added the candidate, and refusing then could leave no quorum.
            self._nack(m.src, m.ballot, NACK_NOT_MEMBER)
            return
        self.max_round = max(self.max_round, m.ballot[0])
        if m.ballot < self.promised:
            self._nack(m.src, m.ballot, NACK_STALE)
            return
        sticky = self.config.leader_stickiness and (
            self.role == LEADER
            or (self.leader_id is not None and self._heard_elapsed < self.config.election_ticks_min)
        )
        if sticky and m.ballot > self.promised and self.leader_id != m.src:
            return
        if m.commit < self.log.first - 1 or m.commit < self.log.commit - cfg.catchup_entries_max:
            # The promise would have to carry a compacted or oversized chosen prefix: a
            # replica this far behind must be caught up by a leader, not become one.
            self._nack(m.src, m.ballot, NACK_BEHIND)
            return
        if m.ballot > self.promised:
            self._step_down(None)
            self._set_promised(m.ballot)
        self._election_elapsed = 0
        self._send(m.src, self._promise_for(m.ballot, m.commit))

    def _promise_for(self, ballot: Ballot, commit: int) -> Promise:
        return Promise(
            src=self.node_id,
            ballot=ballot,
            commit=self.log.commit,
            entries=entries_above(self.log.entries, commit),
        )

    def _accept_leader(self, src: int, ballot: Ballot) -> bool:
        """Common check of a leader's message: refuse stale, follow the new leader."""
        if ballot[1] != src:
            self.dropped_messages += 1
            return False
        self.max_round = max(self.max_round, ballot[0])
        if ballot < self.promised:
            self._nack(src, ballot, NACK_STALE)
            return False
        if ballot > self.promised or self.role != FOLLOWER:
            self._step_down(src)
            self._set_promised(ballot)
        self.leader_id = src
        self._election_elapsed = 0
        self._heard_elapsed = 0
        if self._through_ballot != ballot:
            self._through_ballot = ballot
            self._through = self.log.commit
        self._through = self.log.contiguous_at(max(self._through, self.log.commit), ballot)
        return True

    def _on_accept(self, m: Accept) -> None:
        if not self._accept_leader(m.src, m.ballot):
            return
        gap = m.first_slot > self._through + 1
        for i, value in enumerate(m.values):
            slot = m.first_slot + i
            if slot <= self.log.commit:
                continue
            old = self.log.get(slot)
            if old is not None and old.ballot == m.ballot:
                if old.value != value:
                    raise InvariantError(f"two values for slot {slot} at ballot {m.ballot}")
                continue
            entry = Entry(slot=slot, ballot=m.ballot, value=value)
            self.log.put(entry)
            self._out_entries.append(entry)
        self._through = self.log.contiguous_at(self._through, m.ballot)
        self._follow_commit(m.commit)
        ack = Accepted(src=self.node_id, ballot=m.ballot, through=self._through, gap=gap)
        self._send(m.src, ack)

    def _on_heartbeat(self, m: Heartbeat) -> None:
        if not self._accept_leader(m.src, m.ballot):
            return
        self._follow_commit(m.commit)
        ack = HeartbeatAck(
            src=self.node_id, ballot=m.ballot, through=self._through, read_seq=m.read_seq
        )
        self._send(m.src, ack)

    def _on_install_snapshot(self, m: InstallSnapshot) -> None:
        if not self._accept_leader(m.src, m.ballot):
            return
        snap = m.snapshot
        if snap.slot > self.log.commit:
            self.log.install(snap)
            self._applied = snap.slot
            self._out_install = snap
            self._out_snapshot = snap
            self._through = self.log.contiguous_at(snap.slot, m.ballot)
            self._follow_commit(m.commit)
        self._send(m.src, Accepted(src=self.node_id, ballot=m.ballot, through=self._through))

    def _follow_commit(self, leader_commit: int) -> None:
        """Slots up to the leader's commit that we accepted at its ballot are chosen."""
        self.log.advance_commit(min(leader_commit, self._through))

    # -- proposer side ---------------------------------------------------------------

    def _on_promise(self, m: Promise) -> None:
        if self.role != CANDIDATE or m.ballot != self.promised:
            return
        self._promises[m.src] = m
        self._check_promises()

    def _check_promises(self) -> None:
        merged = merge_promises(self.log.commit, self.log.committed_config(), self._promises)
        known = self._prepared
        for config in merged.configs:
            for peer in config:
                if peer != self.node_id and peer not in known:
                    known.add(peer)  # a configuration learnt from a promise: ask it too
                    prepare = Prepare(
                        src=self.node_id, ballot=self.promised, commit=self.log.commit
                    )
                    self._send(peer, prepare)
        if has_quorum(set(self._promises), merged.configs):
            self._become_leader(merged)

    def _become_leader(self, merged: Merged) -> None:
        ballot = self.promised
        top = max([merged.chosen_through, *merged.values])
        for slot in range(self.log.commit + 1, top + 2):
            value = merged.values.get(slot) if slot <= top else None
            entry = Entry(slot=slot, ballot=ballot, value=value or noop(ballot))
            self.log.put(entry)
            self._out_entries.append(entry)
        self.log.advance_commit(merged.chosen_through)
        self.role = LEADER
        self.leader_id = self.node_id
        ldr = LeaderState(
            ballot=ballot,
            start_slot=top + 1,
            quorum_check_tick=self.ticks,
            learners_max=self.config.learners_max,
        )
        for peer in self._known_members():
            promise = self._promises.get(peer)
            match = min(promise.commit, self.log.last) if promise is not None else 0
            ldr.peers[peer] = Peer(next=max(match, self.log.commit) + 1, heard_tick=self.ticks)
            ldr.peers[peer].match = match
        self._promises = {}
        self._ldr = ldr
        self._broadcast_heartbeat(ldr)

    def _on_accepted(self, m: Accepted) -> None:
        ldr = self._ldr
        if ldr is None or m.ballot != ldr.ballot:
            return
        peer = ldr.peers.get(m.src)
        if peer is None:
            return
        fresh = m.through >= peer.match
        self._note_through(ldr, peer, m.through)
        behind = m.through + 1 < self.log.first
        # Resend from the follower's first missing slot (or a snapshot), one message at a
        # time; a stale or duplicated report, or a snapshot already on its way, changes nothing.
        if (
            fresh
            and (m.gap or behind)
            and peer.next > m.through + 1
            and not (behind and peer.snapshot_sent)
        ):
            peer.next = m.through + 1
            peer.probing = True
        self._leader_commit(ldr)

    def _on_heartbeat_ack(self, m: HeartbeatAck) -> None:
        ldr = self._ldr
        if ldr is None or m.ballot != ldr.ballot:
            return
        peer = ldr.peers.get(m.src)
        if peer is None:
            return
        self._note_through(ldr, peer, m.through)
        peer.read_seq = max(peer.read_seq, m.read_seq)
        self._leader_commit(ldr)

    def _note_through(self, ldr: LeaderState, peer: Peer, through: int) -> None:
        if through > self.log.last:
            raise InvariantError(f"peer holds slot {through} beyond leader's last {self.log.last}")
        peer.heard_tick = self.ticks
        if through > peer.match:
            peer.probing = False
            peer.snapshot_sent = False
        peer.match = max(peer.match, through)
        peer.next = max(peer.next, peer.match + 1)

    def _on_nack(self, m: Nack) -> None:
        if m.reason == NACK_NOT_MEMBER:
            # Committed history is one sequence: a configuration committed further along
            # that leaves out a member of ours means a committed change removed us.
            if m.commit > self.log.commit and self.node_id in self.log.committed_config():
                self._removed = True
                self._step_down(None)
            return
        self.max_round = max(self.max_round, m.promised[0])
        stale = m.reason == NACK_STALE and m.ballot == self.promised
        if stale and m.promised > self.promised and self.role != FOLLOWER:
            self._step_down(None)

    def _leader_commit(self, ldr: LeaderState) -> None:
        configs = self._active_configs()
        slot = min(quorum_slot(ldr.match_map(self.node_id), configs), self.log.last)
        if slot > self.log.commit:
            self.log.advance_commit(slot)
            known = self._known_members_with_self()
            if self.node_id not in known:
                self._step_down(None)  # a committed change removed this leader
                return
            for gone in [p for p in ldr.peers if p not in known and p not in ldr.learners]:
                del ldr.peers[gone]
            committed = self.log.committed_config()
            for promoted in [p for p in ldr.learners if p in committed]:
                del ldr.learners[promoted]  # a member now: its peer entry stays

    def _active_configs(self) -> list[tuple[int, ...]]:
        configs = [self.log.committed_config()]
        pending = self.log.pending_config()
        if pending is not None and pending[1] != configs[0]:
            configs.append(pending[1])
        return configs

    def _seal_batch(self, ldr: LeaderState) -> bool:
        """Move the open batch into the log if the pipeline window has room."""
        batch = ldr.batch
        if batch is None:
            return True
        if self.log.last - self.log.commit >= self.config.inflight_max:
            return False
        if batch.slot != self.log.last + 1:
            raise InvariantError("open batch slot moved")
        value = Value(kind=KIND_COMMANDS, origin=ldr.ballot, commands=tuple(batch.commands))
        self._leader_append(value)
        ldr.batch = None
        return True

    def _leader_append(self, value: Value) -> int:
        slot = self.log.last + 1
        entry = Entry(slot=slot, ballot=self.promised, value=value)
        self.log.put(entry)
        self._out_entries.append(entry)
        return slot

    def _propose_config(self, members: tuple[int, ...], payload: bytes) -> ProposalId:
        if any(not isinstance(m, int) or m < 0 for m in members):
            raise TypeError("node ids are non-negative ints")
        if not isinstance(payload, bytes):
            raise TypeError("payload must be bytes")
        ldr = self._leader_state()
        if self.log.pending_config() is not None:
            raise Overloaded("a membership change is already pending")
        if self.log.commit < ldr.start_slot:
            raise Overloaded("the new leader has not committed its first slot yet")
        if not self._seal_batch(ldr) or self.log.last - self.log.commit >= self.config.inflight_max:
            raise Overloaded("pipeline window is full")
        value = Value(kind=KIND_CONFIG, origin=ldr.ballot, commands=(payload,), members=members)
        slot = self._leader_append(value)
        for peer in members:
            if peer != self.node_id and peer not in ldr.peers:
                ldr.peers[peer] = Peer(next=self.log.commit + 1, heard_tick=self.ticks)
        return ProposalId(slot=slot, origin=ldr.ballot, index=0)

    def _send_entries(self, ldr: LeaderState, peer_id: int) -> None:
        for msg in replicate(self.log, ldr, ldr.peers[peer_id], self.node_id, self.config):
            self._send(peer_id, msg)

    def _unsent(self, ldr: LeaderState) -> bool:
        window = self.config.inflight_max
        return any(p.wants_send(self.log.last, window) for p in ldr.peers.values())

    def _tick_leader(self) -> None:
        ldr = self._ldr
        if ldr is None:
            raise InvariantError("leader without leader state")
        self._heartbeat_elapsed += 1
        if self._heartbeat_elapsed >= self.config.heartbeat_ticks:
            self._broadcast_heartbeat(ldr)
        for peer in ldr.peers.values():
            peer.tick_stall(self.log.last, self.config.retransmit_ticks)
        if ldr.learners:
            timeout = self.config.learner_timeout_ticks
            expire_learners(ldr, self.ticks, timeout, self._known_members_with_self())
        window = self.config.election_ticks_max
        if self.config.check_quorum and self.ticks - ldr.quorum_check_tick >= window:
            ldr.quorum_check_tick = self.ticks
            live = {p for p, st in ldr.peers.items() if self.ticks - st.heard_tick < window}
            live.add(self.node_id)
            if not has_quorum(live, self._active_configs()):
                self._step_down(None)

    def _broadcast_heartbeat(self, ldr: LeaderState) -> None:
        self._heartbeat_elapsed = 0
        ldr.read_seq_sent = ldr.read_seq
        for peer in ldr.peers:
            hb = Heartbeat(
                src=self.node_id, ballot=ldr.ballot, commit=self.log.commit, read_seq=ldr.read_seq
            )
            self._send(peer, hb)

    # -- reads -----------------------------------------------------------------------

    def _read_releasable(self, ldr: LeaderState, seq: int, index: int, applied: int) -> bool:
        if index > applied:
            return False
        voters = {p for p, st in ldr.peers.items() if st.read_seq >= seq}
        voters.add(self.node_id)
        return has_quorum(voters, self._active_configs())

    def _ready_reads(self, ldr: LeaderState) -> list[int]:
        """Release reads in request order (their rounds and indexes never decrease)."""
        out: list[int] = []
        while ldr.reads:
            rid, seq, index = ldr.reads[0]
            if not self._read_releasable(ldr, seq, index, self._applied):
                break
            out.append(rid)
            ldr.reads.pop(0)
        return out

    # -- helpers ---------------------------------------------------------------------

    def _leader_state(self) -> LeaderState:
        if self.role != LEADER or self._ldr is None:
            raise NotLeader(None if self.leader_id is None else str(self.leader_id))
        return self._ldr

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

    def _nack(self, to: int, ballot: Ballot, reason: int) -> None:
        nack = Nack(
            src=self.node_id,
            ballot=ballot,
            promised=self.promised,
            reason=reason,
            commit=self.log.commit,
        )
        self._send(to, nack)

    def _send(self, to: int, msg: PeerMessage) -> None:
        self._out_messages.append((to, msg))

    def _known_members_with_self(self) -> set[int]:
        out = set(self.log.committed_config())
        pending = self.log.pending_config()
        if pending is not None:
            out.update(pending[1])
        return out

    def _known_members(self) -> list[int]:
        return sorted(self._known_members_with_self() - {self.node_id})

    def _eligible(self) -> bool:
        return not self.removed and self.node_id in self._known_members_with_self()

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

    def _on_announce(self, m: Announce) -> None:
        ldr = self._ldr
        if ldr is None or m.src in self._known_members_with_self():
            return  # a member is streamed the log anyway; a follower leaves it to the leader
        if not note_learner(ldr, m.src, m.address, self.ticks, self.log.commit):
            self.dropped_messages += 1  # the learner set is full


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
