"""The asyncio driver of one replica: where the Paxos core meets time, disk and network.

One loop, in the order the ``Ready`` contract demands::

    collect events (peer messages, ticks, proposals, reads) -> core.step/tick/propose/read_index
    -> rd = core.ready() -> persist rd (WAL, one fdatasync) -> THEN send rd.messages
    -> restore snapshot / apply committed commands -> resolve waiting callers -> core.advance(rd)

Persist-before-send is the rule that makes a promise or an acceptance a promise: a
peer never hears of a ballot or a value this replica could forget in a crash.
Everything that arrives while the loop is busy (fsync included) is handled in the
next pass, so one fdatasync covers every request that queued up (group commit).

Latency path: a leader's Accept and Heartbeat leave *before* its own fdatasync
(they carry no vote of the leader, see ``_handle``), so the leader's and the
followers' fdatasyncs overlap instead of adding up; and the server writes a pass's
replies from an ``on_pass_end`` hook, in the pass, not one event-loop turn later.

``ReplicaDriver`` implements ``lepton_ai.consensus.log_host.LogHost`` for whatever
``StateMachine`` it is given; the KV server and (later) the coordinator run on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import msgspec

from lepton_ai.consensus.core import Replica
from lepton_ai.consensus.core_types import (
    DurableState,
    Overloaded,
    PaxosConfig,
    ProposalId,
    Ready,
)
from lepton_ai.consensus.log_host import NotLeader, StateMachine
from lepton_ai.consensus.peer_messages import (
    KIND_COMMANDS,
    KIND_CONFIG,
    ZERO_BALLOT,
    PeerMessage,
    Value,
)
from lepton_ai.consensus.ready_order import split_early
from lepton_ai.consensus.replica_disk import ReplicaStorage
from lepton_ai.consensus.timings import ConsensusTimings
from lepton_ai.consensus.transport import PeerLink, TransportConfig
from lepton_ai.errors import LeptonError, Unavailable
from lepton_ai.wire import Codec

log = logging.getLogger("lepton_ai.consensus.driver")


Done = Callable[[bytes | None, BaseException | None], None]
"""Called once with (result, None) or (None, error)."""


class _SnapshotEnvelope(msgspec.Struct, array_like=True):
    """What the driver stores as a core snapshot: the state machine's own snapshot plus
    the replica address book, so members added at run time survive compaction."""

    state: bytes
    addresses: dict[int, str]


_envelope_encoder = msgspec.msgpack.Encoder()
_envelope_decoder: msgspec.msgpack.Decoder[_SnapshotEnvelope] = msgspec.msgpack.Decoder(
    _SnapshotEnvelope
)


class ProposalLost(LeptonError):
    """The slot a command was proposed into committed another value: it did not take effect."""


class LeadershipLost(LeptonError):
    """This replica stopped leading while the command was in flight: it may still commit."""


@dataclass(frozen=True)
class DriverConfig:
    tick_s: float = 0.02  # one core tick; election timeouts are a number of ticks
    ticks_per_pass_max: int = 4  # after a stall (SIGSTOP, GC) do not fire a burst of ticks
    inbox_max: int = 65_536  # peer messages waiting for the loop; beyond: dropped (Paxos resends)
    proposals_pending_max: int = 65_536  # commands proposed and not yet committed
    proposals_per_pass_max: int = 2048  # commands handed to the core per loop pass
    # While this many slots are uncommitted, a leader keeps new proposals in its queue:
    # they all go into the next slot once one commits. A busy leader otherwise seals a
    # slot per loop pass (~1.4 commands each under a task stream) and pays a round of
    # messages, WAL writes and follower passes for every one. The default leaves the
    # pipeline to the core (PaxosConfig.inflight_max); the coordinator uses 1.
    slots_in_flight_max: int = 1024
    # A leader opens a new slot at most once per this interval while it is busy: while
    # commands queued up behind the slot that committed last, or that slot carried at
    # least ``stream_batch_min`` commands. An idle leader's command goes at once, also
    # one that a commit's own apply proposes (a job's JobFinished after its last
    # TaskFinished): pacing it would add the interval to the critical path of every
    # stage for nothing. Bounds replication rounds per second (each costs every
    # follower a wake-up, a read, a WAL write and a reply), so a stream of commands
    # rides in fewer, larger slots. 0: no pacing.
    batch_interval_s: float = 0.0
    stream_batch_min: int = 4
    submit_timeout_s: float = 10.0  # LogHost.submit / read_barrier deadline
    # A brand-new group's lowest id campaigns once it reaches a quorum of peers, within
    # this long (then the ordinary election timeouts decide); polled at this interval.
    first_campaign_wait_s: float = 2.0
    first_campaign_poll_s: float = 0.005
    transport: TransportConfig = field(default_factory=TransportConfig)

    def __post_init__(self) -> None:
        if self.tick_s <= 0 or self.ticks_per_pass_max < 1 or self.inbox_max < 1:
            raise ValueError("tick_s, ticks_per_pass_max and inbox_max must be positive")
        if self.slots_in_flight_max < 1 or self.proposals_per_pass_max < 1:
            raise ValueError("slots_in_flight_max and proposals_per_pass_max must be >= 1")
        if self.stream_batch_min < 1:
            raise ValueError("stream_batch_min must be >= 1")
        if not 0.0 <= self.batch_interval_s < self.submit_timeout_s:
            raise ValueError("batch_interval_s must be >= 0 and below submit_timeout_s")


class ReplicaDriver:
    """Runs one ``Replica`` core with its storage, transport and state machine."""

    def __init__(
        self,
        paxos: PaxosConfig,
        addresses: dict[int, str],
        state_machine: StateMachine,
        storage: ReplicaStorage,
        replica: Replica,
        *,
        token: str,
        peer_codec: Codec[object],
        config: DriverConfig | None = None,
    ) -> None:
        self.paxos = paxos
        self.node_id = paxos.node_id
        self.addresses = dict(addresses)
        self.state_machine = state_machine
        self.storage = storage
        self.core = replica
        self.config = config or DriverConfig()
        self._token = token
        self._codec = peer_codec
        self.links: dict[int, PeerLink] = {}
        for peer, address in self.addresses.items():
            if peer != self.node_id:
                self.links[peer] = self._new_link(peer, address)
        self._inbox: deque[PeerMessage] = deque()
        self._proposals: deque[tuple[bytes, Done]] = deque()
        self.timings = ConsensusTimings()  # the cost model's p, d, u, e, as measured
        self._read_requests: deque[Done] = deque()
        self._waiting: dict[int, list[tuple[ProposalId, Done]]] = {}
        self._waiting_count = 0
        self._reads: dict[int, Done] = {}
        self._read_ids = 0
        self._wake = asyncio.Event()
        self._callbacks: list[Callable[[bool], None]] = []
        self._was_leader = False
        self._last_tick = time.monotonic()
        self._last_heard = self._last_tick  # monotonic time a peer message last arrived
        self._last_batch = 0.0  # monotonic time proposals last went into the core
        self._batch_timer: asyncio.TimerHandle | None = None
        self._paced = False  # busy: pace new slots (see DriverConfig.batch_interval_s)
        self._last_batch_size = 0  # commands the leader's newest slot took
        self._seen_commit = 0
        self._campaign_now = False  # set by _first_campaign, acted on in the next pass
        self._extra_tasks: set[asyncio.Task[None]] = set()
        # Links the leader opened to learners (standbys), by node: closed when the core
        # forgets the learner, kept (as a member's) once a change adds it.
        self._learner_links: dict[int, asyncio.Task[None]] = {}
        self._removed_logged = False
        self._pass_end: list[Callable[[], None]] = []
        self._in_pass = False
        self.dropped_inbox = 0
        self.passes = 0
        self.leader_changes = 0  # times the leader this replica knows of changed
        self._last_leader: int | None = None

    @classmethod
    def create(
        cls,
        paxos: PaxosConfig,
        addresses: dict[int, str],
        state_machine: StateMachine,
        storage: ReplicaStorage,
        durable: DurableState,
        *,
        token: str,
        peer_codec: Codec[object],
        config: DriverConfig | None = None,
    ) -> ReplicaDriver:
        """Build the core from recovered durable state (election jitter from the OS RNG)."""
        replica = Replica(paxos, durable, random_fn=random.Random().random)
        return cls(
            paxos,
            addresses,
            state_machine,
            storage,
            replica,
            token=token,
            peer_codec=peer_codec,
            config=config,
        )

    def _new_link(self, peer: int, address: str) -> PeerLink:
        return PeerLink(
            self.node_id,
            peer,
            address,
            token=self._token,
            codec=self._codec,
            config=self.config.transport,
        )

    # -- LogHost ----------------------------------------------------------------------------
    @property
    def is_leader(self) -> bool:
        return self.core.is_leader

    @property
    def leader_id(self) -> int | None:
        return self.core.leader_id

    @property
    def leader_address(self) -> str | None:
        leader = self.core.leader_id
        return None if leader is None else self.addresses.get(leader)

    def on_leadership(self, callback: Callable[[bool], None]) -> None:
        self._callbacks.append(callback)

    @property
    def removed(self) -> bool:
        """A committed change removed this replica (``Replica.removed``): stop it."""
        return self.core.removed

    def on_pass_end(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` at the end of every loop pass, after that pass resolved its
        waiting callers: a server flushes the pass's replies there, in the same turn."""
        self._pass_end.append(callback)

    @property
    def in_pass(self) -> bool:
        """True while a loop pass runs (callers resolved now are flushed at its end)."""
        return self._in_pass

    async def submit(self, command: bytes) -> bytes:
        try:
            return await asyncio.wait_for(self.propose(command), self.config.submit_timeout_s)
        except TimeoutError as exc:
            raise Unavailable(
                f"command not committed within {self.config.submit_timeout_s:g}s"
            ) from exc

    async def read_barrier(self) -> None:
        try:
            await asyncio.wait_for(self.read_index(), self.config.submit_timeout_s)
        except TimeoutError as exc:
            raise Unavailable(
                f"read index not confirmed within {self.config.submit_timeout_s:g}s"
            ) from exc

    # -- callback-style entry points (the server's hot path) -------------------------------
    def propose_cb(self, command: bytes, done: Done) -> None:
        """Queue ``command``; ``done(result, None)`` once applied, ``done(None, error)`` if
        it failed: NotLeader, Overloaded, ProposalLost (did not take effect) or
        LeadershipLost (may still take effect)."""
        if not self.core.is_leader:
            done(None, NotLeader(self.leader_address))
        elif self._waiting_count + len(self._proposals) >= self.config.proposals_pending_max:
            done(None, Overloaded("too many proposals pending"))
        else:
            self._proposals.append((command, done))
            self.timings.queued()
            self._wake.set()

    def read_index_cb(self, done: Done) -> None:
        """``done(b"", None)`` once local state reflects every command committed before
        the call (linearizable read point), ``done(None, error)`` otherwise."""
        if not self.core.is_leader:
            done(None, NotLeader(self.leader_address))
        else:
            self._read_requests.append(done)
            self._wake.set()

    def change_members_cb(self, add: bool, node: int, address: str, done: Done) -> None:
        """Propose adding ``node`` (reachable at ``address``) or removing it; one change at a
        time. ``done(b"", None)`` once the new configuration is committed."""
        try:
            if add:
                _check_address(address)
                pid = self.core.add_member(node, f"{node}={address}".encode())
                # Link now: the joint quorum may need the newcomer before the change commits.
                self.addresses[node] = address
                if node not in self.links and node != self.node_id:
                    link = self._new_link(node, address)
                    self.links[node] = link
                    self._spawn_link(link)
            else:
                pid = self.core.remove_member(node)
        except NotLeader:
            done(None, NotLeader(self.leader_address))
            return
        except (Overloaded, ValueError) as exc:
            done(None, exc)
            return
        self._waiting.setdefault(pid.slot, []).append((pid, done))
        self._waiting_count += 1
        self._wake.set()

    def propose(self, command: bytes) -> asyncio.Future[bytes]:
        """``propose_cb`` as a future."""
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.propose_cb(command, _resolver(fut))
        return fut

    def read_index(self) -> asyncio.Future[None]:
        """``read_index_cb`` as a future."""
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.read_index_cb(_resolver(fut))
        return asyncio.ensure_future(_discard(fut))

    def deliver(self, msg: PeerMessage) -> None:
        """A message from a peer (called by the server's connection handlers)."""
        if len(self._inbox) >= self.config.inbox_max:
            self.dropped_inbox += 1
            return
        self._inbox.append(msg)
        self._last_heard = time.monotonic()
        self._wake.set()

    # -- the loop -------------------------------------------------------------------------
    async def run(self) -> None:
        """Run until cancelled: the peer links, the ticker and the Ready loop."""
        async with asyncio.TaskGroup() as tg:
            for link in self.links.values():
                tg.create_task(link.run(), name=f"peer-link-{link.peer_id}")
            tg.create_task(self._ticker(), name="ticker")
            tg.create_task(self._loop(), name="ready-loop")
            if self._first_of_new_group():
                tg.create_task(self._first_campaign(), name="first-campaign")

    def _first_of_new_group(self) -> bool:
        """True on the lowest-id member of a group that never ran: an empty log, no
        ballot ever promised. It campaigns as soon as it can reach a quorum instead of
        waiting out an election timeout (the others keep their randomised timeouts, so
        if it is slow to come up one of them takes over as usual)."""
        core = self.core
        members = core.members
        return (
            core.promised == ZERO_BALLOT
            and core.log.last == 0
            and bool(members)
            and self.node_id == min(members)
        )

    async def _first_campaign(self) -> None:
        deadline = time.monotonic() + self.config.first_campaign_wait_s
        quorum = len(self.core.members) // 2  # peers needed besides this replica
        while time.monotonic() < deadline:
            if self.core.promised != ZERO_BALLOT or self.core.leader_id is not None:
                return  # someone campaigned already: a normal election is under way
            if sum(1 for link in self.links.values() if link.connected) >= quorum:
                self._campaign_now = True
                self._wake.set()
                return
            await asyncio.sleep(self.config.first_campaign_poll_s)

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.config.tick_s * self._ticks_per_wake())
            self._wake.set()

    def _ticks_per_wake(self) -> int:
        """How many ticks the ticker may let pass before it wakes the loop.

        Every pass catches up the ticks due (up to ``ticks_per_pass_max``), so a longer
        sleep loses no tick, it only delivers them later. Waking every tick costs each
        replica 50 loop passes a second for nothing while it hears from a leader; a
        leader needs its ticks only for heartbeats (every ``heartbeat_ticks``), and a
        follower that hears from its leader needs none (messages wake it, and their pass
        ticks too). A follower silent for ``heartbeat_ticks`` (or with no leader, or a
        candidate) ticks every tick again, so elections start on time and the randomised
        timeouts keep their spread: the switch comes at most ``heartbeat_ticks +
        ticks_per_pass_max - 1`` ticks after the silence begins (5 by default), before
        ``election_ticks_min`` (10).
        """
        core = self.core
        cap = self.config.ticks_per_pass_max
        if core.is_leader:
            return max(1, min(self.paxos.heartbeat_ticks, cap))
        silent_s = time.monotonic() - self._last_heard
        if core.leader_id is None or silent_s >= self.paxos.heartbeat_ticks * self.config.tick_s:
            return 1
        return max(1, cap - 1)  # one tick of slack: a late wake-up past the cap drops ticks

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._pass()
            # Let connection readers run (and fill the inbox) before the next pass.
            await asyncio.sleep(0)

    def _pass(self) -> None:
        self._in_pass = True
        try:
            self._pass_body()
        finally:
            self._in_pass = False
        for callback in self._pass_end:
            callback()

    def _pass_body(self) -> None:
        self.passes += 1
        # Messages before ticks: after this process was starved of CPU, the leader's
        # heartbeats waiting in the inbox must count before the time that passed does.
        while self._inbox:
            self.core.step(self._inbox.popleft())
        self._note_commit()  # before _take_proposals drains the queue
        if self._campaign_now:
            self._campaign_now = False
            if self.core.promised == ZERO_BALLOT and self.core.leader_id is None:
                self.core.campaign()
        now = time.monotonic()
        due = int((now - self._last_tick) / self.config.tick_s)
        if due > 0:
            self._last_tick += due * self.config.tick_s
            for _ in range(min(due, self.config.ticks_per_pass_max)):
                self.core.tick()
        self._take_proposals()
        self._take_reads()
        while self.core.has_ready():
            rd = self.core.ready()
            self._handle(rd)
            self.core.advance(rd)
            if self.core.compaction_due():
                envelope = _SnapshotEnvelope(self.state_machine.snapshot(), self.addresses)
                self.core.compact(_envelope_encoder.encode(envelope))
            if rd.is_empty():
                # has_ready() stays true while reads wait for heartbeat acks; those
                # arrive as messages, in a later pass.
                break
        self._note_leadership()
        if self.core.is_leader:
            self._sync_learner_links()
        elif self._learner_links:
            self._drop_learner_links(list(self._learner_links))  # a follower streams nothing
        if not self._removed_logged and self.core.removed:
            self._removed_logged = True
            log.warning("node %s: removed from the group by a committed change", self.node_id)
        if self._proposals and not self._holding():
            self._wake.set()  # more than one pass's share; a held queue waits for a commit

    def _holding(self) -> bool:
        """True while proposals wait for a slot to commit or, while the leader is busy
        (``_note_commit``), for the batch interval to pass (a leader only: a follower's
        queue is drained at once, every command failing with NotLeader). A commit
        arrives as a message and wakes the loop; the end of the interval is woken by a
        timer."""
        core = self.core
        if not core.is_leader:
            return False
        if core.log.last - core.log.commit >= self.config.slots_in_flight_max:
            return True
        if not self._paced:
            return False
        wait_s = self._last_batch + self.config.batch_interval_s - time.monotonic()
        if wait_s <= 0:
            return False
        if self._batch_timer is None:
            self._batch_timer = asyncio.get_running_loop().call_later(wait_s, self._batch_due)
        return True

    def _note_commit(self) -> None:
        """On the first sight of a new commit point: were commands queued behind the slot
        that committed, or was that slot a large one? Then the leader is busy and paces
        its slots; if not, it is idle and the next command goes at once
        (DriverConfig.batch_interval_s). A momentarily empty queue in a stream of
        commands does not count as idle: the stream's slots are large."""
        commit = self.core.log.commit
        if commit > self._seen_commit:
            self._seen_commit = commit
            self._paced = (
                bool(self._proposals) or self._last_batch_size >= self.config.stream_batch_min
            )

    def _batch_due(self) -> None:
        self._batch_timer = None
        self._wake.set()

    def _take_proposals(self) -> None:
        if not self._proposals or self._holding():
            return
        self._last_batch = time.monotonic()
        # Bounded per pass so one burst cannot stall heartbeats and replies for long.
        self._last_batch_size = min(len(self._proposals), self.config.proposals_per_pass_max)
        self.timings.proposing(self._last_batch_size, self._last_batch)
        for _ in range(self._last_batch_size):
            command, done = self._proposals.popleft()
            try:
                pid = self.core.propose(command)
            except NotLeader:
                done(None, NotLeader(self.leader_address))
                continue
            except (Overloaded, ValueError, TypeError) as exc:
                done(None, exc)
                continue
            self._waiting.setdefault(pid.slot, []).append((pid, done))
            self._waiting_count += 1
            self.timings.sent(pid.slot, self._last_batch)

    def _take_reads(self) -> None:
        while self._read_requests:
            done = self._read_requests.popleft()
            self._read_ids += 1
            try:
                self.core.read_index(self._read_ids)
            except NotLeader:
                done(None, NotLeader(self.leader_address))
                continue
            except Overloaded as exc:
                done(None, exc)
                continue
            self._reads[self._read_ids] = done

    def _handle(self, rd: Ready) -> None:
        # A leader's Accept/Heartbeat is a proposal, not a vote: it goes out before this
        # replica's own fdatasync, so the followers' fdatasyncs overlap it (Ongaro's
        # thesis, 10.2.1). Safe because this replica's own acceptance is counted only in
        # a later pass (peers' Accepted arrive after this pass, whose fdatasync has then
        # completed), and a promise or an acceptance (Promise, Accepted, HeartbeatAck,
        # Nack) still leaves only after the fdatasync. lepton_ai.sim runs the same rule,
        # so the seeded fuzz exercises this order under crashes.
        early, late = split_early(rd)
        self._send(early)
        self.storage.persist(rd)  # fdatasync here when rd.must_sync ...
        for entry in rd.persist_entries:
            # A pending membership change needs links before it commits: if this replica
            # becomes leader mid-change, the new configuration's quorum includes the newcomer.
            if entry.value.kind == KIND_CONFIG:
                self._learn_config(entry.value)
        self._send(late)  # ... and only then do votes leave
        if rd.snapshot_to_install is not None:
            self._install(rd.snapshot_to_install.data, rd.snapshot_to_install.members)
            self._fail_waiting_through(rd.snapshot_to_install.slot)
        self._note_commit()  # before the applies: what they propose is no backlog
        for slot, value in rd.committed:
            self._apply(slot, value)
        for rid in rd.reads_ready:
            done = self._reads.pop(rid, None)
            if done is not None:
                done(b"", None)
        for rid in rd.reads_failed:
            done = self._reads.pop(rid, None)
            if done is not None:
                done(None, NotLeader(self.leader_address))

    def _send(self, messages: Sequence[tuple[int, PeerMessage]]) -> None:
        """One write per peer."""
        if not messages:
            return
        by_peer: dict[int, list[PeerMessage]] = {}
        for to, msg in messages:
            by_peer.setdefault(to, []).append(msg)
        for to, msgs in by_peer.items():
            link = self.links.get(to)
            if link is not None:
                link.send_many(msgs)

    def _install(self, data: bytes, members: tuple[int, ...]) -> None:
        """Restore the state machine from a snapshot, and the address book saved with it
        (members added at run time are not in ``--peers``)."""
        envelope = _envelope_decoder.decode(data)
        self.state_machine.restore(envelope.state)
        for node, address in envelope.addresses.items():
            self.addresses.setdefault(node, address)
        self._link_members(members)

    def _link_members(self, members: tuple[int, ...]) -> None:
        for peer in members:
            if peer != self.node_id and peer not in self.links and peer in self.addresses:
                link = self._new_link(peer, self.addresses[peer])
                self.links[peer] = link
                self._spawn_link(link)

    def _apply(self, slot: int, value: Value) -> None:
        results: list[bytes] = []
        if value.kind == KIND_COMMANDS:
            apply = self.state_machine.apply
            self.timings.committed(slot)
            started = time.perf_counter()
            results = [apply(cmd) for cmd in value.commands]
            self.timings.applied(len(value.commands), time.perf_counter() - started)
        elif value.kind == KIND_CONFIG:
            self._apply_config(value)
            results = [b""]
        waiting = self._waiting.pop(slot, None)
        if not waiting:
            return
        self._waiting_count -= len(waiting)
        for pid, done in waiting:
            if pid.matches(value) and pid.index < len(results):
                done(results[pid.index], None)
            else:
                done(None, ProposalLost(f"slot {slot} chose another value"))

    def _apply_config(self, value: Value) -> None:
        """A committed membership change: learn a new member's address and link to it."""
        self._learn_config(value)
        log.info("node %s: members are now %s", self.node_id, list(value.members))

    def _learn_config(self, value: Value) -> None:
        """Learn the address a membership change carries and link to every member in it."""
        payload = value.commands[0] if value.commands else b""
        if payload:
            node_text, _, address = payload.decode().partition("=")
            if node_text.isdigit():
                self.addresses.setdefault(int(node_text), address)
        self._link_members(value.members)

    def _spawn_link(self, link: PeerLink) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(link.run(), name=f"peer-link-{link.peer_id}")
        self._extra_tasks.add(task)
        task.add_done_callback(self._extra_tasks.discard)
        return task

    def _sync_learner_links(self) -> None:
        """Link to every learner the leading core streams the log to (at the address it
        announced), and drop the links of learners it forgot. Bounded by the core's
        ``learners_max``."""
        wanted = self.core.learner_addresses()
        for node, address in wanted.items():
            link = self.links.get(node)
            moved = link is not None and link.address != address
            if moved and node in self._learner_links and node not in self.addresses:
                self._drop_learner_links([node])  # restarted elsewhere: redial
                link = None
            if link is None and node != self.node_id and _valid_address(address):
                link = self._new_link(node, address)
                self.links[node] = link
                self._learner_links[node] = self._spawn_link(link)
        forgotten = [n for n in self._learner_links if n not in wanted]
        if forgotten:
            self._drop_learner_links(forgotten)

    def _drop_learner_links(self, nodes: list[int]) -> None:
        """Close the links to ``nodes``, except those of learners a membership change
        made members (in ``addresses``: their link is an ordinary peer link now)."""
        for node in nodes:
            task = self._learner_links.pop(node, None)
            if task is None or node in self.addresses:
                continue
            task.cancel()
            self.links.pop(node, None)

    def _fail_waiting_through(self, slot: int) -> None:
        for s in [s for s in self._waiting if s <= slot]:
            for _, done in self._waiting.pop(s):
                self._waiting_count -= 1
                done(None, LeadershipLost("slot overtaken by an installed snapshot"))

    def _note_leadership(self) -> None:
        if self.core.leader_id != self._last_leader:
            self._last_leader = self.core.leader_id
            self.leader_changes += 1
            self.timings.leader_changed(self.core.leader_id is not None, self.core.is_leader)
        leading = self.core.is_leader
        if leading == self._was_leader:
            return
        self._was_leader = leading
        if not leading:
            # In-flight commands may still be chosen by the next leader; callers retry
            # with the same session sequence, which the state machine deduplicates.
            for waiting in self._waiting.values():
                for _, done in waiting:
                    done(None, LeadershipLost("leadership lost; retry on the leader"))
            self._waiting.clear()
            self._waiting_count = 0
        log.info("node %s %s leadership", self.node_id, "gained" if leading else "lost")
        for callback in self._callbacks:
            callback(leading)

    async def close(self) -> None:
        if self._batch_timer is not None:
            self._batch_timer.cancel()
            self._batch_timer = None
        for task in list(self._extra_tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.storage.close()


def _check_address(address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"bad replica address {address!r}; expected host:port")


def _valid_address(address: str) -> bool:
    try:
        _check_address(address)
    except ValueError:
        return False
    return True


def _resolver(fut: asyncio.Future[bytes]) -> Done:
    def done(result: bytes | None, error: BaseException | None) -> None:
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result or b"")

    return done


async def _discard(fut: asyncio.Future[bytes]) -> None:
    await fut
