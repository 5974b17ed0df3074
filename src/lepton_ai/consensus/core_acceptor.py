"""The acceptor (follower) side of the Multi-Paxos replica: ``AcceptorSide`` (no I/O).

Answers a candidate's ``Prepare`` (promise or refuse), follows a leader's ``Accept``,
``Heartbeat`` and ``InstallSnapshot`` (store, acknowledge cumulatively, learn the commit
point), and sends the ``Nack`` that tells a stale proposer to step down.
"""

from __future__ import annotations

from lepton_ai.consensus.core_leader import entries_above
from lepton_ai.consensus.core_state import FOLLOWER, LEADER, ReplicaState
from lepton_ai.consensus.core_types import InvariantError
from lepton_ai.consensus.peer_messages import (
    NACK_BEHIND,
    NACK_NOT_MEMBER,
    NACK_STALE,
    Accept,
    Accepted,
    Ballot,
    Entry,
    Heartbeat,
    HeartbeatAck,
    InstallSnapshot,
    Nack,
    Prepare,
    Promise,
)


class AcceptorSide(ReplicaState):
    """Handlers of a proposer's messages: Phase 1 and 2 as an acceptor."""

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

    def _nack(self, to: int, ballot: Ballot, reason: int) -> None:
        nack = Nack(
            src=self.node_id,
            ballot=ballot,
            promised=self.promised,
            reason=reason,
            commit=self.log.commit,
        )
        self._send(to, nack)
