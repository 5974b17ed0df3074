"""Leader- and candidate-side bookkeeping of the Multi-Paxos core (no I/O).

``Progress`` tracks what each peer holds at the leader's ballot; ``merge_promises``
turns a quorum of Phase 1 promises into the log the new leader must re-propose.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lepton_ai.consensus.core_log import Log
from lepton_ai.consensus.core_types import InvariantError, LearnerStatus, PaxosConfig
from lepton_ai.consensus.peer_messages import (
    KIND_CONFIG,
    KIND_NOOP,
    Accept,
    Ballot,
    Entry,
    InstallSnapshot,
    PeerMessage,
    Promise,
    Value,
)


def majority(members: tuple[int, ...] | frozenset[int]) -> int:
    return len(members) // 2 + 1


def has_quorum(voters: set[int], configs: list[tuple[int, ...]]) -> bool:
    """True iff ``voters`` hold a majority of every configuration in ``configs``."""
    return all(len(voters.intersection(c)) >= majority(c) for c in configs)


def quorum_slot(match: dict[int, int], configs: list[tuple[int, ...]]) -> int:
    """Highest slot held by a majority of every configuration (prefix-closed acks)."""
    best: int | None = None
    for config in configs:
        slots = sorted((match.get(m, 0) for m in config), reverse=True)
        s = slots[majority(config) - 1]
        best = s if best is None else min(best, s)
    return best if best is not None else 0


@dataclass(slots=True)
class Peer:
    """What the leader knows about one peer at its ballot."""

    next: int
    match: int = 0
    heard_tick: int = 0
    stall_match: int = -1
    stall_ticks: int = 0
    read_seq: int = 0
    snapshot_sent: bool = False
    probing: bool = False
    """After a loss or gap, send one message and wait for its answer before pipelining
    again (Raft's probe state), so a lossy link is not flooded with whole windows."""

    def wants_send(self, last: int, window: int) -> bool:
        """Slots up to ``last`` remain to be sent and the window and probe state allow it."""
        if self.next > last or self.next - self.match - 1 >= window:
            return False
        return not (self.probing and self.next > self.match + 1)

    def tick_stall(self, last: int, retransmit_ticks: int) -> None:
        """No acknowledged progress for ``retransmit_ticks``: resend from the first slot
        the peer lacks (the messages in flight were probably lost)."""
        if self.match >= last or self.match != self.stall_match:
            self.stall_match = self.match
            self.stall_ticks = 0
            return
        self.stall_ticks += 1
        if self.stall_ticks >= retransmit_ticks:
            self.next = self.match + 1
            self.snapshot_sent = False
            self.probing = True
            self.stall_ticks = 0


@dataclass(slots=True)
class Batch:
    """The leader's open batch of client commands for slot ``slot``."""

    slot: int
    commands: list[bytes] = field(default_factory=list)
    size_bytes: int = 0


@dataclass(slots=True)
class LeaderState:
    ballot: Ballot
    start_slot: int
    """The no-op the leader appended after Phase 1; its commit proves the commit point is
    current, so reads and membership changes wait for it."""
    peers: dict[int, Peer] = field(default_factory=dict)
    self_match: int = 0
    batch: Batch | None = None
    read_seq: int = 0
    read_seq_sent: int = 0
    reads: list[tuple[int, int, int]] = field(default_factory=list)
    """(request id, read round, read index) waiting for confirmation or application."""
    quorum_check_tick: int = 0
    learners_max: int = 8
    learners: dict[int, str] = field(default_factory=dict)
    """Learner id -> its announced address. Each also has an entry in ``peers`` (so it is
    streamed the log like any peer); quorums count only configuration members, so an
    entry here never counts. Soft state: a new leader learns them from their announces."""

    def silence(self, members: tuple[int, ...], node_id: int, ticks: int) -> dict[int, int]:
        """Ticks since each member other than ``node_id`` was last heard from."""
        return {
            m: ticks - self.peers[m].heard_tick for m in members if m != node_id and m in self.peers
        }

    def match_map(self, node_id: int) -> dict[int, int]:
        out = {p: peer.match for p, peer in self.peers.items()}
        out[node_id] = self.self_match
        return out


def note_learner(ldr: LeaderState, node: int, address: str, ticks: int, commit: int) -> bool:
    """A learner announced itself: stream it the log (probing from the commit point: its
    first answer tells where it really is). False if the learner set is full."""
    if node not in ldr.learners:
        if len(ldr.learners) >= ldr.learners_max:
            return False
        ldr.peers.setdefault(node, Peer(next=commit + 1, heard_tick=ticks, probing=True))
    ldr.learners[node] = address
    ldr.peers[node].heard_tick = ticks
    return True


def learner_status(ldr: LeaderState, ticks: int) -> list[LearnerStatus]:
    """The learners ``ldr`` streams the log to, by id (what the reconciler observes)."""
    out: list[LearnerStatus] = []
    for node, address in sorted(ldr.learners.items()):
        peer = ldr.peers.get(node)
        if peer is not None:
            out.append(LearnerStatus(node, address, peer.match, ticks - peer.heard_tick))
    return out


def expire_learners(ldr: LeaderState, ticks: int, timeout_ticks: int, members: set[int]) -> None:
    """Forget learners silent for ``timeout_ticks`` (a member being added keeps its peer)."""
    for node in list(ldr.learners):
        peer = ldr.peers.get(node)
        if peer is None or ticks - peer.heard_tick >= timeout_ticks:
            del ldr.learners[node]
            if node not in members:
                ldr.peers.pop(node, None)


@dataclass(slots=True)
class Merged:
    """The log a candidate recovered from its promises."""

    chosen_through: int
    values: dict[int, Value]
    """Slot -> value for every slot above the candidate's commit up to the highest seen."""
    configs: list[tuple[int, ...]]


def merge_promises(
    commit: int, base_config: tuple[int, ...], promises: dict[int, Promise]
) -> Merged:
    """Recover Phase 1: per slot above ``commit``, a value known chosen (below a promiser's
    commit) wins, else the value accepted at the highest ballot, else a gap (filled later
    with a no-op). Two different chosen values for one slot break safety: raise."""
    chosen: dict[int, Value] = {}
    best: dict[int, tuple[Ballot, Value]] = {}
    chosen_through = commit
    for p in promises.values():
        chosen_through = max(chosen_through, p.commit)
        for e in p.entries:
            if e.slot <= commit:
                continue
            if e.slot <= p.commit:
                other = chosen.get(e.slot)
                if other is not None and other != e.value:
                    raise InvariantError(f"two chosen values for slot {e.slot}")
                chosen[e.slot] = e.value
            prev = best.get(e.slot)
            if prev is None or e.ballot > prev[0]:
                best[e.slot] = (e.ballot, e.value)
    values: dict[int, Value] = {s: v for s, (_, v) in best.items()}
    values.update(chosen)
    for s in range(commit + 1, chosen_through + 1):
        if s not in chosen:
            raise InvariantError(f"promises miss chosen slot {s} (through {chosen_through})")
    configs = [base_config]
    latest = [s for s, v in values.items() if v.kind == KIND_CONFIG]
    for s in sorted(latest):
        cfg = tuple(values[s].members)
        if cfg not in configs:
            configs.append(cfg)
    return Merged(chosen_through=chosen_through, values=values, configs=configs)


def replicate(
    log: Log, ldr: LeaderState, peer: Peer, node_id: int, cfg: PaxosConfig
) -> list[PeerMessage]:
    """The Accept (or InstallSnapshot) messages that bring ``peer`` up to the leader's last
    slot, within the peer's window; advances ``peer.next`` past what they carry."""
    out: list[PeerMessage] = []
    while peer.wants_send(log.last, cfg.inflight_max):
        if peer.next < log.first:
            if not peer.snapshot_sent:
                snap = log.snapshot
                out.append(
                    InstallSnapshot(
                        src=node_id, ballot=ldr.ballot, snapshot=snap, commit=log.commit
                    )
                )
                peer.snapshot_sent = True
            peer.next = max(peer.next, log.snapshot.slot + 1)
            break
        values = log.entries_from(peer.next, cfg.catchup_entries_max, cfg.batch_bytes_max)
        if not values:
            raise InvariantError(f"leader log has a hole at slot {peer.next}")
        out.append(
            Accept(
                src=node_id,
                ballot=ldr.ballot,
                first_slot=peer.next,
                values=values,
                commit=log.commit,
            )
        )
        peer.next += len(values)
    return out


def noop(origin: Ballot) -> Value:
    return Value(kind=KIND_NOOP, origin=origin)


def entries_above(entries: dict[int, Entry], slot: int) -> list[Entry]:
    return [e for s, e in sorted(entries.items()) if s > slot]
