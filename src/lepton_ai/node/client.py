"""A blocking client for the coordinator, for user code and the CLI.

User code is synchronous (``job.result()``), so the client runs its own event
loop in a daemon thread and hands requests to it. Connections are pooled: a
long-poll (``WaitJob``) on one does not block a ``status()`` on another.

After losing the leader the client asks the other coordinators in turn at once (a
follower answers with the leader it knows, and holds the request while it knows
none: ``coord_client_api.NO_LEADER_WAIT_S``), and again every 10-20 ms while they still
name the dead one, instead of sleeping on a back-off through the election
(``consensus/leader_search.py``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import socket
import threading
import time
import weakref
from dataclasses import dataclass, field

from lepton_ai.consensus.leader_search import Asking, LeaderSearch, SearchConfig
from lepton_ai.errors import AuthError, LeptonError, LimitExceeded, StorageFull, Unavailable
from lepton_ai.heal.backoff import Backoff
from lepton_ai.node.messages import ClientReply, CoordinatorMessage, ErrorReply
from lepton_ai.node.node_net import node_wire_config, parse_address
from lepton_ai.wire import Codec, Connection, WireConfig, connect

_CODEC = Codec[ClientReply](ClientReply)


@dataclass(frozen=True)
class CoordinatorClientConfig:
    request_timeout_s: float = 30.0
    idle_connections_max: int = 8  # per coordinator address
    retries_max: int = 3  # connection failures per address, per request, before giving up
    retry_backoff_s: float = 0.05  # every coordinator unreachable: doubles per round ...
    retry_backoff_max_s: float = 0.5  # ... up to this
    poll_s: float = 0.01  # leader lost: ask round again after this while none names a live
    poll_max_s: float = 0.02  # leader, growing to this (leader_search.SearchConfig)
    suspect_s: float = 1.0  # a coordinator that failed is not trusted as leader this long
    redirects_max: int = 10_000  # bounded by the request's deadline in practice
    wire: WireConfig = field(default_factory=lambda: node_wire_config(connect_timeout_s=1.0))

    def retry_backoff(self) -> Backoff:
        """The pauses while every coordinator is unreachable (``LeaderSearch.pause_s``)."""
        return Backoff(self.retry_backoff_s, 2.0, self.retry_backoff_max_s)

    def search(self) -> SearchConfig:
        return SearchConfig(
            suspect_s=self.suspect_s,
            poll_s=self.poll_s,
            poll_max_s=self.poll_max_s,
            backoff_s=self.retry_backoff_s,
            backoff_max_s=self.retry_backoff_max_s,
        )


class CoordinatorClient:
    """Talks to whichever coordinator leads; follows redirects; ``Unavailable`` at the deadline."""

    def __init__(
        self, addresses: str, token: str, config: CoordinatorClientConfig | None = None
    ) -> None:
        self.addresses = [parse_address(a.strip()) for a in addresses.split(",") if a.strip()]
        if not self.addresses:
            raise ValueError("no coordinator address given")
        if not token:
            raise ValueError("a cluster token is required")
        self.token = token
        self.config = config or CoordinatorClientConfig()
        # Shared by the requests (they run on one loop): which coordinators failed lately.
        self._search = LeaderSearch(self.addresses, self.config.search())
        self._idle: dict[tuple[str, int], list[Connection[ClientReply]]] = {}
        self._target = 0  # index into addresses: the leader as far as we know
        self._loop = asyncio.new_event_loop()
        self.loop = self._loop  # where the data-plane client of ``cluster.storage`` runs
        self._thread = threading.Thread(
            target=self._loop.run_forever, daemon=True, name="lepton-client"
        )
        self._thread.start()
        self._closed = False
        self._answered = False  # some coordinator has answered this client
        # Closed at interpreter exit too if the caller never did (no "Task was destroyed").
        self._finalizer = weakref.finalize(self, _shutdown, self._idle, self._loop, self._thread)
        self._refused: set[tuple[str, int]] = set()  # refused before any answer

    def request(self, msg: CoordinatorMessage, timeout_s: float | None = None) -> ClientReply:
        """Send one request to the leader and wait for its reply.

        ``timeout_s`` bounds the whole call, redirects and reconnections included;
        ``Unavailable`` when no leader answered in time.
        """
        if self._closed:
            raise Unavailable("client is closed")
        limit = timeout_s if timeout_s is not None else self.config.request_timeout_s
        fut = asyncio.run_coroutine_threadsafe(self._request(msg, limit), self._loop)
        try:
            return fut.result(limit + 5.0)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise Unavailable(f"no answer from a coordinator within {limit:.1f} s") from None

    def _follow(self, leader: str) -> bool:
        """Make ``leader`` (a follower's hint) the target, unless it is empty, malformed or
        a coordinator that failed lately (followers name a dead leader until their
        election timer fires). False: the caller asks another coordinator."""
        try:
            addr = parse_address(leader) if leader else None
        except ValueError:
            addr = None
        if addr is None or not self._search.usable(addr, time.monotonic()):
            return False
        if addr not in self.addresses:
            self.addresses.append(addr)  # a coordinator we were not told about
            self._search.add(addr)
        self._target = self.addresses.index(addr)
        return True

    async def _request(self, msg: CoordinatorMessage, timeout_s: float) -> ClientReply:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        last: Exception | str | None = None
        asking = Asking(self._search)  # this request's walk while it knows no leader
        for _ in range(self.config.redirects_max):
            left = deadline - loop.time()
            if left <= 0:
                break
            address = self.addresses[self._target]
            conn: Connection[ClientReply] | None = None
            try:
                conn = await asyncio.wait_for(self._take(address), left)
                await conn.send(msg)
                reply = await asyncio.wait_for(conn.recv(), left)
            except (OSError, TimeoutError, LeptonError) as exc:
                last = exc
                if conn is not None:
                    conn.writer.close()
                self._fail_fast(address, exc)
                self._drop_idle(address)
                self._search.failed(address, time.monotonic())
                await self._ask_next(asking, address, deadline)
                continue
            except BaseException:
                if conn is not None:
                    conn.writer.close()
                raise
            self._give_back(address, conn)
            self._answered = True
            self._search.answered(address)
            if isinstance(reply, ErrorReply) and _retryable(reply):
                last = reply.message or "no leader known"
                if reply.kind == "redirect" and self._follow(reply.message):
                    asking.found()
                else:  # no leader known yet, or a dead one named: ask the next one
                    await self._ask_next(asking, address, deadline)
                continue
            return reply
        names = ",".join(f"{h}:{p}" for h, p in self.addresses)
        raise Unavailable(
            f"no coordinator leader answered within {timeout_s:.1f} s ({names}): {last}"
        )

    async def _ask_next(
        self, asking: Asking[tuple[str, int]], after: tuple[str, int], deadline: float
    ) -> None:
        """Target the next coordinator to ask, pausing first once every one was asked."""
        nxt, pause = asking.next(after, time.monotonic())
        self._target = self.addresses.index(nxt)
        if pause > 0:
            left = deadline - asyncio.get_running_loop().time()
            await asyncio.sleep(min(pause, max(0.0, left)))

    def _fail_fast(self, address: tuple[str, int], exc: BaseException) -> None:
        """Raise at once for what no retry can fix: a wrong token, a host name that does
        not resolve, or (before any coordinator ever answered this client) every
        address refusing connections. Once the cluster answered, a refusal is a member
        restarting, waited out until the deadline."""
        host, port = address
        if isinstance(exc, AuthError):
            raise AuthError(f"{host}:{port} refused the cluster token: {exc}") from None
        if isinstance(exc, socket.gaierror):
            raise Unavailable(f"cannot resolve host {host!r}: {exc.strerror}") from None
        if _refused(exc) and not self._answered:
            self._refused.add(address)
            if self._refused >= set(self.addresses):
                names = ",".join(f"{h}:{p}" for h, p in self.addresses)
                raise Unavailable(
                    f"no coordinator listens at {names} (connection refused): is the "
                    "cluster up, and is the address right?"
                ) from None

    async def _take(self, address: tuple[str, int]) -> Connection[ClientReply]:
        idle = self._idle.get(address, [])
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        host, port = address
        return await connect(host, port, token=self.token, codec=_CODEC, config=self.config.wire)

    def _drop_idle(self, address: tuple[str, int]) -> None:
        for conn in self._idle.pop(address, []):
            conn.writer.close()

    def _give_back(self, address: tuple[str, int], conn: Connection[ClientReply]) -> None:
        idle = self._idle.setdefault(address, [])
        if len(idle) < self.config.idle_connections_max:
            idle.append(conn)
        else:
            conn.writer.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._closed = True
        self._finalizer()


def _shutdown(
    idle: dict[tuple[str, int], list[Connection[ClientReply]]],
    loop: asyncio.AbstractEventLoop,
    thread: threading.Thread,
) -> None:
    """Close the idle connections on their loop, then stop the loop's thread (once)."""

    async def close_idle() -> None:
        for conns in idle.values():
            for conn in conns:
                await conn.close()
        idle.clear()

    with contextlib.suppress(Exception):
        asyncio.run_coroutine_threadsafe(close_idle(), loop).result(2.0)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(2.0)
    if not thread.is_alive():
        loop.close()


def _refused(exc: BaseException) -> bool:
    """A refused connection (asyncio reports one per resolved address as a plain
    OSError listing them when a name resolves to several)."""
    if isinstance(exc, ConnectionRefusedError):
        return True
    return type(exc) is OSError and "[Errno 111]" in str(exc)


def _retryable(reply: ErrorReply) -> bool:
    """Replies that mean "ask the leader" (or "the log was briefly unavailable")."""
    if reply.kind == "redirect":
        return True
    return reply.kind == "unavailable" and reply.message.startswith(
        ("not the leader", "log unavailable")
    )


def check_reply(reply: ClientReply) -> ClientReply:
    """Turn an ``ErrorReply`` into the matching exception."""
    if isinstance(reply, ErrorReply):
        if reply.kind == "invalid":
            raise ValueError(reply.message)
        if reply.kind == "not_found":
            raise KeyError(reply.message)
        if reply.kind == "full":
            raise StorageFull(reply.message)
        if reply.kind == "limit":
            raise LimitExceeded(reply.message)
        if reply.kind == "exists":
            raise FileExistsError(reply.message)
        raise Unavailable(reply.message)
    return reply
