"""The coordinator on the Multi-Paxos log: one combined state machine, leader-only controllers.

    lepton coordinator --id N --peers 0=h:p,1=h:p,2=h:p --port P --data-dir D --token T

``--peers`` are the Paxos addresses (replica to replica, and the KV clients of
``cluster.kv``); ``--port`` is the node protocol (workers and job clients).

``CoordinatorMachine`` is the state the replicas agree on: the job state machine
and the KV machine in one log (so ``cluster.kv`` and jobs share it), plus the
client address of each elected leader and a bounded event log. It subclasses
``KvMachine`` so the consensus server serves linearizable KV reads from it.

Leadership: when the Paxos driver reports that this replica leads, the
coordinator first commits ``LeaderElected`` through the log. Once that command is
applied, every command of earlier ballots is applied here too (log order), so the
scheduler rebuilt by ``Scheduler.from_state`` sees the whole history. Only then
do the scheduler and the failure detector start. When the driver reports the
loss of leadership they stop at once (``Coordinator.step_down``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable

import msgspec

from lepton_ai.compute.job_state import (
    ApplyResult,
    JobCommand,
    JobStateConfig,
    JobStateMachine,
    decode_command,
    encode_command,
)
from lepton_ai.compute.scheduler_events import (
    Propose,
    ProposeFailed,
    SchedulerEvent,
    TaskFailed,
)
from lepton_ai.consensus.client import KvClient
from lepton_ai.consensus.driver import ReplicaDriver
from lepton_ai.consensus.kv import KvMachine
from lepton_ai.consensus.server import ReplicaHost, ReplicaOptions
from lepton_ai.errors import LeptonError
from lepton_ai.monitor import metrics
from lepton_ai.monitor.events import EventKind
from lepton_ai.node.coord_config import CoordinatorConfig
from lepton_ai.node.coord_http import attach_http, http_address_of
from lepton_ai.node.coord_machine import apply_deploy_bytes, apply_job_command
from lepton_ai.node.coord_monitor import paxos_metrics
from lepton_ai.node.coordinator import Coordinator
from lepton_ai.node.messages import Event, MemberInfo
from lepton_ai.serve.spec import DeploymentsMachine
from lepton_ai.storage.messages import ObjectMeta
from lepton_ai.storage.meta import (
    StorageStateMachine,
    decode_storage_command,
    encode_storage_result,
)

log = logging.getLogger("lepton_ai.coordinator.replicated")

EPOCH_NODES_MAX = 1024  # epoch = ballot round * this + node id: unique, ordered like ballots
TAKE_OVER_ATTEMPTS_MAX = 1000  # LeaderElected proposals per term before giving up
TAKE_OVER_RETRY_S = 0.05
# Slot pacing of the leader (DriverConfig): one uncommitted slot at a time, and a new
# slot at most every 5 ms while busy (an idle leader's command still goes at once). What
# arrives meanwhile shares the next slot: 10,000 trivial tasks take a few hundred slots
# instead of ~1,300, and each slot costs every follower a wake-up, a read, a WAL write and a
# reply, the bulk of what 3 coordinators cost over 1 on 2 cores. 5 ms rather than 2 ms:
# on a loaded machine the coordinators' CPU for 10k tasks drops ~0.2 s (interleaved runs);
# the price, up to 5 ms more commit latency for a busy leader, is not on the critical
# path of throughput (a task's slot frees on the worker's report, not on the commit).
SLOT_INTERVAL_S = 0.005
SLOTS_IN_FLIGHT_MAX = 1
# A TaskFinished the scheduler marks not urgent (its stage has tasks still to report)
# waits up to this long for company: a stream of 10 ms tasks reports ~200 results a
# second in ones and twos, each of which an idle-looking leader would otherwise put in
# a slot of its own (a round of accepts, follower passes, WAL writes and replies).
# Held commands go before any urgent proposal, so a stage's end is never delayed.
FINISHED_HOLD_S = 0.02
FINISHED_HELD_MAX = 512  # held commands; the batch goes at once when this many wait
PEER_PID_POLL_S = 0.2  # how often a replica looks for peers (re)connected since it asked
PEER_STATUS_TIMEOUT_S = 1.0  # one status query to a peer replica


class LeaderElected(msgspec.Struct, frozen=True, tag="LeaderElected"):
    node: int
    address: str  # the leader's node-protocol (client) address
    epoch: int
    t: float


class ClusterEvent(msgspec.Struct, frozen=True, tag="ClusterEvent"):
    """A timeline entry the leader wants every replica (and the next leader) to keep."""

    t: float
    kind: str
    detail: str = ""
    job_id: str = ""


MetaCommand = LeaderElected | ClusterEvent
_meta_encoder = msgspec.msgpack.Encoder()
_meta_decoder = msgspec.msgpack.Decoder(MetaCommand)
_OK = _meta_encoder.encode(ApplyResult(True))


class _Snapshot(msgspec.Struct, array_like=True):
    jobs: bytes
    kv: bytes
    leaders: dict[int, str]
    events: list[Event]
    storage: bytes = b""
    deployments: bytes = b""


_snap_encoder = msgspec.msgpack.Encoder()
_snap_decoder = msgspec.msgpack.Decoder(_Snapshot)


def encode_meta(cmd: MetaCommand) -> bytes:
    return _meta_encoder.encode(cmd)


class CoordinatorMachine(KvMachine):
    """Jobs + stored objects' metadata + KV + leader addresses + the replicated event
    log, on one log."""

    def __init__(self, jobs: JobStateConfig | None = None, events_max: int = 2_000) -> None:
        super().__init__()
        self.jobs = JobStateMachine(jobs)
        self.storage = StorageStateMachine()
        self.deployments = DeploymentsMachine()
        self.listener: Callable[[JobCommand, ApplyResult], None] | None = None
        self.storage_listener: Callable[[list[ObjectMeta]], None] | None = None
        self.leaders: dict[int, str] = {}  # Paxos node id -> its client address
        self.events: deque[Event] = deque(maxlen=events_max)

    def apply(self, command: bytes) -> bytes:
        # Job commands and meta commands are tagged msgspec maps; KV commands carry
        # other tags, so each decoder rejects the other's bytes (deterministically).
        try:
            cmd = decode_command(command)
        except ValueError:
            pass
        else:
            return apply_job_command(self, cmd)
        try:
            meta = _meta_decoder.decode(command)
        except msgspec.DecodeError:
            pass
        else:
            return self._apply_meta(meta)
        deployed = apply_deploy_bytes(self, command)
        if deployed is not None:
            return deployed
        try:
            scmd = decode_storage_command(command)
        except ValueError:
            return super().apply(command)
        res = self.storage.apply_command(scmd)
        if res.removed and self.storage_listener is not None:
            self.storage_listener(res.removed)
        return encode_storage_result(res)

    def _apply_meta(self, meta: MetaCommand) -> bytes:
        if isinstance(meta, LeaderElected):
            self.leaders[meta.node] = meta.address
            self.events.append(
                Event(meta.t, "leader_elected", f"{meta.address} epoch {meta.epoch}")
            )
        else:
            self.events.append(Event(meta.t, meta.kind, meta.detail, meta.job_id))
        return _OK

    def snapshot(self) -> bytes:
        return _snap_encoder.encode(
            _Snapshot(
                self.jobs.snapshot(),
                super().snapshot(),
                self.leaders,
                list(self.events),
                self.storage.snapshot(),
                self.deployments.snapshot(),
            )
        )

    def restore(self, data: bytes) -> None:
        snap = _snap_decoder.decode(data)
        self.jobs.restore(snap.jobs)
        super().restore(snap.kv)
        self.leaders = dict(snap.leaders)
        if snap.storage:
            self.storage.restore(snap.storage)
        if snap.deployments:
            self.deployments.restore(snap.deployments)
        self.events.clear()
        self.events.extend(snap.events)


class Election:
    """Turns the driver's leadership callbacks into ``become_leader`` / ``step_down``."""

    def __init__(self, coordinator: ReplicatedCoordinator, driver: ReplicaDriver) -> None:
        self.c = coordinator
        self.driver = driver
        self._task: asyncio.Task[None] | None = None

    def changed(self, leading: bool) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if not leading:
            self.c.step_down()
            return
        ballot = self.driver.core.promised
        epoch = ballot[0] * EPOCH_NODES_MAX + ballot[1]
        self._task = asyncio.get_running_loop().create_task(self._take_over(epoch))

    def _current_epoch(self) -> int | None:
        if not self.driver.is_leader:
            return None
        ballot = self.driver.core.promised
        return ballot[0] * EPOCH_NODES_MAX + ballot[1]

    async def _take_over(self, epoch: int) -> None:
        # Retried while this replica still leads with the same ballot: a leader that
        # never confirms its term would hold the leadership without a scheduler.
        for attempt in range(TAKE_OVER_ATTEMPTS_MAX):
            if self._current_epoch() != epoch:
                return
            cmd = LeaderElected(self.driver.node_id, self.c.address, epoch, time.time())
            try:
                await self.driver.submit(encode_meta(cmd))
            except LeptonError as exc:
                log.info("epoch %d not confirmed (try %d): %s", epoch, attempt + 1, exc)
                await asyncio.sleep(TAKE_OVER_RETRY_S)
                continue
            if self._current_epoch() == epoch:
                self.c.become_leader(epoch)
            return
        log.warning("epoch %d: leadership never confirmed; waiting for the next election", epoch)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class ReplicatedCoordinator(Coordinator):
    """A ``Coordinator`` whose redirects name the Paxos leader's client address."""

    machine: CoordinatorMachine

    def __init__(
        self,
        driver: ReplicaDriver,
        machine: CoordinatorMachine,
        address: str,
        config: CoordinatorConfig,
        *,
        token: str,
        node_id: int,
    ) -> None:
        super().__init__(driver, machine, address, config, token=token)
        self.driver = driver
        self.node_id = node_id
        self.member_id = str(node_id)
        # Peer replica -> (link generation it answered on, its pid): reported only while
        # that connection lasts, so a restarted peer never shows its predecessor's pid.
        # Paxos node id -> (link generation, its pid, its client address), asked once per
        # connection to it.
        self.peer_pids: dict[int, tuple[int, int, str, str]] = {}
        self._held: list[JobCommand] = []  # non-urgent proposals of this term (FINISHED_HOLD_S)
        self._held_timer: asyncio.TimerHandle | None = None

    def leader_hint(self) -> str | None:
        if self.leading:
            return self.address
        leader = self.driver.leader_id
        return None if leader is None else self.machine.leaders.get(leader)

    def event(self, kind: EventKind, detail: str = "", job_id: str = "", t: float = 0.0) -> None:
        if kind == EventKind.LEADER:
            return  # the replicated ``leader_elected`` entry says it, for every replica
        if kind.replicated and not self.leading:
            # A follower applying the log sees what the leader saw (a job finished)
            # and would record it a second time, at its own apply time: the leader's
            # entry reaches it through the log.
            return
        self.monitor.event(kind)
        ev = Event(t or time.time(), kind, detail, job_id)
        self.events.append(ev)
        if self.leading and kind.replicated:
            # Same timestamp as the local entry, so ``all_events`` shows it once.
            self.propose_meta(ClusterEvent(ev.t, kind, detail, job_id))

    def step(self, event: SchedulerEvent) -> None:
        # A task whose user code raised: on the timeline of every replica (the base
        # class logs infrastructure failures itself; a retry shows as task_rescheduled).
        if isinstance(event, TaskFailed) and event.kind == "user" and self.leading:
            a = event.attempt
            view = self.workers.get(event.worker)
            what = f"{event.exc_type}: {event.message}" if event.exc_type else event.message
            self.event(
                EventKind.TASK_FAILED,
                f"stage {a.stage} partition {a.partition} on "
                f"{view.name if view is not None else event.worker}: "
                f"{what.splitlines()[0] if what else 'user code raised'}",
                a.job_id,
            )
        super().step(event)

    def propose_action(self, action: Propose) -> None:
        if action.urgent:
            self.propose_soon(action.command)
            return
        self._held.append(action.command)
        if len(self._held) >= FINISHED_HELD_MAX:
            self._release_held()
        elif self._held_timer is None:
            loop = asyncio.get_running_loop()
            self._held_timer = loop.call_later(FINISHED_HOLD_S, self._release_held)

    def _release_held(self) -> None:
        if self._held_timer is not None:
            self._held_timer.cancel()
            self._held_timer = None
        held, self._held = self._held, []
        if self.leading:  # a former leader's held results die with its scheduler
            for cmd in held:
                self._propose_now(cmd)

    def step_down(self) -> None:
        self._held.clear()
        self._release_held()
        super().step_down()

    def propose_soon(self, cmd: JobCommand) -> None:
        """Held commands first (they were proposed earlier), then ``cmd``."""
        if self._held:
            self._release_held()
        self._propose_now(cmd)

    def _propose_now(self, cmd: JobCommand) -> None:
        """The scheduler's proposals, straight into the driver's queue.

        Cheaper than a task per command around ``LogHost.submit``: the result is
        not needed (the apply hook feeds ``Applied`` back), only a failure is.
        The driver bounds what is pending (``proposals_pending_max``: Overloaded)
        and fails every waiting proposal when leadership is lost.
        """
        epoch = self.epoch
        loop = asyncio.get_running_loop()

        def done(result: bytes | None, error: BaseException | None) -> None:
            if error is not None:
                # Never re-enter the scheduler from inside its own step.
                loop.call_soon(self._proposal_failed, cmd, epoch)

        self.driver.propose_cb(encode_command(cmd), done)

    def _proposal_failed(self, cmd: JobCommand, epoch: int) -> None:
        if self.leading and self.epoch == epoch:
            self.step(ProposeFailed(cmd, time.monotonic()))

    def propose_meta(self, cmd: MetaCommand) -> None:
        """Into the driver's queue at once, like ``propose_soon``: an event is ordered
        before the commands the same step proposes (a task's failure before the job's),
        so a client that saw the job fail also finds the event on the next leader. Lost
        with the leadership, like any timeline entry of a dying leader."""
        if self.driver.is_leader:
            self.driver.propose_cb(encode_meta(cmd), _ignore_result)

    def quorum(self) -> tuple[int, int]:
        voters = self.driver.core.members
        reachable = sum(
            1
            for node in voters
            if node == self.node_id
            or ((link := self.driver.links.get(node)) is not None and link.connected)
        )
        return len(voters), reachable

    def coordinator_members(self, pid: int) -> list[MemberInfo]:
        """Every voting replica (this one with its pid, the others as its Paxos links see
        them) and the standbys, health "standby": the leader's learners, or this replica
        when it is one. A replica a committed change removed is not listed."""
        out: list[MemberInfo] = []
        voters = set(self.driver.core.members)
        standbys = {s.node: s.address for s in self.driver.core.learner_status()}
        for node, paxos in sorted({**self.driver.addresses, **standbys}.items()):
            if node == self.node_id:
                role = "follower" if node in voters else "standby"
                role = "leader" if self.leading else role
                out.append(
                    MemberInfo(
                        "coordinator",
                        str(node),
                        pid,
                        self.address,
                        role,
                        paxos=paxos,
                        metrics=self.http_address,
                    )
                )
                continue
            if node not in voters and node not in standbys:
                continue  # removed from the group
            link = self.driver.links.get(node)
            up = link is not None and link.connected
            known = self.peer_pids.get(node)
            current = up and link is not None and known is not None and known[0] == link.generation
            peer_pid = known[1] if current and known is not None else 0
            # Its own word (from its status) or, failing that, what it said as a leader.
            client = (known[2] if known else "") or self.machine.leaders.get(node, "")
            health = ("standby" if node in standbys else "follower") if up else "unreachable"
            metrics = known[3] if known else ""
            out.append(
                MemberInfo(
                    "coordinator", str(node), peer_pid, client, health, paxos=paxos, metrics=metrics
                )
            )
        return out

    async def watch_peer_pids(self) -> None:
        """Ask each peer replica for its pid (the consensus layer's status query) once
        per connection to it, so ``lepton cluster status`` shows real pids for every
        coordinator, not only for this one. Runs until cancelled."""
        client = KvClient(list(self.driver.addresses.values()), token=self.token)
        try:
            while True:
                for node, link in list(self.driver.links.items()):
                    generation = link.generation
                    known = self.peer_pids.get(node)
                    if not link.connected or (known is not None and known[0] == generation):
                        continue
                    try:
                        status = await client.status(link.address, PEER_STATUS_TIMEOUT_S)
                    except (LeptonError, OSError, TimeoutError) as exc:
                        log.debug("status of replica %s: %s", node, exc)
                        continue
                    if status.node == node:
                        self.peer_pids[node] = (
                            generation,
                            status.pid,
                            status.service,
                            status.metrics,
                        )
                await asyncio.sleep(PEER_PID_POLL_S)
        finally:
            await client.close()

    def all_events(self) -> list[Event]:
        seen = {(e.t, e.kind, e.detail) for e in self.machine.events}
        local = [e for e in self.events if (e.t, e.kind, e.detail) not in seen]
        return sorted([*self.machine.events, *local], key=lambda e: e.t)


