"""The KV replica program: ``python -m lepton_ai.consensus.server --id N --peers ... --data-dir D``.

One TCP port per replica serves both its peers (connections that open with
``PeerHello``) and clients (``Submit``/``Read``/``StatusQuery``), every connection
behind the HMAC handshake of ``lepton_ai.wire``. A follower answers a client with
``Redirect(leader address)``; the leader orders writes through the log and answers
reads after a read-index round (no log write).

For the node layer: ``add_replica_arguments(parser)`` adds these options to another
parser (``lepton coordinator``) and ``run_replica(args)`` runs the program.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lepton_ai import eventloop
from lepton_ai.consensus.client_messages import (
    ChangeMembers,
    Failed,
    PeerStatus,
    Read,
    Redirect,
    Reply,
    Status,
    StatusQuery,
    Submit,
)
from lepton_ai.consensus.core_types import InvariantError, Overloaded, PaxosConfig
from lepton_ai.consensus.driver import ReplicaDriver
from lepton_ai.consensus.driver_config import DriverConfig
from lepton_ai.consensus.driver_waiters import LeadershipLost
from lepton_ai.consensus.kv import Get, KvMachine, encode_result
from lepton_ai.consensus.log_host import NotLeader, StateMachine
from lepton_ai.consensus.peer_messages import (
    PEER_MESSAGE_TYPES,
    Accept,
    Accepted,
    Announce,
    Heartbeat,
    HeartbeatAck,
    InstallSnapshot,
    Nack,
    Prepare,
    Promise,
)
from lepton_ai.consensus.replica_disk import ReplicaStorage
from lepton_ai.consensus.transport import FrameSplitter, PeerHello, read_frames
from lepton_ai.consensus.wal import WalCorruption
from lepton_ai.errors import LeptonError, ProtocolError
from lepton_ai.wire import (
    Codec,
    Connection,
    WireConfig,
    encode_frame,
    resolve_token,
    serve,
)

log = logging.getLogger("lepton_ai.consensus.server")

ServerMessage = (
    PeerHello
    | Prepare
    | Promise
    | Accept
    | Accepted
    | Nack
    | Heartbeat
    | HeartbeatAck
    | InstallSnapshot
    | Announce
    | Submit
    | Read
    | StatusQuery
    | ChangeMembers
)
SERVER_CODEC: Codec[object] = Codec[object](ServerMessage)
_CLIENT_TYPES = (Submit, Read, StatusQuery, ChangeMembers)
CLIENT_INFLIGHT_MAX = 8192  # requests of one client connection awaiting their reply


def parse_peers(text: str) -> dict[int, str]:
    """``1=h1:7400,2=h2:7400`` -> {1: "h1:7400", 2: "h2:7400"}."""
    peers: dict[int, str] = {}
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        node, sep, address = item.partition("=")
        host, colon, port = address.rpartition(":")
        if not sep or not node.strip().isdigit() or not colon or not host or not port.isdigit():
            raise ValueError(f"bad --peers entry {raw!r}; expected id=host:port")
        if int(node) in peers:
            raise ValueError(f"--peers names node {node} twice")
        peers[int(node)] = f"{host}:{int(port)}"
    if not peers:
        raise ValueError("--peers is empty")
    return peers


class KvServer:
    """Connection handling of one replica: peers feed the driver, clients get KV answers."""

    def __init__(
        self, driver: ReplicaDriver, kv: KvMachine | None, pid: int, service: str = ""
    ) -> None:
        self.driver = driver
        self.kv = kv
        self.pid = pid
        self.service = service  # shown in Status: the hosting program's own address
        self.metrics = ""  # shown in Status: the hosting program's /metrics address
        self.connections: set[Connection[object]] = set()
        # Client connections with replies produced during the current driver pass.
        self._dirty: list[_ClientConn] = []
        driver.on_pass_end(self._flush_dirty)

    def schedule_flush(self, client: _ClientConn) -> None:
        """Write ``client``'s queued replies at the end of the running pass, or (a reply
        produced outside a pass) on the next loop turn."""
        if self.driver.in_pass:
            self._dirty.append(client)
        else:
            asyncio.get_running_loop().call_soon(client.flush)

    def _flush_dirty(self) -> None:
        dirty, self._dirty = self._dirty, []
        for client in dirty:
            client.flush()

    async def close_connections(self) -> None:
        """Close every open connection so their handlers end normally at shutdown."""
        for conn in list(self.connections):
            await conn.close()

    async def handle(self, conn: Connection[object]) -> None:
        self.connections.add(conn)
        try:
            await self._route(conn)
        finally:
            self.connections.discard(conn)

    async def _route(self, conn: Connection[object]) -> None:
        first = await conn.recv()
        if isinstance(first, PeerHello):
            await self._serve_peer(conn, first.node)
        elif isinstance(first, _CLIENT_TYPES):
            await self._serve_client(conn, first)
        else:
            raise ProtocolError(f"unexpected first message {type(first).__name__}")

    async def _serve_peer(self, conn: Connection[object], node: int) -> None:
        # A node outside the address book may be a standby (a learner): it dials the
        # members to announce itself. The token authenticated it; the core decides what
        # its messages are worth (a learner's never count for a quorum).
        if node == self.driver.node_id or node < 0:
            raise ProtocolError(f"PeerHello from node {node}")
        splitter = FrameSplitter(conn.config.frame_bytes_max)
        decode = conn.codec.decode
        while True:
            for frame in await read_frames(conn.reader, splitter):
                msg = decode(frame)
                if not isinstance(msg, PEER_MESSAGE_TYPES):
                    raise ProtocolError(f"peer {node} sent {type(msg).__name__}")
                if msg.src != node:
                    raise ProtocolError(f"peer {node} sent a message signed by {msg.src}")
                self.driver.deliver(msg)

    async def _serve_client(self, conn: Connection[object], first: object) -> None:
        client = _ClientConn(conn, self)
        splitter = FrameSplitter(conn.config.frame_bytes_max)
        decode = conn.codec.decode
        self._dispatch(client, first)
        while True:
            if client.inflight >= CLIENT_INFLIGHT_MAX:
                client.room.clear()
                await client.room.wait()
            await conn.drain()
            for frame in await read_frames(conn.reader, splitter):
                self._dispatch(client, decode(frame))

    def _dispatch(self, client: _ClientConn, msg: object) -> None:
        if isinstance(msg, Submit):
            client.inflight += 1
            rid = msg.rid

            def on_commit(result: bytes | None, error: BaseException | None) -> None:
                client.reply(Reply(rid, result) if result is not None else self._error(rid, error))

            self.driver.propose_cb(msg.command, on_commit)
        elif isinstance(msg, Read):
            client.inflight += 1
            rid, key = msg.rid, msg.key

            kv = self.kv
            if kv is None:
                raise ProtocolError("this replica serves no KV reads")

            def on_barrier(result: bytes | None, error: BaseException | None) -> None:
                if result is None:
                    client.reply(self._error(rid, error))
                else:
                    client.reply(Reply(rid, encode_result(kv.read(Get(key)))))

            self.driver.read_index_cb(on_barrier)
        elif isinstance(msg, StatusQuery):
            client.inflight += 1
            client.reply(self.status(msg.rid))
        elif isinstance(msg, ChangeMembers):
            client.inflight += 1
            rid = msg.rid

            def on_change(result: bytes | None, error: BaseException | None) -> None:
                client.reply(Reply(rid, result) if result is not None else self._error(rid, error))

            self.driver.change_members_cb(msg.add, msg.node, msg.address, on_change)
        else:
            raise ProtocolError(f"client sent {type(msg).__name__}")

    def _error(self, rid: int, exc: BaseException | None) -> object:
        if exc is None:
            raise InvariantError("a failed request without an error")
        return self._error_reply(rid, exc)

    def _error_reply(self, rid: int, exc: BaseException) -> object:
        if isinstance(exc, NotLeader):
            return Redirect(rid, self.driver.leader_address)
        if isinstance(exc, LeadershipLost):
            return Failed(rid, str(exc), maybe_applied=True)
        if isinstance(exc, Overloaded | LeptonError | ValueError | TypeError):
            return Failed(rid, f"{type(exc).__name__}: {exc}", maybe_applied=False)
        raise exc

    def status(self, rid: int) -> Status:
        core = self.driver.core
        summary = core.status()
        raw_match = summary.get("peer_match", {})
        match: dict[int, int] = raw_match if isinstance(raw_match, dict) else {}
        peers = [
            PeerStatus(
                node=peer,
                address=link.address,
                match_index=match.get(peer) if core.is_leader else None,
                connected=link.connected,
            )
            for peer, link in sorted(self.driver.links.items())
        ]
        return Status(
            rid=rid,
            node=self.driver.node_id,
            address=self.driver.addresses[self.driver.node_id],
            role=core.role,
            leader=core.leader_id,
            leader_address=self.driver.leader_address,
            ballot=f"{core.promised[0]}.{core.promised[1]}",
            commit_index=core.commit,
            applied_index=core.applied,
            snapshot_index=core.log.snapshot.slot,
            wal_bytes=self.driver.storage.wal_bytes,
            pid=self.pid,
            peers=peers,
            members=list(core.members),
            service=self.service,
            metrics=self.metrics,
        )


class _ClientConn:
    """One client connection: the replies of one driver pass are written with one call."""

    def __init__(self, conn: Connection[object], server: KvServer) -> None:
        self.conn = conn
        self._server = server
        self.inflight = 0
        self.room = asyncio.Event()
        self.room.set()
        self._outbox: list[bytes] = []
        self._encode = conn.codec.encode
        self._limit = conn.config.frame_bytes_max

    def reply(self, msg: object) -> None:
        self.inflight -= 1
        if self.inflight < CLIENT_INFLIGHT_MAX:
            self.room.set()
        if not self._outbox:
            self._server.schedule_flush(self)
        self._outbox.append(encode_frame(self._encode(msg), self._limit))

    def flush(self) -> None:
        frames, self._outbox = self._outbox, []
        if frames and not self.conn.closed:
            self.conn.writer.writelines(frames)


def add_replica_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--id", type=int, required=True, help="this replica's node id")
    parser.add_argument("--peers", required=True, help="every replica: id=host:port,...")
    parser.add_argument("--data-dir", required=True, help="WAL and snapshots live here")
    parser.add_argument("--token", default=None, help="cluster token (default $LEPTON_TOKEN)")
    parser.add_argument(
        "--fsync",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fdatasync the WAL before answering (default on)",
    )
    parser.add_argument("--tick-s", type=float, default=0.02, help="core tick length")
    parser.add_argument("--listen-fd", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ready-file", default=None, help="created once serving")
    parser.add_argument("--snapshot-entries", type=int, default=10_000)
    parser.add_argument(
        "--join",
        action="store_true",
        help="start as a new replica; a member once `lepton cluster add-coordinator` commits",
    )
    parser.add_argument("--log-level", default="WARNING")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lepton_ai.consensus.server",
        description="One replica of the Multi-Paxos replicated KV store.",
    )
    add_replica_arguments(parser)
    return parser


@dataclass(frozen=True)
class ReplicaOptions:
    """How to run one replica (the CLI flags, as a value)."""

    fsync: bool = True
    tick_s: float = 0.02
    snapshot_entries: int = 10_000
    log_retain_entries: int = 1_000  # slots kept below a snapshot for lagging peers
    join: bool = False  # a new replica: not a member until a committed change adds it
    # A standby (a learner): like ``join``, and it announces itself so the leader streams
    # it the log; a member once a committed change (the coordinators' reconciler) adds it.
    standby: bool = False
    batch_interval_s: float = 0.0  # DriverConfig.batch_interval_s (pacing of slots)
    slots_in_flight_max: int = 1024  # DriverConfig.slots_in_flight_max
    service_address: str = ""  # what the hosting program serves on (in Status; "" none)
    metrics_address: str = ""  # the hosting program's /metrics (in Status; "" none)
    wire: WireConfig = field(default_factory=WireConfig)


class ReplicaHost:
    """A running replica: durable storage, the core's driver, one port for peers and clients.

    ``state_machine`` is any ``StateMachine``; pass a ``KvMachine`` to serve KV reads.
    ``host.log`` is the ``LogHost`` (``submit``/``read_barrier``/``is_leader``/...).
    Use ``async with ReplicaHost(...)`` or ``await start()`` / ``await close()``.
    ``start`` raises ``WalCorruption`` if the data directory is damaged.
    """

    def __init__(
        self,
        node_id: int,
        peers: dict[int, str],
        data_dir: str | Path,
        *,
        token: str,
        state_machine: StateMachine,
        options: ReplicaOptions | None = None,
        listen_sock: socket.socket | None = None,
    ) -> None:
        if node_id not in peers:
            raise ValueError(f"node {node_id} is not in peers ({', '.join(map(str, peers))})")
        self.node_id = node_id
        self.peers = dict(peers)
        self.data_dir = Path(data_dir)
        self.options = options or ReplicaOptions()
        self._token = token
        self._state_machine = state_machine
        self._sock = listen_sock
        self._driver: ReplicaDriver | None = None
        self._handler: KvServer | None = None
        self._server: asyncio.Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def log(self) -> ReplicaDriver:
        if self._driver is None:
            raise ValueError("replica not started")
        return self._driver

    @property
    def address(self) -> str:
        return self.peers[self.node_id]

    @property
    def running(self) -> asyncio.Task[None]:
        """The driver's task: it ends only on ``close`` or when an invariant breaks (then
        its exception says why); an embedding program should stop when it ends."""
        if self._task is None:
            raise ValueError("replica not started")
        return self._task

    async def __aenter__(self) -> ReplicaHost:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        storage, durable = ReplicaStorage.open(self.data_dir, fsync=self.options.fsync)
        members = sorted(self.peers)
        if self.options.join or self.options.standby:
            members.remove(self.node_id)
        paxos = PaxosConfig(
            node_id=self.node_id,
            members=tuple(members),
            learner=self.options.standby,
            address=self.address,
            snapshot_entries=self.options.snapshot_entries,
            log_retain_entries=self.options.log_retain_entries,
        )
        self._driver = ReplicaDriver.create(
            paxos,
            self.peers,
            self._state_machine,
            storage,
            durable,
            token=self._token,
            peer_codec=SERVER_CODEC,
            config=DriverConfig(
                tick_s=self.options.tick_s,
                batch_interval_s=self.options.batch_interval_s,
                slots_in_flight_max=self.options.slots_in_flight_max,
            ),
        )
        kv = self._state_machine if isinstance(self._state_machine, KvMachine) else None
        self._handler = KvServer(self._driver, kv, os.getpid(), self.options.service_address)
        self._handler.metrics = self.options.metrics_address
        sock = self._sock or _bind(self.address)
        sock.setblocking(False)
        self._server = await serve(
            None,
            None,
            token=self._token,
            codec=SERVER_CODEC,
            handler=self._handler.handle,
            config=self.options.wire,
            sock=sock,
        )
        self._task = asyncio.get_running_loop().create_task(self._driver.run(), name="driver")

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._handler is not None:
            await self._handler.close_connections()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None
        if self._driver is not None:
            await self._driver.close()


def _bind(address: str) -> socket.socket:
    host, _, port = address.rpartition(":")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(port)))
    sock.listen(512)
    return sock


def run_replica(args: argparse.Namespace) -> int:
    """Run one KV replica until SIGTERM/SIGINT. Exit code 2 if its data directory is corrupt."""
    os.umask(0o077)  # the WAL and snapshots hold the users' data: 0600 files, 0700 dirs
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
        format=f"%(asctime)s replica-{args.id} %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    peers = parse_peers(args.peers)
    if args.id not in peers:
        raise ValueError(f"--id {args.id} is not in --peers ({', '.join(map(str, peers))})")
    host = ReplicaHost(
        args.id,
        peers,
        args.data_dir,
        token=resolve_token(args.token),
        state_machine=KvMachine(),
        options=ReplicaOptions(
            fsync=args.fsync,
            tick_s=args.tick_s,
            snapshot_entries=args.snapshot_entries,
            join=args.join,
        ),
        listen_sock=None if args.listen_fd is None else socket.socket(fileno=args.listen_fd),
    )
    try:
        with asyncio.Runner(loop_factory=eventloop.loop_factory()) as runner:
            runner.run(_serve(host, args.ready_file))
    except WalCorruption as exc:
        print(f"replica {args.id}: refusing to start: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


async def _serve(host: ReplicaHost, ready_file: str | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with host:
        if ready_file:
            _write_ready(Path(ready_file), host.address)
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({stopper, host.running}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if host.running.done() and not host.running.cancelled():
            # The driver died (a broken invariant): stop the process, do not limp on.
            host.running.result()
            raise InvariantError("the replica's driver stopped unexpectedly")


def _write_ready(path: Path, address: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{address} {os.getpid()}\n")
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_replica(args)
    except ValueError as exc:
        print(f"replica: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
