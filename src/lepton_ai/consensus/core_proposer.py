"""The proposer (candidate and leader) side of the Multi-Paxos replica: ``ProposerSide``.

A candidate collects promises and takes over the merged log (``_become_leader``); a
leader counts acknowledgements into its commit point, seals client batches into slots,
proposes membership changes, streams entries (or a snapshot) to each peer, heartbeats,
checks its quorum, releases read-index reads and keeps track of announced learners.
No I/O: everything leaves through the outbox of ``core_state.ReplicaState``.
"""

from __future__ import annotations

from lepton_ai.consensus.core_leader import (
    LeaderState,
    Merged,
    Peer,
    expire_learners,
    has_quorum,
    merge_promises,
    noop,
    note_learner,
    quorum_slot,
    replicate,
)
from lepton_ai.consensus.core_state import CANDIDATE, FOLLOWER, LEADER, ReplicaState
from lepton_ai.consensus.core_types import InvariantError, NotLeader, Overloaded, ProposalId
from lepton_ai.consensus.peer_messages import (
    KIND_COMMANDS,
    KIND_CONFIG,
    NACK_NOT_MEMBER,
    NACK_STALE,
    Accepted,
    Announce,
    Entry,
    Heartbeat,
    HeartbeatAck,
    Nack,
    Prepare,
    Promise,
    Value,
)


class ProposerSide(ReplicaState):
    """Handlers of an acceptor's answers and the leader's own work."""

    # -- elections (candidate) -----------------------------------------------------

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

    # -- leading: acknowledgements and the commit point ----------------------------

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

    # -- leading: batches, membership changes, replication -------------------------

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

    # -- leading: ticks and heartbeats ---------------------------------------------

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

    # -- helpers and learners ------------------------------------------------------

    def _leader_state(self) -> LeaderState:
        if self.role != LEADER or self._ldr is None:
            raise NotLeader(None if self.leader_id is None else str(self.leader_id))
        return self._ldr

    def _on_announce(self, m: Announce) -> None:
        ldr = self._ldr
        if ldr is None or m.src in self._known_members_with_self():
            return  # a member is streamed the log anyway; a follower leaves it to the leader
        if not note_learner(ldr, m.src, m.address, self.ticks, self.log.commit):
            self.dropped_messages += 1  # the learner set is full
