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
Its settings are ``driver_config.DriverConfig``, its address book and peer links
``driver_links.PeerLinks``, the pacing of a busy leader's slots
``driver_pacing.SlotPacer``, the callers it owes an answer ``driver_waiters.Waiters``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable

from lepton_ai.consensus.core import Replica
from lepton_ai.consensus.core_types import (
    DurableState,
    Overloaded,
    PaxosConfig,
    Ready,
)
from lepton_ai.consensus.driver_config import DriverConfig
from lepton_ai.consensus.driver_links import (
    PeerLinks,
    check_address,
    decode_snapshot,
    encode_snapshot,
)
from lepton_ai.consensus.driver_pacing import SlotPacer
from lepton_ai.consensus.driver_waiters import Done, Waiters, discard, resolver
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
from lepton_ai.consensus.transport import PeerLink
from lepton_ai.errors import Unavailable
from lepton_ai.wire import Codec

log = logging.getLogger("lepton_ai.consensus.driver")


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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # Every time the shell reads (ticks, silence, pacing, timings) comes from
        # ``clock``, monotonic seconds; its sleeps are the event loop's, which reads
        # the same clock by default. A test runs it on a fake loop clock (looptime)
        # and passes ``loop.time``, so its timing windows are exact.
        self._clock = clock
        self.paxos = paxos
        self.node_id = paxos.node_id
        self.state_machine = state_machine
        self.storage = storage
        self.core = replica
        self.config = config or DriverConfig()
        self.peers = PeerLinks(
            self.node_id,
            addresses,
            token=token,
            codec=peer_codec,
            transport=self.config.transport,
        )
        self._inbox: deque[PeerMessage] = deque()
        self._proposals: deque[tuple[bytes, Done]] = deque()
        self.timings = ConsensusTimings(clock)  # the cost model's p, d, u, e, as measured
        self._read_requests: deque[Done] = deque()
        self._waiters = Waiters()
        self._wake = asyncio.Event()
        self._callbacks: list[Callable[[bool], None]] = []
        self._was_leader = False
        self._last_tick = self._clock()
        self._last_heard = self._last_tick  # monotonic time a peer message last arrived
        self._pacer = SlotPacer(self.config, self._wake.set, clock)
        self._campaign_now = False  # set by _first_campaign, acted on in the next pass
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
        clock: Callable[[], float] = time.monotonic,
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
            clock=clock,
        )

    @property
    def addresses(self) -> dict[int, str]:
        """Replica id -> address, every one this replica knows of (``PeerLinks``)."""
        return self.peers.addresses

    @property
    def links(self) -> dict[int, PeerLink]:
        """Peer id -> the link to it (``PeerLinks``)."""
        return self.peers.links

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
        elif self._waiters.count + len(self._proposals) >= self.config.proposals_pending_max:
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
                check_address(address)
                pid = self.core.add_member(node, f"{node}={address}".encode())
                # Link now: the joint quorum may need the newcomer before the change commits.
                self.peers.add_member(node, address)
            else:
                pid = self.core.remove_member(node)
        except NotLeader:
            done(None, NotLeader(self.leader_address))
            return
        except (Overloaded, ValueError) as exc:
            done(None, exc)
            return
        self._waiters.add(pid, done)
        self._wake.set()

    def propose(self, command: bytes) -> asyncio.Future[bytes]:
        """``propose_cb`` as a future."""
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.propose_cb(command, resolver(fut))
        return fut

    def read_index(self) -> asyncio.Future[None]:
        """``read_index_cb`` as a future."""
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.read_index_cb(resolver(fut))
        return asyncio.ensure_future(discard(fut))

    def deliver(self, msg: PeerMessage) -> None:
        """A message from a peer (called by the server's connection handlers)."""
        if len(self._inbox) >= self.config.inbox_max:
            self.dropped_inbox += 1
            return
        self._inbox.append(msg)
        self._last_heard = self._clock()
        self._wake.set()

    # -- the loop -------------------------------------------------------------------------
    async def run(self) -> None:
        """Run until cancelled: the peer links, the ticker and the Ready loop."""
        async with asyncio.TaskGroup() as tg:
            for link in self.peers.links.values():
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
        deadline = self._clock() + self.config.first_campaign_wait_s
        quorum = len(self.core.members) // 2  # peers needed besides this replica
        while self._clock() < deadline:
            if self.core.promised != ZERO_BALLOT or self.core.leader_id is not None:
                return  # someone campaigned already: a normal election is under way
            if sum(1 for link in self.peers.links.values() if link.connected) >= quorum:
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
        silent_s = self._clock() - self._last_heard
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
        now = self._clock()
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
                snapshot = encode_snapshot(self.state_machine.snapshot(), self.peers.addresses)
                self.core.compact(snapshot)
            if rd.is_empty():
                # has_ready() stays true while reads wait for heartbeat acks; those
                # arrive as messages, in a later pass.
                break
        self._note_leadership()
        if self.core.is_leader:
            self.peers.sync_learners(self.core.learner_addresses())
        elif self.peers.has_learner_links:
            self.peers.drop_all_learners()  # a follower streams nothing
        if not self._removed_logged and self.core.removed:
            self._removed_logged = True
            log.warning("node %s: removed from the group by a committed change", self.node_id)
        if self._proposals and not self._pacer.holding(self.core):
            self._wake.set()  # more than one pass's share; a held queue waits for a commit

    def _note_commit(self) -> None:
        """Tell the pacer the commit point, and whether commands are queued behind it
        (``SlotPacer.note_commit``: is the leader busy?)."""
        self._pacer.note_commit(self.core.log.commit, bool(self._proposals))

    def _take_proposals(self) -> None:
        if not self._proposals or self._pacer.holding(self.core):
            return
        now = self._clock()
        taken = self._pacer.take(len(self._proposals), now)
        self.timings.proposing(taken, now)
        for _ in range(taken):
            command, done = self._proposals.popleft()
            try:
                pid = self.core.propose(command)
            except NotLeader:
                done(None, NotLeader(self.leader_address))
                continue
            except (Overloaded, ValueError, TypeError) as exc:
                done(None, exc)
                continue
            self._waiters.add(pid, done)
            self.timings.sent(pid.slot, now)

    def _take_reads(self) -> None:
        while self._read_requests:
            done = self._read_requests.popleft()
            rid = self._waiters.next_read_id()
            try:
                self.core.read_index(rid)
            except NotLeader:
                done(None, NotLeader(self.leader_address))
                continue
            except Overloaded as exc:
                done(None, exc)
                continue
            self._waiters.add_read(rid, done)

    def _handle(self, rd: Ready) -> None:
        # A leader's Accept/Heartbeat is a proposal, not a vote: it goes out before this
        # replica's own fdatasync, so the followers' fdatasyncs overlap it (Ongaro's
        # thesis, 10.2.1). Safe because this replica's own acceptance is counted only in
        # a later pass (peers' Accepted arrive after this pass, whose fdatasync has then
        # completed), and a promise or an acceptance (Promise, Accepted, HeartbeatAck,
        # Nack) still leaves only after the fdatasync. lepton_ai.sim runs the same rule,
        # so the seeded fuzz exercises this order under crashes.
        early, late = split_early(rd)
        self.peers.send(early)
        self.storage.persist(rd)  # fdatasync here when rd.must_sync ...
        for entry in rd.persist_entries:
            # A pending membership change needs links before it commits: if this replica
            # becomes leader mid-change, the new configuration's quorum includes the newcomer.
            if entry.value.kind == KIND_CONFIG:
                self.peers.learn_config(entry.value)
        self.peers.send(late)  # ... and only then do votes leave
        if rd.snapshot_to_install is not None:
            self._install(rd.snapshot_to_install.data, rd.snapshot_to_install.members)
            self._waiters.fail_through(rd.snapshot_to_install.slot)
        self._note_commit()  # before the applies: what they propose is no backlog
        for slot, value in rd.committed:
            self._apply(slot, value)
        for rid in rd.reads_ready:
            done = self._waiters.take_read(rid)
            if done is not None:
                done(b"", None)
        for rid in rd.reads_failed:
            done = self._waiters.take_read(rid)
            if done is not None:
                done(None, NotLeader(self.leader_address))

    def _install(self, data: bytes, members: tuple[int, ...]) -> None:
        """Restore the state machine from a snapshot, and the address book saved with it
        (members added at run time are not in ``--peers``)."""
        envelope = decode_snapshot(data)
        self.state_machine.restore(envelope.state)
        self.peers.learn_addresses(envelope.addresses, members)

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
        self._waiters.applied(slot, value, results)

    def _apply_config(self, value: Value) -> None:
        """A committed membership change: learn a new member's address and link to it."""
        self.peers.learn_config(value)
        log.info("node %s: members are now %s", self.node_id, list(value.members))

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
            self._waiters.fail_all()  # in-flight commands may still be chosen
        log.info("node %s %s leadership", self.node_id, "gained" if leading else "lost")
        for callback in self._callbacks:
            callback(leading)

    async def close(self) -> None:
        self._pacer.cancel()
        await self.peers.close()
        self.storage.close()
