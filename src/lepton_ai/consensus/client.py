"""KV client: finds the leader, follows redirects, retries safely, gives up with ``Unavailable``.

The client knows every replica's address. It sends to its guess of the leader; a
follower answers ``Redirect(leader)``. When it loses the leader (its connection
closes, is refused or stays silent) it asks every other replica at once which leader
it knows (``StatusQuery``), and again every 10-20 ms while none names a live one, so
it reaches a new leader within a poll of its election instead of sleeping through it
on a back-off (``leader_search.py``; one search at a time per
client, shared by its concurrent requests). A write is retried with the *same*
session sequence number (the same command bytes), so the KV machine applies it at
most once and returns its first result (see ``kv.py``). Reads use the leader's read
index: no log write. When no leader answers within ``KvClientConfig.deadline_s`` the
call raises ``lepton_ai.errors.Unavailable``.

``KvClient`` is the asyncio client (its connections are ``client_conns``, its
argument checks ``client_checks``); ``client_sync.KV`` wraps it for synchronous code
(it owns a private event loop thread), which is what ``cluster.kv`` returns.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lepton_ai.consensus.client_checks import check_key, check_value, checked
from lepton_ai.consensus.client_conns import ReplicaConnections
from lepton_ai.consensus.client_messages import (
    ChangeMembers,
    ClientMessage,
    Failed,
    Read,
    Redirect,
    Reply,
    ReplyMessage,
    Status,
    StatusQuery,
    Submit,
)
from lepton_ai.consensus.kv import (
    Cas,
    Delete,
    KvError,
    KvResult,
    Op,
    OpenSession,
    Put,
    Request,
    decode_result,
    encode_command,
)
from lepton_ai.consensus.leader_search import LeaderSearch, SearchConfig
from lepton_ai.errors import AuthError, LeptonError, ProtocolError, Unavailable
from lepton_ai.heal.backoff import Backoff
from lepton_ai.wire import WireConfig


@dataclass(frozen=True)
class KvClientConfig:
    deadline_s: float = 10.0  # whole operation, all retries included
    attempt_timeout_s: float = 2.0  # one try on one replica
    backoff_s: float = 0.02  # pause after a refused try (or none reachable), doubled ...
    backoff_max_s: float = 0.3  # ... up to this
    poll_s: float = 0.01  # leader lost: ask the replicas again after this while none names
    poll_max_s: float = 0.02  # a live leader, growing to this (leader_search.SearchConfig)
    suspect_s: float = 1.0  # a replica that failed is not trusted as the leader for this long
    probe_timeout_s: float = 0.5  # one StatusQuery of a leader search
    inflight_max: int = 8192  # concurrent operations of one client
    wire: WireConfig = field(default_factory=WireConfig)

    def __post_init__(self) -> None:
        if self.deadline_s <= 0 or self.attempt_timeout_s <= 0 or self.inflight_max <= 0:
            raise ValueError("deadline_s, attempt_timeout_s and inflight_max must be positive")
        if self.probe_timeout_s <= 0:
            raise ValueError("probe_timeout_s must be positive")
        self.search()  # ValueError if the poll or back-off bounds are inconsistent

    def backoff(self) -> Backoff:
        return Backoff(self.backoff_s, 2.0, self.backoff_max_s)

    def search(self) -> SearchConfig:
        return SearchConfig(
            suspect_s=self.suspect_s,
            poll_s=self.poll_s,
            poll_max_s=self.poll_max_s,
            backoff_s=self.backoff_s,
            backoff_max_s=self.backoff_max_s,
        )


def parse_addresses(addresses: str | Sequence[str]) -> list[str]:
    """``"h1:7400,h2:7400"`` or a list; ``id=host:port`` entries (a ``--peers`` list) work too."""
    items = addresses.split(",") if isinstance(addresses, str) else list(addresses)
    out = []
    for raw in items:
        item = raw.strip()
        if not item:
            continue
        if "=" in item:
            item = item.split("=", 1)[1]
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"bad replica address {raw!r}; expected host:port")
        out.append(f"{host}:{int(port)}")
    if not out:
        raise ValueError("no replica addresses given")
    return out


@dataclass
class _Tries:
    """One request's retries so far."""

    deadline: float  # of the whole request (loop time)
    failures: int = 0  # pauses on the back-off so far: each is longer
    redirects: int = 0  # to a named leader: more than the replicas is a ping-pong
    last: str = "no replica tried"  # for the Unavailable message


