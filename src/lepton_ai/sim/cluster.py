"""``SimCluster``: N real ``Replica`` cores in one process, one seed, simulated time.

Each node has a simulated disk (what its runtime fsynced), a clock that ticks at its own
rate (drift), and a state machine (a hash chain checked by ``SafetyChecker``). The
simulated runtime follows the Ready contract in the order the real driver
(``consensus.driver``) uses: a leader's Accept/Heartbeat leave first
(``ready_order.split_early``), then the fdatasync runs for ``DiskConfig`` sync units,
during which the node's loop is blocked (messages, ticks and client calls wait, as in the
driver's single-threaded loop); then the votes and everything else are sent, committed
slots applied and ``advance`` called. A crash may tear the Ready being written: a random
prefix of its records (ballot, entries in order, snapshot, commit hint) reaches the disk
and its late messages are never sent, while its early messages may already have been
delivered — exactly what an un-fsynced tail plus a torn last record leaves behind.

Every failure names its seed and the command that replays it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from lepton_ai.consensus.core import Overloaded, PaxosConfig, ProposalId, Ready, Replica
from lepton_ai.consensus.core_types import InvariantError, NotLeader
from lepton_ai.consensus.peer_messages import Entry, PeerMessage, Snapshot, Value
from lepton_ai.consensus.ready_order import EARLY_TYPES, Outgoing, split_early
from lepton_ai.sim.checker import SafetyChecker, SmState
from lepton_ai.sim.disk import DiskConfig, InFlightSync, SimDisk, SyncStats, records
from lepton_ai.sim.network import NetConfig, SimNetwork

UNIT = 10
"""Simulation units per nominal tick (message delays are fractions of a tick)."""
DRAIN_ROUNDS_MAX = 1_000
FILLER_TICKS = 30
TICKS_PER_PASS_MAX = 4
"""Ticks fired at once after a node's loop was blocked (the driver's ticks_per_pass_max)."""
INBOX_MAX = 65_536
"""Messages waiting for a node's blocked loop; beyond it they are dropped (driver's inbox_max)."""
CLIENT_QUEUE_MAX = 65_536
"""Client commands and reads waiting for a node's blocked loop (driver's proposals_pending_max)."""


class LivenessViolation(AssertionError):
    """Progress did not resume within the bound after faults stopped."""


@dataclass(slots=True)
class SimNode:
    node_id: int
    config: PaxosConfig
    replica: Replica
    tick_period: int
    next_tick: int
    disk: SimDisk = field(default_factory=SimDisk)
    sm: SmState = field(default_factory=SmState)
    alive: bool = True
    restarts: int = 0
    syncing: InFlightSync | None = None
    inbox: list[PeerMessage] = field(default_factory=list)
    ticks_owed: int = 0
    queued_commands: list[bytes] = field(default_factory=list)
    queued_reads: list[int] = field(default_factory=list)


@dataclass(slots=True)
class Pending:
    command: bytes
    node: int
    proposal: ProposalId


class SimCluster:
    """The simulator. ``seed`` decides everything; ``name`` goes into the replay hint."""

    def __init__(
        self,
        n: int,
        seed: int,
        *,
        name: str = "tests/sim",
        net: NetConfig | None = None,
        drift: float = 0.0,
        paxos: dict[str, object] | None = None,
        disk: DiskConfig | None = None,
    ) -> None:
        if n < 1:
            raise ValueError("need at least one node")
        self.seed = seed
        self.name = name
        self.rng = random.Random(seed)
        self.net_config = net or NetConfig()
        self.net_config.validate()
        self.net = SimNetwork(self.rng, self.net_config)
        self.disk = disk or DiskConfig()
        self.disk.validate()
        # Its own stream: disk timing does not shift the network's draws directly.
        self.disk_rng = random.Random(seed * 6151 + 17)
        self.sync_stats = SyncStats()
        self.drift = drift
        self.paxos = dict(paxos or {})
        self.now = 0
        self.members = tuple(range(1, n + 1))
        self.checker = SafetyChecker(members=self.members, hint=self.hint())
        self.nodes: dict[int, SimNode] = {}
        for node_id in self.members:
            self._make_node(node_id, self.members)
        self.pending: dict[int, list[Pending]] = {}
        self.retry: list[bytes] = []
        self.committed: dict[bytes, int] = {}
        self.reads: dict[int, tuple[int, int]] = {}
        self.reads_done: dict[int, bool] = {}
        self._read_id = 0
        self._dirty: set[int] = set()
        self._cmd_id = 0

    # -- construction ----------------------------------------------------------------

    def _make_node(self, node_id: int, members: tuple[int, ...]) -> SimNode:
        config = PaxosConfig(node_id=node_id, members=members, **self.paxos)  # type: ignore[arg-type]
        lo = max(1, round(UNIT * (1 - self.drift)))
        hi = max(lo, round(UNIT * (1 + self.drift)))
        period = self.rng.randint(lo, hi)
        replica = Replica(config, None, random_fn=self._node_random(node_id, 0))
        node = SimNode(node_id, config, replica, period, self.now + self.rng.randint(1, period))
        self.nodes[node_id] = node
        return node

    def _node_random(self, node_id: int, incarnation: int) -> Callable[[], float]:
        return random.Random(self.seed * 7919 + node_id * 104729 + incarnation).random

    def hint(self) -> str:
        return f"seed {self.seed}; replay: LEPTON_SIM_SEED={self.seed} pytest {self.name}"

    def fail(self, exc: AssertionError) -> AssertionError:
        return type(exc)(f"{exc} [t={self.now}; {self.hint()}]")

    # -- running ---------------------------------------------------------------------

    def run(self, ticks: float) -> None:
        """Advance simulated time by ``ticks`` nominal ticks."""
        self.run_until(self.now + round(ticks * UNIT))

    def run_until(self, t_end: int) -> None:
        try:
            self._run_until(t_end)
        except InvariantError as exc:
            raise self.checker.violation(f"core invariant broke: {exc}") from exc

    def _run_until(self, t_end: int) -> None:
        while True:
            self._drain_dirty()
            t_msg = self.net.next_time()
            alive = [n for n in self.nodes.values() if n.alive]
            tick_node = min(alive, key=lambda n: n.next_tick, default=None)
            t_tick = tick_node.next_tick if tick_node is not None else None
            sync_node = min(
                (n for n in alive if n.syncing is not None),
                key=lambda n: n.syncing.done_at if n.syncing is not None else 0,
                default=None,
            )
            t_sync = sync_node.syncing.done_at if sync_node and sync_node.syncing else None
            times = [t for t in (t_msg, t_tick, t_sync) if t is not None]
            if not times or min(times) > t_end:
                break
            if sync_node is not None and t_sync == min(times):
                self.now = max(self.now, min(times))
                self._finish_sync(sync_node)
            elif t_msg is not None and (t_tick is None or t_msg <= t_tick):
                self._deliver()
            elif tick_node is not None:
                self.now = tick_node.next_tick
                tick_node.next_tick += tick_node.tick_period
                if tick_node.syncing is not None:
                    tick_node.ticks_owed += 1  # fired once the loop is free again
                    self.sync_stats.deferred += 1
                else:
                    tick_node.replica.tick()
                    self._drain(tick_node)
            self._resubmit()
        self.now = max(self.now, t_end)

    def _drain_dirty(self) -> None:
        while self._dirty:
            node = self.nodes.get(self._dirty.pop())
            if node is not None and node.alive:
                self._drain(node)

    def _deliver(self) -> None:
        t, src, dst, msg = self.net.pop()
        self.now = max(self.now, t)
        node = self.nodes.get(dst)
        if node is None or not node.alive or not self.net.link_up(src, dst):
            return
        self.net.delivered += 1
        sender = self.nodes.get(src)
        if sender is not None and sender.syncing is not None and isinstance(msg, EARLY_TYPES):
            lo, hi = sender.syncing.early_seq
            if lo < self.net.popped_seq <= hi:
                self.sync_stats.early_delivered_in_sync += 1
        if node.syncing is not None:
            # The driver's loop is inside its fdatasync: the message waits in the inbox.
            if len(node.inbox) < INBOX_MAX:
                node.inbox.append(msg)
                self.sync_stats.deferred += 1
            return
        node.replica.step(msg)
        self._drain(node)

    def _drain(self, node: SimNode) -> None:
        """The simulated runtime's Ready loop: early messages, persist (a sync takes
        simulated time and blocks the node), late messages, apply, advance - until
        nothing is ready or a sync is in flight."""
        rep = node.replica
        for _ in range(DRAIN_ROUNDS_MAX):
            if node.syncing is not None or not rep.has_ready():
                return
            rd = rep.ready()
            if rd.must_sync and self.disk.sync_units_max > 0:
                self._start_sync(node, rd)
                return
            self._persist(node, rd, len(records(rd)))
            self._send(node, rd.messages)
            self._complete(node, rd)
        raise self.checker.violation(f"node {node.node_id} never stops producing Ready batches")

    def _start_sync(self, node: SimNode, rd: Ready) -> None:
        early, late = split_early(rd) if self.disk.early_send else ([], rd.messages)
        lo = self.net.seq
        self._send(node, early)
        disk, rng = self.disk, self.disk_rng
        duration = rng.randint(disk.sync_units_min, disk.sync_units_max)
        crash = bool(early) and disk.crash_in_sync > 0 and rng.random() < disk.crash_in_sync
        if crash:
            duration = rng.randint(1, max(duration, 2 * self.net_config.delay_max))
        node.syncing = InFlightSync(rd, late, self.now + duration, crash, (lo, self.net.seq))
        self.sync_stats.syncs += 1
        self.sync_stats.early_sent += len(early)

    def _finish_sync(self, node: SimNode) -> None:
        """The fdatasync returned (or, for a doomed sync, the node died in it)."""
        sync = node.syncing
        if sync is None:
            raise self.checker.violation(f"node {node.node_id} finished a sync it never began")
        if sync.crash:
            self.crash(node.node_id, torn=True)
            return
        node.syncing = None
        self._persist(node, sync.ready, len(records(sync.ready)))
        self._send(node, sync.late)
        self._complete(node, sync.ready)
        self._drain(node)  # the rest of this pass's Ready loop
        if node.alive and node.syncing is None:
            self._pass(node)

    def _pass(self, node: SimNode) -> None:
        """The driver's next loop pass after it was blocked: the messages that queued up
        (before ticks, as the driver does), the ticks that fell due (bounded), the client
        calls, then one Ready loop for all of them (group commit)."""
        rep = node.replica
        inbox, node.inbox = node.inbox, []
        for msg in inbox:
            rep.step(msg)
        owed, node.ticks_owed = min(node.ticks_owed, TICKS_PER_PASS_MAX), 0
        for _ in range(owed):
            rep.tick()
        commands, node.queued_commands = node.queued_commands, []
        for cmd in commands:
            if not self._propose_now(node, cmd):
                self.retry.append(cmd)
        reads, node.queued_reads = node.queued_reads, []
        for rid in reads:
            try:
                rep.read_index(rid)
            except (NotLeader, Overloaded):
                self.reads.pop(rid, None)
                self.reads_done[rid] = False
        self._drain(node)

    def _send(self, node: SimNode, messages: Outgoing) -> None:
        for to, msg in messages:
            self.net.send(self.now, node.node_id, to, msg)

    def _complete(self, node: SimNode, rd: Ready) -> None:
        """After ``rd`` is durable and sent: apply, advance, maybe compact."""
        rep = node.replica
        self._apply(node, rd)
        rep.advance(rd)
        if rep.compaction_due():
            rep.compact(msgspec.msgpack.encode(node.sm))

    def _persist(self, node: SimNode, rd: Ready, count: int) -> None:
        """Write the first ``count`` records of ``rd`` to the node's disk, in WAL order."""
        disk = node.disk
        for kind, item in records(rd)[:count]:
            if kind == "ballot" and isinstance(item, tuple):
                disk.promised = item
            elif kind == "entry" and isinstance(item, Entry):
                disk.entries[item.slot] = item
                self.checker.on_persist(node.node_id, item)
            elif kind == "snapshot" and isinstance(item, Snapshot):
                disk.snapshot = item
                for s in [s for s in disk.entries if s <= item.slot]:
                    del disk.entries[s]
            elif kind == "commit" and isinstance(item, int):
                disk.commit = item

    def _apply(self, node: SimNode, rd: Ready) -> None:
        if rd.snapshot_to_install is not None:
            node.sm = msgspec.msgpack.decode(rd.snapshot_to_install.data, type=SmState)
            if node.sm.slot != rd.snapshot_to_install.slot:
                raise self.checker.violation("snapshot data and slot disagree")
            self.checker.on_restore(node.node_id, node.sm)
        for slot, value in rd.committed:
            first = slot not in self.checker.chosen
            self.checker.on_apply(node.node_id, node.sm, slot, value)
            if first:
                self._resolve(slot, value)
        for rid in rd.reads_ready:
            origin, need = self.reads.pop(rid)
            if origin != node.node_id:
                raise self.checker.violation(
                    f"read {rid} released by {node.node_id}, asked {origin}"
                )
            if node.sm.slot < need:
                raise self.checker.violation(
                    f"stale read {rid} on node {node.node_id}: applied {node.sm.slot} < {need}"
                )
            self.reads_done[rid] = True
        for rid in rd.reads_failed:
            self.reads.pop(rid, None)
            self.reads_done[rid] = False

    # -- clients ---------------------------------------------------------------------

    def new_command(self) -> bytes:
        self._cmd_id += 1
        return b"cmd-%d" % self._cmd_id

    def submit(self, command: bytes | None = None, node: int | None = None) -> bytes:
        """Propose ``command`` at ``node`` (default: a current leader). A command that
        cannot be proposed now, or turns out lost, is retried on later leaders until
        chosen, so every submitted command is eventually committed exactly once."""
        cmd = command if command is not None else self.new_command()
        if not self._propose(cmd, node):
            self.retry.append(cmd)
        return cmd

    def _propose(self, cmd: bytes, node_id: int | None) -> bool:
        target = self.nodes.get(node_id) if node_id is not None else self.leader_node()
        if target is None or not target.alive:
            return False
        if target.syncing is not None:
            # The driver answers NotLeader at once and queues the rest for its next pass.
            if not target.replica.is_leader or len(target.queued_commands) >= CLIENT_QUEUE_MAX:
                return False
            target.queued_commands.append(cmd)
            self.sync_stats.deferred += 1
            return True
        return self._propose_now(target, cmd)

    def _propose_now(self, target: SimNode, cmd: bytes) -> bool:
        try:
            pid = target.replica.propose(cmd)
        except (NotLeader, Overloaded):
            return False
        self.pending.setdefault(pid.slot, []).append(Pending(cmd, target.node_id, pid))
        chosen = self.checker.chosen.get(pid.slot)
        if chosen is not None:  # a stale leader proposed into an already chosen slot
            self._resolve(pid.slot, chosen)
        self._dirty.add(target.node_id)  # drained before the next event: proposals batch
        return True

    def _resolve(self, slot: int, value: Value) -> None:
        for p in self.pending.pop(slot, []):
            if p.proposal.matches(value):
                self.committed[p.command] = slot
            else:
                self.retry.append(p.command)

    def _resubmit(self) -> None:
        if not self.retry:
            return
        leader = self.leader_node()
        if leader is None or leader.syncing is not None:
            return  # retried once the leader's loop is free (not queued to bounce back)
        todo, self.retry = self.retry, []
        for i, cmd in enumerate(todo):
            if not self._propose(cmd, leader.node_id):
                self.retry.extend(todo[i:])
                return

    def read(self, node: int | None = None) -> int | None:
        """Start a read-index read at ``node`` (default: a leader); returns its id."""
        target = self.nodes.get(node) if node is not None else self.leader_node()
        if target is None or not target.alive:
            return None
        self._read_id += 1
        rid = self._read_id
        if target.syncing is not None:
            if not target.replica.is_leader or len(target.queued_reads) >= CLIENT_QUEUE_MAX:
                return None
            target.queued_reads.append(rid)
            self.reads[rid] = (target.node_id, self.checker.max_chosen())
            self.sync_stats.deferred += 1
            return rid
        try:
            target.replica.read_index(rid)
        except (NotLeader, Overloaded):
            return None
        self.reads[rid] = (target.node_id, self.checker.max_chosen())
        self._dirty.add(target.node_id)
        return rid

    def unresolved(self) -> int:
        return sum(len(v) for v in self.pending.values()) + len(self.retry)

    # -- faults ----------------------------------------------------------------------

    def crash(self, node_id: int, torn: bool = True) -> None:
        """Stop ``node_id``; with ``torn``, a random prefix of the Ready being synced (or
        else of its next Ready) hits the disk; without, none of it does."""
        node = self.nodes[node_id]
        if not node.alive:
            return
        sync = node.syncing
        if sync is not None:
            recs = records(sync.ready)
            count = self.rng.randint(0, len(recs)) if torn else 0
            self._persist(node, sync.ready, count)
            self.sync_stats.crashes_in_sync += 1
            if sync.early_seq[1] > sync.early_seq[0]:
                kept = sum(1 for kind, _ in recs[:count] if kind == "entry")
                self.sync_stats.early_entries_lost += len(sync.ready.persist_entries) - kept
        elif torn and node.replica.has_ready():
            rd = node.replica.ready()
            self._persist(node, rd, self.rng.randint(0, len(records(rd))))
        self._stop(node)

    def _stop(self, node: SimNode) -> None:
        """The process is gone: its unsent messages, inbox and queued client calls too
        (clients retry commands elsewhere; queued reads fail)."""
        node.alive = False
        node.syncing = None
        node.inbox = []
        node.ticks_owed = 0
        self.retry.extend(node.queued_commands)
        node.queued_commands = []
        for rid in node.queued_reads:
            self.reads.pop(rid, None)
            self.reads_done[rid] = False
        node.queued_reads = []

    def restart(self, node_id: int) -> None:
        """Start ``node_id`` again from its disk, with a fresh state machine."""
        node = self.nodes[node_id]
        if node.alive:
            return
        node.restarts += 1
        rng = self._node_random(node_id, node.restarts)
        node.replica = Replica(node.config, node.disk.durable_state(), random_fn=rng)
        node.sm = SmState()
        node.alive = True
        node.next_tick = self.now + self.rng.randint(1, node.tick_period)
        self._drain(node)

    def stall_sync(self, node_id: int, units: int) -> bool:
        """Make the fdatasync ``node_id`` is in take ``units`` longer (a slow or stuck disk);
        False if it is not syncing. Its early messages are out; its votes wait."""
        if units < 0:
            raise ValueError("units must be >= 0")
        sync = self.nodes[node_id].syncing
        if sync is None:
            return False
        sync.done_at += units
        return True

    def disconnect(self, node_id: int) -> None:
        self.net.isolate(node_id, list(self.nodes))

    def connect(self, node_id: int) -> None:
        self.net.rejoin(node_id)

    # -- membership ------------------------------------------------------------------

    def add_node(self, node_id: int, ticks_max: float = 200) -> None:
        """Start an empty node that knows the current members, then have a leader propose
        adding it (retrying while leaders change, for up to ``ticks_max``)."""
        if node_id in self.nodes:
            raise ValueError(f"node {node_id} exists")
        leader = self.leader_node()
        if leader is None:
            raise NotLeader(None)
        self.checker.static_membership = False
        self._make_node(node_id, leader.replica.members)
        try:
            self._reconfigure(lambda r: r.add_member(node_id), ticks_max)
        except (NotLeader, Overloaded):
            del self.nodes[node_id]
            raise

    def remove_node(self, node_id: int, ticks_max: float = 200) -> None:
        """Have a leader propose removing ``node_id`` (retrying as ``add_node`` does)."""
        self.checker.static_membership = False
        self._reconfigure(lambda r: r.remove_member(node_id), ticks_max)

    def _reconfigure(self, change: Callable[[Replica], object], ticks_max: float) -> None:
        deadline = self.now + round(ticks_max * UNIT)
        waits = 0
        while True:
            leader = self.leader_node()
            if leader is not None and leader.syncing is not None and waits < DRAIN_ROUNDS_MAX:
                # The leader's loop is inside an fdatasync: the change is taken after it.
                waits += 1
                self.run_until(leader.syncing.done_at)
                continue
            try:
                if leader is None:
                    raise NotLeader(None)
                if leader.syncing is not None:
                    raise Overloaded("leader stays busy syncing")
                change(leader.replica)
                self._drain(leader)
                return
            except (NotLeader, Overloaded):
                if self.now >= deadline:
                    raise
            self.run(1)

    # -- observation -----------------------------------------------------------------

    def alive_nodes(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.alive]

    def leader_node(self) -> SimNode | None:
        """The live leader with the highest ballot (stale leaders may linger)."""
        leaders = [n for n in self.alive_nodes() if n.replica.is_leader]
        return max(leaders, key=lambda n: n.replica.promised, default=None)

    def leaders(self) -> list[int]:
        return [n.node_id for n in self.alive_nodes() if n.replica.is_leader]

    def n_applied(self, slot: int) -> int:
        return sum(1 for n in self.alive_nodes() if n.sm.slot >= slot)

    def wait_leader(self, ticks_max: float = 200) -> int:
        """Run until a leader that a majority of live nodes follows exists; return it."""
        deadline = self.now + round(ticks_max * UNIT)
        while self.now < deadline:
            self.run(1)
            leader = self.leader_node()
            if leader is not None and self._followed(leader):
                return leader.node_id
        raise self.fail(LivenessViolation(f"no leader within {ticks_max} ticks"))

    def _followed(self, leader: SimNode) -> bool:
        """A majority of the leader's configuration is live, reachable both ways, and
        follows the leader's ballot, and no member it can reach holds a higher ballot (which
        would depose it): the Raft lab's "one connected leader"."""
        lid, ballot = leader.node_id, leader.replica.promised
        members = leader.replica.members
        count = 0
        for n in self.alive_nodes():
            linked = n.node_id == lid or (
                self.net.link_up(lid, n.node_id) and self.net.link_up(n.node_id, lid)
            )
            if linked and n.node_id in members and n.replica.promised > ballot:
                return False  # (a removed replica may campaign forever; nobody listens)
            if linked and n.replica.leader_id == lid and n.replica.promised == ballot:
                count += 1
        return count >= len(leader.replica.members) // 2 + 1

    def followed_leader(self) -> int | None:
        leader = self.leader_node()
        return leader.node_id if leader is not None and self._followed(leader) else None

    def one(self, command: bytes | None = None, expected: int = 0, ticks_max: float = 300) -> int:
        """Submit a command and run until ``expected`` live nodes (default all) applied it.
        Returns its slot (the Raft lab's ``one()``)."""
        cmd = self.submit(command)
        deadline = self.now + round(ticks_max * UNIT)
        want = expected or len(self.alive_nodes())
        waited = 0
        while self.now < deadline:
            self.run(1)
            waited += 1
            slot = self.committed.get(cmd)
            if slot is not None and self.n_applied(slot) >= want:
                return slot
            if slot is None and waited % FILLER_TICKS == 0 and cmd not in self.retry:
                # Proposed into a slot beyond the current leader's log (its proposer lost
                # the leadership): the slot is decided only once the log grows that far,
                # as a real client's retry would make it.
                self.submit()
        raise self.fail(LivenessViolation(f"{cmd!r} not applied on {want} nodes in {ticks_max}"))

    def settle(self, ticks_max: float = 2_000) -> float:
        """After faults stop: heal, restart everyone, then require a leader, every
        submitted command committed and every node caught up, within ``ticks_max``.
        Returns the ticks it took to have a leader followed by a majority."""
        self.net.heal()
        cfg = self.net_config
        cfg.loss = cfg.duplicate = cfg.long_delay = cfg.replay = 0.0
        self.disk.crash_in_sync = 0.0
        for node in self.nodes.values():
            if node.syncing is not None:
                node.syncing.crash = False  # a doomed sync from before completes after all
        for node_id, node in self.nodes.items():
            if not node.alive:
                self.restart(node_id)
        start = self.now
        deadline = self.now + round(ticks_max * UNIT)
        self.wait_leader(ticks_max)
        recovery = (self.now - start) / UNIT
        while self.now < deadline:
            if self.pending and not self.retry:
                self.submit()  # fills the log up to every pending slot
            self.run(5)
            top = self.checker.max_chosen()
            leader = self.leader_node()
            # A value a majority accepted is chosen even if nobody learned it yet: it must
            # end up learned (and equal, which on_apply checks), never lost.
            quorum_top = max(self.checker.quorum_chosen, default=0)
            if self.unresolved() == 0 and leader is not None and top >= quorum_top:
                members = leader.replica.members
                if all(self.nodes[m].sm.slot >= top for m in members if m in self.nodes):
                    return recovery
        raise self.fail(
            LivenessViolation(
                f"not settled in {ticks_max} ticks: unresolved={self.unresolved()} "
                f"top={self.checker.max_chosen()} "
                f"applied={[(n.node_id, n.sm.slot) for n in self.alive_nodes()]} "
                f"leaders={self.leaders()}"
            )
        )

    def messages_sent(self) -> int:
        return self.net.sent


__all__ = [
    "UNIT",
    "DiskConfig",
    "LivenessViolation",
    "NetConfig",
    "PeerMessage",
    "SimCluster",
    "SimDisk",
    "SimNode",
]
