"""How a worker agent given several coordinators follows the leader (a mixin of
``WorkerAgent``).

Given ``--join h1:p1,h2:p2,h3:p3`` (or a single address: a follower names the
leader too) the agent asks them (``GetStatus``, answered by followers too) who
leads, points its session at that address, and drops a session held with one that
no longer leads (a deposed or hung leader: SIGSTOP
leaves the TCP connection open, so the session would never notice by itself). It
then re-registers with the leader, and the results waiting in its outbox go
there. Leaders named in answers are remembered, bounded, so coordinators that
replaced the given ones are found too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lepton_ai.errors import LeptonError
from lepton_ai.node.messages import ClientReply, ClusterInfo, ErrorReply, GetStatus, WorkerMessage
from lepton_ai.node.node_net import parse_address
from lepton_ai.wire import Codec, Connection, WireConfig, connect

if TYPE_CHECKING:
    from lepton_ai.node.worker import WorkerConfig

log = logging.getLogger("lepton_ai.worker")

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


class LeaderFollower:
    """Mixed into ``WorkerAgent``; the attributes below are the agent's."""

    token: str
    config: WorkerConfig
    coordinators: list[tuple[str, int]]  # given, then learned from leader hints
    join: tuple[str, int]  # the one the session joins (the leader, once known)
    _conn: Connection[WorkerMessage] | None  # the session, once registered
    _join_changed: asyncio.Event  # ``join`` changed: the session's loop rejoins at once
    _probes: dict[tuple[str, int], Connection[ClientReply]]
    _probe_wire: WireConfig

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