class KvClient:
    """Asyncio KV client for a replica group. Use ``async with`` or call ``close``."""

    def __init__(
        self, addresses: str | Sequence[str], *, token: str, config: KvClientConfig | None = None
    ) -> None:
        self.addresses = parse_addresses(addresses)
        self.config = config or KvClientConfig()
        self._backoff = self.config.backoff()
        self._leader: str | None = None
        self._rr = 0
        self._rids = itertools.count(1)
        self._conns = ReplicaConnections(token=token, wire=self.config.wire)
        self._search = LeaderSearch(self.addresses, self.config.search())
        # The running leader search, awaited by every other request that lost the leader.
        self._searching: asyncio.Future[None] | None = None
        self._empty_rounds = 0  # searches in a row that found no leader
        self._answered = False  # some replica has answered this client
        self._refused: set[str] = set()  # refused before any answer (see _note_failure)
        self._session = 0
        self._session_lock: asyncio.Lock | None = None
        self._seqs = itertools.count(1)
        self._inflight_seqs: set[int] = set()
        self._low_seq = 1
        self._slots: asyncio.Semaphore | None = None
        self._closed = False

    async def __aenter__(self) -> KvClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def leader(self) -> str | None:
        """The replica that answered last (the leader, as far as this client knows)."""
        return self._leader

    @property
    def session(self) -> int:
        """This client's session id (0 until its first write opened one)."""
        return self._session

    # -- public operations ---------------------------------------------------------
    async def put(self, key: str, value: Any) -> None:
        check_key(key)
        check_value(value)
        await self._write(Put(key, value))

    async def get(self, key: str, default: Any = None) -> Any:
        result = await self.read(key)
        return result.value if result.found else default

    async def read(self, key: str) -> KvResult:
        check_key(key)
        reply = await self._request(lambda rid: Read(rid, key))
        if not isinstance(reply, Reply):
            raise ProtocolError(f"expected a Reply, got {type(reply).__name__}")
        return checked(decode_result(reply.result))

    async def delete(self, key: str) -> bool:
        check_key(key)
        return (await self._write(Delete(key))).found

    async def cas(self, key: str, expected: Any, new: Any) -> bool:
        """Set ``key`` to ``new`` iff it equals ``expected`` (None: iff absent). True if swapped."""
        check_key(key)
        if expected is not None:
            check_value(expected)
        if new is not None:
            check_value(new)
        return (await self._write(Cas(key, expected, new))).ok

    async def change_members(self, *, add: bool, node: int, address: str = "") -> None:
        """Add ``node`` at ``address`` to the replica group, or remove it (one at a time).

        A retry after a timeout may find the change already made; that counts as done.
        """
        try:
            await self._request(lambda rid: ChangeMembers(rid, add, node, address))
        except ValueError as exc:
            done = "already a member" if add else "is not a member"
            if done not in str(exc):
                raise

    async def status(self, address: str, timeout_s: float = 2.0) -> Status:
        """Ask one replica for its view (no redirect, no retry)."""
        link = await asyncio.wait_for(self._conns.link(address), timeout_s)
        rid = next(self._rids)
        reply = await self._conns.exchange(link, StatusQuery(rid), rid, timeout_s)
        if not isinstance(reply, Status):
            raise ProtocolError(f"expected Status, got {type(reply).__name__}")
        return reply

    async def close(self) -> None:
        self._closed = True
        await self._conns.close()

    # -- sessions ---------------------------------------------------------------------
    async def _open_session(self) -> int:
        if self._session_lock is None:
            self._session_lock = asyncio.Lock()
        async with self._session_lock:
            if not self._session:
                command = encode_command(OpenSession())
                reply = await self._request(lambda rid: Submit(rid, command))
                if not isinstance(reply, Reply):
                    raise ProtocolError(f"expected a Reply, got {type(reply).__name__}")
                self._session = checked(decode_result(reply.result)).session
            return self._session

    async def _write(self, op: Op) -> KvResult:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.config.inflight_max)
        async with self._slots:
            for _ in range(2):
                session = await self._open_session()
                seq = next(self._seqs)
                self._inflight_seqs.add(seq)
                # ack_below: every seq below the lowest one in flight has its answer.
                while self._low_seq < seq and self._low_seq not in self._inflight_seqs:
                    self._low_seq += 1
                try:
                    command = encode_command(Request(session, seq, self._low_seq, op))
                    sends = [0]
                    reply = await self._request(_submitter(command, sends))
                finally:
                    self._inflight_seqs.discard(seq)
                if not isinstance(reply, Reply):
                    raise ProtocolError(f"expected a Reply, got {type(reply).__name__}")
                result = decode_result(reply.result)
                if result.error != "session_expired":
                    return checked(result)
                if sends[0] > 1:
                    # An earlier send may have been applied before the session was evicted;
                    # re-running it under a new session could apply it twice.
                    raise KvError("outcome unknown: the session expired while retrying")
                # The machine applied nothing for this command: a fresh session may retry it.
                if self._session == session:
                    self._session = 0
        raise KvError("session expired twice in a row; the session table is overloaded")

    # -- requests -----------------------------------------------------------------------
    def _target(self) -> str:
        if self._leader is not None:
            return self._leader
        address = self.addresses[self._rr % len(self.addresses)]
        return address

    async def _request(self, make: Callable[[int], ClientMessage]) -> ReplyMessage:
        """Send to the leader until one answers; same message content on every retry."""
        loop = asyncio.get_running_loop()
        tries = _Tries(loop.time() + self.config.deadline_s)
        while not self._closed:
            remaining = tries.deadline - loop.time()
            if remaining <= 0:
                break
            address = self._target()
            timeout = min(remaining, self.config.attempt_timeout_s)
            try:
                link = self._conns.links.get(address)
                if link is None or link.conn.closed:  # connect only when needed (a task)
                    link = await asyncio.wait_for(self._conns.link(address), timeout)
                rid = next(self._rids)
                reply = await self._conns.exchange(link, make(rid), rid, timeout)
            except AuthError:
                raise
            except (OSError, TimeoutError, LeptonError) as exc:
                tries.last = f"{address}: {type(exc).__name__}: {exc}"
                self._note_failure(address, exc)
                await self._find_leader(tries.deadline)
                continue
            self._note_answer(address)
            if not isinstance(reply, Redirect | Failed):
                self._leader = address
                return reply
            await self._retry_after(address, reply, tries)
        raise Unavailable(
            f"no leader answered within {self.config.deadline_s:g}s "
            f"(replicas {', '.join(self.addresses)}; last: {tries.last})"
        )

    async def _retry_after(self, address: str, reply: Redirect | Failed, tries: _Tries) -> None:
        """Get ready to try again after ``address`` answered ``reply``: go to the leader it
        named, find one, or pause (ValueError at once if our request is wrong)."""
        self._forget(address)
        now = asyncio.get_running_loop().time()
        if isinstance(reply, Redirect):
            tries.last = f"{address} redirected to {reply.leader}"
            if reply.leader == address or not self._search.usable(reply.leader, now):
                await self._find_leader(tries.deadline)  # none known, or a dead one named
                return
            tries.redirects += 1
            if tries.redirects <= len(self.addresses):
                self._leader = reply.leader  # a named leader: go there at once
                return
            tries.failures += 1  # ping-pong (a leader change under way): pause
            await self._pause(tries.failures, tries.deadline)
            return
        if reply.reason.startswith(("ValueError", "TypeError")):
            raise ValueError(reply.reason)  # our request is wrong: no retry
        tries.last = f"{address}: {reply.reason}"
        if reply.maybe_applied:  # it lost its leadership: find the new leader
            await self._find_leader(tries.deadline)
        else:  # refused (overloaded): give it time
            tries.failures += 1
            await self._pause(tries.failures, tries.deadline)

    async def _pause(self, failures: int, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        pause = self._backoff.next_delay(failures)
        await asyncio.sleep(min(pause, max(0.0, deadline - loop.time())))

    def _forget(self, address: str) -> None:
        if self._leader == address:
            self._leader = None
        self._rr += 1

    def _note_answer(self, address: str) -> None:
        self._answered = True
        self._search.answered(address)

    def _note_failure(self, address: str, exc: BaseException) -> None:
        """``address`` did not answer: suspect it. Before any replica ever answered this
        client, every address refusing connections raises at once (nothing listens there:
        a wrong address or a group not started), as the coordinator client does."""
        self._forget(address)
        self._search.failed(address, asyncio.get_running_loop().time())
        if self._answered or not _refused(exc):
            return
        self._refused.add(address)
        if self._refused >= set(self.addresses):
            raise Unavailable(
                f"no replica listens at {', '.join(self.addresses)} (connection refused): "
                "is the group up, and is the address right?"
            ) from None

    # -- finding the leader ---------------------------------------------------------------
    async def _find_leader(self, deadline: float) -> None:
        """Return once a leader is known, the deadline passed or the client closed.

        One search at a time: the client's concurrent requests (up to ``inflight_max``
        pipelined writes) lose the leader together and wait for the same search.
        """
        loop = asyncio.get_running_loop()
        while self._leader is None and not self._closed and loop.time() < deadline:
            pending = self._searching
            if pending is not None:
                await asyncio.wait({pending}, timeout=deadline - loop.time())
                continue
            done: asyncio.Future[None] = loop.create_future()
            self._searching = done
            try:
                await self._search_round(deadline)
            finally:
                self._searching = None
                done.set_result(None)

    async def _search_round(self, deadline: float) -> None:
        """Ask the replicas not suspected, all at once; pause a poll if none named a leader."""
        loop = asyncio.get_running_loop()
        timeout = min(self.config.probe_timeout_s, deadline - loop.time())
        leader = await self._probe_all(self._search.to_ask(loop.time()), timeout)
        if leader is not None:
            self._leader = leader
            self._empty_rounds = 0
            return
        self._empty_rounds += 1
        pause = self._search.pause_s(self._empty_rounds, loop.time())
        await asyncio.sleep(min(pause, max(0.0, deadline - loop.time())))

    async def _probe_all(self, addresses: list[str], timeout: float) -> str | None:
        """The first leader any of ``addresses`` names (the other probes are cancelled)."""
        leader: str | None = None
        try:
            async with asyncio.TaskGroup() as tg:
                probes = [tg.create_task(self._probe(a, timeout)) for a in addresses]
                for next_done in asyncio.as_completed(probes):
                    leader = await next_done
                    if leader is not None:
                        break
                for probe in probes:
                    probe.cancel()
        except* (AuthError, Unavailable) as group:
            raise group.exceptions[0] from None
        return leader

    async def _probe(self, address: str, timeout: float) -> str | None:
        """The leader ``address`` names: itself if it leads, else its own leader if not
        suspect; None if it knows none, names a suspect, or does not answer."""
        try:
            status = await asyncio.wait_for(self.status(address, timeout), timeout)
        except AuthError:
            raise
        except (OSError, TimeoutError, LeptonError) as exc:
            self._note_failure(address, exc)
            return None
        self._note_answer(address)
        if status.role == "leader":
            return address
        named = status.leader_address
        usable = named != address and self._search.usable(named, asyncio.get_running_loop().time())
        return named if usable else None


def _refused(exc: BaseException) -> bool:
    """A refused connection (asyncio reports one per resolved address as a plain OSError
    listing them when a name resolves to several)."""
    if isinstance(exc, ConnectionRefusedError):
        return True
    return type(exc) is OSError and "[Errno 111]" in str(exc)


def _submitter(command: bytes, sends: list[int]) -> Callable[[int], ClientMessage]:
    """Build the Submit for each try, counting the tries in ``sends[0]``."""

    def make(rid: int) -> ClientMessage:
        sends[0] += 1
        return Submit(rid, command)

    return make