def _ignore_result(result: bytes | None, error: BaseException | None) -> None:
    """A timeline entry that did not commit is not retried (the log stays bounded)."""


async def serve_replicated(
    sock: socket.socket,
    paxos_sock: socket.socket | None,
    *,
    node_id: int,
    peers: dict[int, str],
    token: str,
    data_dir: str,
    config: CoordinatorConfig,
    standby: bool = False,
    replace_after_s: float = 10.0,
    address: str = "",
    http_sock: socket.socket | None = None,
) -> None:
    """Run one coordinator replica (``address``: its client address as others dial
    it; default the bound one). ``standby``: a learner (not in the group; its
    address may come from ``paxos_sock`` instead of ``peers``) that the leader's
    membership shell promotes when a voter is silent for ``replace_after_s``. Raises
    ``coord_membership.MemberRemoved`` once a committed change removed this replica."""
    from lepton_ai.heal.membership import MembershipConfig
    from lepton_ai.node.coord_membership import MembershipShell

    if not address:
        host, port = sock.getsockname()[:2]
        address = f"{host}:{port}"
    if standby and node_id not in peers and paxos_sock is not None:
        paxos_host, paxos_port = paxos_sock.getsockname()[:2]
        peers = {**peers, node_id: f"{paxos_host}:{paxos_port}"}
    os.makedirs(data_dir, exist_ok=True)
    machine = CoordinatorMachine(JobStateConfig(finished_jobs_max=config.finished_jobs_max))
    http_address = "" if http_sock is None else http_address_of(address, http_sock)
    replica = ReplicaHost(
        node_id,
        peers,
        os.path.join(data_dir, "paxos"),
        token=token,
        state_machine=machine,
        options=ReplicaOptions(
            fsync=config.fsync,
            batch_interval_s=SLOT_INTERVAL_S,
            slots_in_flight_max=SLOTS_IN_FLIGHT_MAX,
            standby=standby,
            service_address=address,
            metrics_address=http_address,
        ),
        listen_sock=paxos_sock,
    )
    await replica.start()
    if metrics.enabled_from_env():
        metrics.add_source("paxos", paxos_metrics(replica.log))
    coordinator = ReplicatedCoordinator(
        replica.log, machine, address, config, token=token, node_id=node_id
    )
    if http_sock is not None:
        attach_http(coordinator, http_sock)
    election = Election(coordinator, replica.log)
    replica.log.on_leadership(election.changed)
    voters = len(replica.log.paxos.members)  # the bootstrap group (a standby's peers less it)
    shell = MembershipShell(
        coordinator, replica.log, MembershipConfig(voters, replace_after_s=replace_after_s)
    )
    serving = asyncio.ensure_future(coordinator.run(sock))
    pids = asyncio.ensure_future(coordinator.watch_peer_pids())
    membership = asyncio.ensure_future(shell.run())
    try:
        done, _ = await asyncio.wait(
            {serving, replica.running, membership}, return_when=asyncio.FIRST_COMPLETED
        )
        for task in done:
            error = None if task.cancelled() else task.exception()
            if error is not None:
                raise error
    finally:
        # Also when this coroutine is cancelled: the two tasks end with it.
        for task in (serving, pids, membership):
            if not task.done():  # a finished one's error was raised above
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await election.close()
        await replica.close()
