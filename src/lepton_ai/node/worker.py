"""The worker node program: a long-lived agent that supervises executors.

    lepton worker --join HOST:PORT[,HOST:PORT...] --token T --slots N

The agent never runs user code. It keeps one warm executor per slot
(``executors.ExecutorSlot``), joins the coordinator (``Register``), heartbeats
every ``heartbeat_interval_s`` with the attempts it runs, runs the tasks it is
sent, reports their outcomes, and serves its block store to reducers on other
nodes (``FetchBlocks``). Shuffle input is fetched by the agent, asynchronously
and batched per source node, before the attempt is handed to the executor.

When the coordinator connection drops the agent keeps its executors and its
shuffle files and reconnects; on re-registering it reports what it is still
running, so a new leader (issue 4) can rebuild its soft state.

Given several coordinators (``--join h1:p1,h2:p2,h3:p3``) the agent follows
the leader: it asks them (``GetStatus``, answered by followers too) who leads,
points its session at that address, and drops a session held with one that no
longer leads (a deposed or hung leader: SIGSTOP leaves the TCP connection open,
so the session would never notice by itself). It then re-registers with the
leader, and the results waiting in its outbox go there.

The program's entry point and arguments are ``node.programs``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import shutil
import signal
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from lepton_ai.compute.plan import JobPlan
from lepton_ai.compute.scheduler_events import FailureKind, RunningReport, TaskAttempt
from lepton_ai.errors import LeptonError
from lepton_ai.heal.backoff import Backoff
from lepton_ai.monitor import metrics
from lepton_ai.monitor.http import bind_http, metrics_routes, serve_http
from lepton_ai.node.agent_data import SHUFFLE_CODEC, DataPort
from lepton_ai.node.agent_monitor import AgentMonitor
from lepton_ai.node.executor_slots import (
    ExecutorConfig,
    ExecutorDied,
    ExecutorSlot,
    Requeued,
    SparePool,
)
from lepton_ai.node.messages import (
    CancelTasks,
    ClientReply,
    ClusterInfo,
    DropJobs,
    ErrorReply,
    ExecOutcome,
    ExecutorInfo,
    FailedReport,
    FetchFailedReport,
    GetStatus,
    Heartbeat,
    Register,
    Registered,
    Reports,
    RunReplicas,
    RunTasks,
    ServeEndpoints,
    ShuffleMessage,
    StartedReport,
    StorageNotice,
    SucceededReport,
    TaskOrder,
    TaskReport,
    WorkerMessage,
)
from lepton_ai.node.node_net import (
    REPORT_BATCH_BYTES_MAX,
    local_ip_toward,
    node_wire_config,
    parse_address,
)
from lepton_ai.node.node_storage import NodeStorage, NodeStorageConfig, open_node_dir
from lepton_ai.serve.node_serve import NodeServing
from lepton_ai.serve.spec import ReplicaReport
from lepton_ai.storage.blockstore import BlockStore
from lepton_ai.wire import (
    Codec,
    Connection,
    ConnectionClosed,
    WireConfig,
    bound_port,
    connect,
    serve,
)

log = logging.getLogger("lepton_ai.worker")

_COORD_CODEC = Codec[WorkerMessage](WorkerMessage)

_CLIENT_CODEC = Codec[ClientReply](ClientReply)


@dataclass(frozen=True)
class LeaderWatchConfig:
    """How an agent joined to several coordinators looks for the leader."""

    interval_s: float = 0.2
    searching_s: float = 0.05  # while no coordinator names a leader
    probe_timeout_s: float = 0.5
    # Coordinator addresses remembered (given plus learned from leader hints); past
    # it the oldest one is forgotten, so replaced coordinators are not probed for ever.
    known_max: int = 16

    def __post_init__(self) -> None:
        if self.known_max < 2:
            raise ValueError("known_max must be >= 2 (the joined one and the leader)")


@dataclass(frozen=True)
class WorkerConfig:
    slots: int = 1
    heartbeat_interval_s: float = 0.1
    # A failed join is retried after reconnect_backoff_s, doubling up to the max.
    reconnect_backoff_s: float = 0.05
    reconnect_backoff_max_s: float = 1.0
    plans_max: int = 256
    # Scheduler slots per executor: the next tasks already wait at the executor
    # while the current one runs, hiding the coordinator's round trip (report,
    # log commit, next dispatch): 8 runs tiny tasks ~2x faster than 2. Work
    # queued here behind a slow task is not stranded: when another node has
    # free slots, the scheduler steals attempts that have not started.
    pipeline_depth: int = 8
    # An attempt running this many times its stage's typical duration here is a
    # straggler: the attempts queued behind it may be backed up elsewhere.
    straggler_factor: float = 2.0
    queued_tasks_max: int = 10_000  # per executor
    outbox_reports_max: int = 100_000  # reports kept while the coordinator is away
    fetch_connections_max: int = 64
    notices_max: int = 10_000  # storage notices kept while no coordinator listens
    # Serving: model replicas this node may run (0: none, and no balancer), and the
    # port of its balancer (0: any free port).
    serve_slots: int = 4
    serve_port: int = 0
    metrics_port: int = 0  # the agent's HTTP /metrics (0: any free port)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    storage: NodeStorageConfig = field(default_factory=NodeStorageConfig)
    wire: WireConfig = field(default_factory=node_wire_config)
    leader_watch: LeaderWatchConfig = field(default_factory=LeaderWatchConfig)

    def reconnect_backoff(self) -> Backoff:
        return Backoff(self.reconnect_backoff_s, 2.0, self.reconnect_backoff_max_s)


class WorkerAgent(DataPort):
    """``join``: one coordinator address, or several comma-separated (follow the leader)."""

    def __init__(
        self, join: str, token: str, data_dir: str, name: str, config: WorkerConfig
    ) -> None:
        if config.slots <= 0:
            raise ValueError(f"slots must be > 0, got {config.slots}")
        joins = [a.strip() for a in join.split(",") if a.strip()]
        if not joins:
            raise ValueError("no coordinator address to join")
        self.coordinators = [parse_address(a) for a in joins]
        self.join = self.coordinators[0]
        self._probes: dict[tuple[str, int], Connection[ClientReply]] = {}
        self._probe_wire = node_wire_config(connect_timeout_s=config.leader_watch.probe_timeout_s)
        self.token = token
        self.name = name
        # The node (stable: its directory and id outlive this process) and this
        # incarnation of its agent (``worker_id``, new at every start: the scheduler
        # counts everything an incarnation ran as gone once it is lost).
        self.node_dir, self.node_id, self._node_lock = open_node_dir(data_dir, name)
        self.worker_id = f"{name}-{os.getpid()}-{os.urandom(2).hex()}"
        # Shuffle files are useless to a new incarnation: earlier ones are removed.
        shutil.rmtree(self.node_dir / "shuffle", ignore_errors=True)
        self.store = BlockStore(self.node_dir / "shuffle" / self.worker_id)
        self.storage = NodeStorage(self.node_dir, self.node_id, token, config.storage, self._notify)
        config = dataclasses.replace(
            config,
            executor=dataclasses.replace(
                config.executor,
                objects_dir=str(self.storage.store.root),
                node_id=self.node_id,
            ),
        )
        self.config = config
        self._reconnect_backoff = config.reconnect_backoff()
        self._notices: list[StorageNotice] = []
        self._finishing: set[asyncio.Task[None]] = set()
        self.address = ""
        self.serving: NodeServing | None = None  # started by run() when serve_slots > 0
        self._beat_now = asyncio.Event()  # an executor came up: heartbeat at once
        # The leader watch named another coordinator: stop waiting out the reconnect
        # back-off (grown against the dead leader) and join the new one at once.
        self._join_changed = asyncio.Event()
        self.slots = [
            ExecutorSlot(
                i,
                self.worker_id,
                str(self.store.root),
                config.executor,
                self._event,
                on_capacity=functools.partial(self._wake_lane, i),
                on_started=self._started,
                on_ready=self._beat_now.set,
            )
            for i in range(config.slots)
        ]
        self.spares = SparePool(
            config.executor.spares, lambda: (self.worker_id, str(self.store.root)), config.executor
        )
        for slot in self.slots:
            slot.spares = self.spares
        if config.pipeline_depth < 1:
            raise ValueError(f"pipeline_depth must be >= 1, got {config.pipeline_depth}")
        self.sched_slots = config.slots * config.pipeline_depth
        # One lane per executor: scheduler slot s runs on executor s % executors.
        self.lanes: list[deque[TaskOrder]] = [deque() for _ in self.slots]
        self._lane_ready = [asyncio.Event() for _ in self.slots]
        # Handed to executor i and not answered yet (it runs them in this order).
        self._submitted: list[dict[TaskAttempt, TaskOrder]] = [{} for _ in self.slots]
        self.plans: OrderedDict[str, bytes] = OrderedDict()
        self._decoded: OrderedDict[str, JobPlan] = (
            OrderedDict()
        )  # plans read here (stored inputs), bounded
        self._shuffle_replicas: dict[str, int] = {}  # job -> copies of its map outputs
        self.outbox: list[TaskReport] = []
        self._outbox_ready = asyncio.Event()
        self._conn: Connection[WorkerMessage] | None = None
        self._fetch_conns: dict[str, Connection[ShuffleMessage]] = {}
        self._fetch_locks: dict[str, asyncio.Lock] = {}
        self._generation = 0
        # (job, stage) -> typical run time of its attempts here (moving average).
        self._typical_s: dict[tuple[str, int], float] = {}
        self.shuffle_bytes_served = 0
        self.monitor = AgentMonitor(self)
        self.metrics_address = ""  # host:port of its /metrics, once run() bound it

    def _event(self, kind: str, detail: str) -> None:
        log.info("%s: %s", kind, detail)

    # -- main ------------------------------------------------------------------------
    async def run(self) -> None:
        server = await serve(
            "127.0.0.1" if self.join[0] in ("127.0.0.1", "localhost") else "0.0.0.0",
            0,
            token=self.token,
            codec=SHUFFLE_CODEC,
            handler=self._serve_blocks,
            config=self.config.wire,
        )
        host = (
            "127.0.0.1"
            if self.join[0] in ("127.0.0.1", "localhost")
            else local_ip_toward(self.join[0])
        )
        self.address = f"{host}:{bound_port(server)}"
        self.storage.address = self.address
        bind_host = "127.0.0.1" if host == "127.0.0.1" else "0.0.0.0"
        http_sock = bind_http(bind_host, self.config.metrics_port)
        self.metrics_address = f"{host}:{http_sock.getsockname()[1]}"
        if metrics.enabled_from_env():
            metrics.add_source("agent", self.monitor.collect)
        if self.config.serve_slots > 0:
            # Its replicas' state changes (one ready, one died) reach the leader at once.
            self.serving = NodeServing(
                host, port=self.config.serve_port, on_change=self._beat_now.set
            )
            await self.serving.start()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(serve_http(http_sock, metrics_routes()))
                if self.serving is not None:
                    tg.create_task(self.serving.run())
                tg.create_task(self.storage.run())
                for slot in self.slots:
                    tg.create_task(slot.supervise())
                for i in range(len(self.slots)):
                    tg.create_task(self._slot_loop(i))
                if self.config.executor.spares > 0:
                    tg.create_task(self.spares.run(self.slots))
                if len(self.coordinators) > 1:
                    tg.create_task(self._leader_watch())
                tg.create_task(self._coordinator_loop())
        finally:
            server.close()
            for task in list(self._finishing):
                task.cancel()
            for probe in self._probes.values():
                probe.writer.close()
            for slot in self.slots:
                await slot.close()
            await self.spares.close()

    async def _coordinator_loop(self) -> None:
        failures = 0  # failed joins in a row
        while True:
            try:
                conn: Connection[WorkerMessage] = await connect(
                    *self.join, token=self.token, codec=_COORD_CODEC, config=self.config.wire
                )
            except (OSError, TimeoutError, LeptonError) as exc:
                log.info("cannot reach coordinator %s:%s: %s", *self.join, exc)
                failures = await self._retry_pause(failures + 1)
                continue
            identity = self.worker_id
            try:
                await self._session(conn)
            except* (ConnectionClosed, OSError, LeptonError) as group:
                # Expected: the coordinator died, restarted or declared us lost.
                log.info("coordinator connection lost: %s", group.exceptions[0])
            finally:
                accepted = self._conn is conn
                self._conn = None
                with contextlib.suppress(OSError):
                    await conn.close()
            if accepted or self.worker_id != identity:
                failures = 0  # a session ended: rejoin at once
            else:
                # Closed before accepting us: a follower (it does not take workers) or
                # one going down. Wait as after a failed connect, not in a tight loop.
                failures = await self._retry_pause(failures + 1)

    async def _retry_pause(self, failures: int) -> int:
        """Wait the back-off for ``failures`` failed joins in a row, less if the leader
        watch names another coordinator meanwhile; return the failures to count on
        (0 then: the new address gets a fresh back-off)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                self._join_changed.wait(), self._reconnect_backoff.next_delay(failures)
            )
        if self._join_changed.is_set():
            self._join_changed.clear()
            return 0
        return failures

    async def _session(self, conn: Connection[WorkerMessage]) -> None:
        await conn.send(
            Register(
                self.worker_id,
                self.name,
                self.address,
                self.sched_slots,
                os.getpid(),
                self._running(),
                len(self.slots),
                self.node_id,
                self.storage.usage(),
                self.serving.url if self.serving is not None else "",
                self.config.serve_slots if self.serving is not None else 0,
                self._replicas(),
                self.metrics_address,
            )
        )
        reply = await conn.recv()
        if not isinstance(reply, Registered):
            raise LeptonError(f"coordinator answered {type(reply).__name__} to Register")
        if not reply.accepted:
            self._reincarnate()
            await self.spares.discard_all()
            raise LeptonError("declared lost by the coordinator; rejoining under a new id")
        self._conn = conn
        self._outbox_ready.set()  # reports that waited for a coordinator go now
        notices, self._notices = self._notices, []
        for notice in notices:
            conn.send_nowait(notice)
        async with asyncio.TaskGroup() as tg:
            hb = tg.create_task(self._heartbeat_loop(conn))
            out = tg.create_task(self._send_loop(conn))
            try:
                async for msg in conn:
                    self._on_message(msg)
            finally:
                hb.cancel()
                out.cancel()

    # -- following the leader (several coordinators) --------------------------------
    async def _leader_watch(self) -> None:
        watch = self.config.leader_watch
        pause = 0.0  # the first look is at once: join the leader, not a follower
        while True:
            await asyncio.sleep(pause)
            leader = await self._find_leader()
            # No leader known (an election runs): look again soon, else at the interval.
            pause = watch.interval_s if leader is not None else watch.searching_s
            if leader is None:
                if self._conn is None:
                    # Nobody names a leader and we are not connected: try the next.
                    i = self.coordinators.index(self.join) if self.join in self.coordinators else 0
                    self.join = self.coordinators[(i + 1) % len(self.coordinators)]
                continue
            if leader != self.join:
                log.info("leader is now %s:%s", *leader)
                self.join = leader
                self._join_changed.set()
                if self._conn is not None:
                    self._conn.writer.close()  # the session ends; the loop rejoins the leader

    async def _find_leader(self) -> tuple[str, int] | None:
        # Ask the one we believe leads first: it answers for itself.
        order = [self.join, *[a for a in self.coordinators if a != self.join]]
        for address in order:
            named = await self._probe(address)
            if named:
                with contextlib.suppress(ValueError):
                    leader = parse_address(named)
                    self._learn_coordinator(leader)
                    return leader
        return None

    def _learn_coordinator(self, address: tuple[str, int]) -> None:
        if address in self.coordinators:
            return
        self.coordinators.append(address)
        while len(self.coordinators) > self.config.leader_watch.known_max:
            old = next(a for a in self.coordinators if a not in (self.join, address))
            self.coordinators.remove(old)
            probe = self._probes.pop(old, None)
            if probe is not None:
                probe.writer.close()

    async def _probe(self, address: tuple[str, int]) -> str | None:
        """The leader ``address`` names (itself when it leads), or None."""
        timeout_s = self.config.leader_watch.probe_timeout_s
        try:
            conn = self._probes.get(address)
            if conn is None or conn.closed:
                conn = await asyncio.wait_for(
                    connect(
                        *address, token=self.token, codec=_CLIENT_CODEC, config=self._probe_wire
                    ),
                    timeout_s,
                )
                self._probes[address] = conn
            await conn.send(GetStatus(0, 0.0))
            reply = await asyncio.wait_for(conn.recv(), timeout_s)
        except (OSError, TimeoutError, LeptonError):
            stale = self._probes.pop(address, None)
            if stale is not None:
                stale.writer.close()
            return None
        if isinstance(reply, ClusterInfo):
            return reply.leader or None
        if isinstance(reply, ErrorReply) and reply.kind == "redirect":
            return reply.message or None
        return None

    def _reincarnate(self) -> None:
        """Become a new worker: everything done under the old id is void.

        The coordinator already counted the old incarnation's attempts and
        outputs as lost, so they are dropped here rather than reported.
        """
        old_root = self.store.root
        self.worker_id = f"{self.name}-{os.getpid()}-{os.urandom(2).hex()}"
        self._generation += 1
        self.store = BlockStore(old_root.parent / self.worker_id)
        shutil.rmtree(old_root, ignore_errors=True)
        self.outbox.clear()
        self.plans.clear()
        for lane in self.lanes:
            lane.clear()
        for submitted in self._submitted:
            submitted.clear()
        for slot in self.slots:
            slot.worker = self.worker_id
            slot.store_dir = str(self.store.root)
            slot.cancelled = True
            slot.signal(signal.SIGKILL)  # executors restart under the new id

    def _replicas(self) -> list[ReplicaReport]:
        return self.serving.reports() if self.serving is not None else []

    def _running(self) -> list[RunningReport]:
        out = [RunningReport(d.attempt, d.slot) for sub in self._submitted for d in sub.values()]
        out.extend(RunningReport(d.attempt, d.slot) for lane in self.lanes for d in lane)
        return out

    def _refresh_queued(self) -> None:
        """Restart the scheduler's clock of attempts queued behind a healthy one.

        The scheduler times an attempt from its dispatch until ``TaskStarted``;
        an attempt waiting here behind another would look like a straggler near
        the end of a stage and get a backup for work that has not even started
        (and a backup that wins kills the executor to cancel the original). But
        behind a real straggler (running past ``straggler_factor`` x the typical
        duration of its stage here), the clock is left alone, so the scheduler's
        backups can move the waiting attempts to an idle node.
        """
        now = asyncio.get_running_loop().time()
        for slot, lane, submitted in zip(self.slots, self.lanes, self._submitted, strict=True):
            head = next(iter(slot.outstanding), None)
            if head is not None:
                typical = self._typical_s.get((head.job_id, head.stage))
                limit = self.config.straggler_factor * typical if typical is not None else 0.0
                if now - slot.running_since > max(limit, self.config.heartbeat_interval_s):
                    continue
            for d in lane:
                self._report(StartedReport(d.attempt))
            for a in submitted:
                if a != head:
                    self._report(StartedReport(a))

    def _note_duration(self, a: TaskAttempt, duration_s: float) -> None:
        key = (a.job_id, a.stage)
        old = self._typical_s.pop(key, None)
        # A moving average is enough to tell "a bit slower" from "stuck".
        self._typical_s[key] = duration_s if old is None else 0.8 * old + 0.2 * duration_s
        while len(self._typical_s) > self.config.plans_max:
            del self._typical_s[next(iter(self._typical_s))]

    async def _heartbeat_loop(self, conn: Connection[WorkerMessage]) -> None:
        while True:
            self._refresh_queued()
            execs = [ExecutorInfo(s.slot, s.pid, s.state, s.restarts) for s in self.slots]
            execs += [
                ExecutorInfo(-1 - i, pid, "spare") for i, pid in enumerate(self.spares.pids())
            ]
            inflight = self.serving.inflight() if self.serving is not None else {}
            beat = Heartbeat(
                self._running(), execs, self.storage.usage(), self._replicas(), inflight
            )
            await conn.send(beat)
            # Early when an executor comes up: the cluster counts a node ready
            # once the coordinator has heard its executors are (start-up).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._beat_now.wait(), self.config.heartbeat_interval_s)
            self._beat_now.clear()

    async def _send_loop(self, conn: Connection[WorkerMessage]) -> None:
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            if not self.outbox:
                continue
            batch = self._take_batch()
            try:
                await conn.send(Reports(batch))
            except BaseException:
                self.outbox[:0] = batch  # not sent: keep them for the next coordinator
                raise
            if self.outbox:
                self._outbox_ready.set()

    def _take_batch(self) -> list[TaskReport]:
        """The oldest reports whose inline results fit one frame comfortably."""
        size = 0
        n = 0
        for rep in self.outbox:
            if isinstance(rep, SucceededReport):
                size += sum(len(o.data or b"") for o in rep.outputs)
            if n and size > REPORT_BATCH_BYTES_MAX:
                break
            n += 1
        batch = self.outbox[:n]
        del self.outbox[:n]
        return batch

    def _report(self, report: TaskReport) -> None:
        if len(self.outbox) >= self.config.outbox_reports_max:
            # The coordinator has been away long enough that it will re-dispatch
            # these anyway; dropping the oldest bounds memory.
            del self.outbox[: len(self.outbox) // 2]
        self.outbox.append(report)
        self._outbox_ready.set()

    # -- messages from the coordinator -----------------------------------------------
    def _notify(self, notice: StorageNotice) -> None:
        """Tell the leader (or keep it for the next one, bounded: a lost notice is
        found again by the next scrub or sweep)."""
        conn = self._conn
        if conn is not None and not conn.closed:
            conn.send_nowait(notice)
        elif len(self._notices) < self.config.notices_max:
            self._notices.append(notice)

    def _on_message(self, msg: WorkerMessage) -> None:
        if self.storage.on_message(msg):
            return
        if isinstance(msg, RunReplicas | ServeEndpoints):
            self._on_serve_message(msg)
            return
        if isinstance(msg, RunTasks):
            for blob in msg.plans:
                self.plans[blob.job_id] = blob.plan
                self.plans.move_to_end(blob.job_id)
                self._shuffle_replicas[blob.job_id] = blob.shuffle_replicas
            while len(self.plans) > self.config.plans_max:
                old, _ = self.plans.popitem(last=False)
                self._shuffle_replicas.pop(old, None)
            for d in msg.tasks:
                self._enqueue(d)
        elif isinstance(msg, CancelTasks):
            for a in msg.attempts:
                self._cancel(a, msg.queued_only)
        elif isinstance(msg, DropJobs):
            for job_id in msg.job_ids:
                self.plans.pop(job_id, None)
                self._decoded.pop(job_id, None)
                self._shuffle_replicas.pop(job_id, None)
                self.store.delete_job(job_id)
            for slot in self.slots:
                slot.forget(msg.job_ids)

    def _on_serve_message(self, msg: RunReplicas | ServeEndpoints) -> None:
        if self.serving is None:
            log.warning("%s for a node that serves nothing (--serve-slots 0)", type(msg).__name__)
        elif isinstance(msg, RunReplicas):
            try:
                self.serving.assign(msg.replicas)
            except ValueError as exc:  # more than this node runs: a leader bug, not ours
                log.error("replicas refused: %s", exc)
        else:
            try:
                self.serving.set_endpoints(msg.endpoints, msg.deployments)
            except ValueError as exc:  # a table past this node's limits: the old one stays
                log.error("serving endpoints refused: %s", exc)

    def _enqueue(self, d: TaskOrder) -> None:
        if not 0 <= d.slot < self.sched_slots or d.attempt.job_id not in self.plans:
            why = "no such slot" if d.attempt.job_id in self.plans else "plan not sent"
            self._report(FailedReport(d.attempt, "infra", why))
            return
        index = d.slot % len(self.slots)
        if len(self.lanes[index]) >= self.config.queued_tasks_max:
            self._report(FailedReport(d.attempt, "infra", "queue full"))
            return
        self.lanes[index].append(d)
        self._lane_ready[index].set()

    def _cancel(self, a: TaskAttempt, queued_only: bool = False) -> None:
        """Stop ``a``; with ``queued_only`` (the scheduler steals it for an idle
        node) only if it has not started: a running one is left to finish."""
        for lane in self.lanes:
            for d in lane:
                if d.attempt == a:
                    lane.remove(d)
                    self._report(FailedReport(a, "cancelled"))
                    return
        for slot, submitted in zip(self.slots, self._submitted, strict=True):
            if a in submitted:
                slot.cancel(a, queued_only)  # its reply (or the executor's death) reports it
                return

    # -- running tasks ---------------------------------------------------------------
    def _wake_lane(self, index: int) -> None:
        self._lane_ready[index].set()

    def _started(self, a: TaskAttempt) -> None:
        # It sat behind another attempt: tell the scheduler when it really
        # started, so queueing does not look like straggling.
        self._report(StartedReport(a))

    async def _slot_loop(self, index: int) -> None:
        """Feed executor ``index`` from its lane while its window has room."""
        slot, lane, ready = self.slots[index], self.lanes[index], self._lane_ready[index]
        while True:
            if not lane or not slot.can_take(self._window_for(lane[0].attempt)):
                ready.clear()
                await ready.wait()
                continue
            d = lane.popleft()
            generation = self._generation
            failed = await self._submit(index, d)
            if failed is not None and generation == self._generation:
                self._report(failed)

    def _window_for(self, a: TaskAttempt) -> int:
        """Attempts of ``a``'s stage to hand an executor at once: many while they
        are known to be short, few once they are slow (see ``ExecutorConfig``)."""
        ex = self.config.executor
        typical = self._typical_s.get((a.job_id, a.stage))
        return ex.window if typical is None or typical < ex.slow_task_s else ex.window_slow

    async def _submit(self, index: int, d: TaskOrder) -> TaskReport | None:
        """Hand ``d`` to its executor; a report only if it failed before getting there."""
        a = d.attempt
        plan = self.plans.get(a.job_id)
        if plan is None:
            return FailedReport(a, "infra", "plan forgotten")
        generation = self._generation
        missing = await self._bring_inputs(a, plan)
        if missing is not None:
            return FailedReport(a, "infra", missing)
        run = await self._gather_inputs(d)
        if isinstance(run, FetchFailedReport):
            return run
        if generation != self._generation:
            return None  # dispatched to a former incarnation
        future = await self.slots[index].submit(a.job_id, plan, run)
        self._submitted[index][a] = d
        future.add_done_callback(functools.partial(self._exec_done, index, d, generation))
        return None

    def _exec_done(
        self,
        index: int,
        d: TaskOrder,
        generation: int,
        future: asyncio.Future[ExecOutcome],
    ) -> None:
        a = d.attempt
        self._submitted[index].pop(a, None)
        if future.cancelled():
            return  # shutting down
        exc = future.exception()  # retrieved even when ignored: else asyncio logs it
        if generation != self._generation:
            return  # dispatched to a former incarnation
        report: TaskReport
        if isinstance(exc, Requeued):
            self.lanes[index].appendleft(d)  # never started: no failure to count
            self._lane_ready[index].set()
            return
        if isinstance(exc, ExecutorDied):
            kind: FailureKind = "cancelled" if exc.cancelled else "infra"
            report = FailedReport(a, kind, str(exc))
        elif exc is not None:
            raise AssertionError(f"unexpected failure of {a}: {exc!r}") from exc
        else:
            reply = future.result()
            self.monitor.executor_replied(reply)
            if reply.kind == "done":
                self._note_duration(a, reply.duration_s)
                if self._copies_wanted(d, reply):
                    self._finish_stored(d, reply, generation)
                    return
            report = outcome_report(d, reply)
        self._report(report)
        if a.job_id not in self.plans:
            # The job ended (DropJobs) while this attempt ran: what it just
            # wrote would otherwise outlive the job.
            self.store.delete_job(a.job_id)

    def _copies_wanted(self, d: TaskOrder, reply: ExecOutcome) -> bool:
        """A stored result to replicate, or a shuffle file the job wants copied."""
        if any(o.obj is not None for o in reply.outputs):
            return True
        shuffle = bool(reply.outputs) and reply.outputs[0].data is None
        return shuffle and self._shuffle_replicas.get(d.attempt.job_id, 1) > 1

    def _finish_stored(self, d: TaskOrder, reply: ExecOutcome, generation: int) -> None:
        """Copy the attempt's output to other nodes, then report the task done.

        A copy that fails leaves the output with fewer copies, never unreported:
        the scheduler waits for every attempt's report.
        """

        async def finish() -> None:
            outputs = list(reply.outputs)
            try:
                outputs = [await self._replicated(ref) for ref in outputs]
                if outputs and outputs[0].obj is None and outputs[0].data is None:
                    outputs = await self._copy_shuffle(d.attempt, outputs)
            except (OSError, LeptonError) as exc:
                log.warning("copies of %s's output failed: %s", d.attempt, exc)
            if generation == self._generation:
                self._report(SucceededReport(d.attempt, outputs))

        task = asyncio.get_running_loop().create_task(finish())
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)


def outcome_report(order: TaskOrder, outcome: ExecOutcome) -> TaskReport:
    """The report of ``order``'s attempt for the coordinator, from its executor's outcome.

    The one place an outcome becomes a report. A corrupt shuffle input is the map
    output's fault, not the reader's: it is reported as a fetch failure of that
    map, so the scheduler re-makes it (an input the order never named is the
    executor's own failure).
    """
    a, kind = order.attempt, outcome.kind
    if kind == "done":
        return SucceededReport(a, outcome.outputs)
    if kind == "corrupt_input":
        m = outcome.map_partition
        if 0 <= m < len(order.inputs):
            return FetchFailedReport(a, a.stage - 1, m, order.inputs[m].worker)
        kind = "infra"
    return FailedReport(a, kind, outcome.message, outcome.exc_type, outcome.traceback)


if __name__ == "__main__":  # python -m lepton_ai.node.worker (node.local_cluster starts it)
    from lepton_ai.node.programs import worker_main

    worker_main()
