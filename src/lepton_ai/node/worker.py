"""The worker node program: a long-lived agent that supervises executors.

    lepton worker --join HOST:PORT[,HOST:PORT...] --token T --slots N

The agent never runs user code. It keeps one warm executor per slot
(``executor_slots.ExecutorSlot``), joins the coordinator (``Register``),
heartbeats every ``heartbeat_interval_s`` with the attempts it runs, runs the
tasks it is sent, reports their outcomes, and serves its block store to reducers
on other nodes (``FetchBlocks``).

This module holds the agent itself: its configuration, its processes and
servers, and its session with the coordinator (registration, heartbeats, the
reports it sends and the messages it receives). The rest is mixed in:

* ``agent_tasks`` - running tasks: lanes per executor, inputs, outcomes, reports;
* ``agent_data`` - the data port: shuffle inputs fetched (asynchronously, batched
  per source node) before an attempt is handed to its executor, and copies of
  outputs to other nodes;
* ``agent_leader`` - given several coordinators, following the leader.

When the coordinator connection drops the agent keeps its executors and its
shuffle files and reconnects; on re-registering it reports what it is still
running, so a new leader (issue 4) can rebuild its soft state.

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
from lepton_ai.compute.scheduler_events import TaskAttempt
from lepton_ai.errors import LeptonError
from lepton_ai.heal.backoff import Backoff
from lepton_ai.monitor import metrics
from lepton_ai.monitor.http import bind_http, metrics_routes, serve_http
from lepton_ai.node.agent_data import SHUFFLE_CODEC
from lepton_ai.node.agent_leader import LeaderFollower, LeaderWatchConfig
from lepton_ai.node.agent_monitor import AgentMonitor
from lepton_ai.node.agent_tasks import TaskRunner
from lepton_ai.node.executor_slots import ExecutorConfig, ExecutorSlot, SparePool
from lepton_ai.node.messages import (
    CancelTasks,
    ClientReply,
    DropJobs,
    ExecutorInfo,
    Heartbeat,
    Register,
    Registered,
    Reports,
    RunReplicas,
    RunTasks,
    ServeEndpoints,
    ShuffleMessage,
    StorageNotice,
    TaskOrder,
    TaskReport,
    WorkerMessage,
)
from lepton_ai.node.node_net import local_ip_toward, node_wire_config, parse_address
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


class WorkerAgent(TaskRunner, LeaderFollower):
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
                # Also with one address given: a follower does not take workers but
                # names the leader, and only the watch follows that name.
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
            self._take_tasks(msg)
        elif isinstance(msg, CancelTasks):
            for a in msg.attempts:
                self._cancel(a, msg.queued_only)
        elif isinstance(msg, DropJobs):
            self._drop_jobs(msg.job_ids)

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


if __name__ == "__main__":  # python -m lepton_ai.node.worker (node.local_cluster starts it)
    from lepton_ai.node.programs import worker_main

    worker_main()
