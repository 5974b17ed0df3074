"""A worker agent that knows every coordinator and follows the leader.

    python -m lepton_ai.node.worker_ha --join h1:p1,h2:p2,h3:p3 ...

``WorkerAgent`` (node/worker.py) joins one address and reconnects to it. This
subclass adds a leader watch: it asks the coordinators (``GetStatus``, answered
by followers too) who leads, points ``join`` at that address, and drops a
session held with a coordinator that no longer leads (a deposed or hung leader:
SIGSTOP leaves the TCP connection open, so the agent would never notice by
itself). The base agent then re-registers with the leader and reports what it
still runs, and the results waiting in its outbox go to the new leader.

Kept as a subclass so the worker's own module stays with its owner; the watch
belongs in ``WorkerAgent`` eventually.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

from lepton_ai.errors import LeptonError
from lepton_ai.node.executors import ExecutorConfig
from lepton_ai.node.messages import ClientReply, ClusterInfo, ErrorReply, GetStatus
from lepton_ai.node.netutil import node_wire_config, parse_address
from lepton_ai.node.process import watch_parent
from lepton_ai.node.worker import WorkerAgent, WorkerConfig
from lepton_ai.wire import Codec, Connection, connect

log = logging.getLogger("lepton_ai.worker.ha")
_CODEC = Codec[ClientReply](ClientReply)


@dataclass(frozen=True)
class LeaderWatchConfig:
    interval_s: float = 0.2
    searching_s: float = 0.05  # while no coordinator names a leader
    probe_timeout_s: float = 0.5


class HaWorkerAgent(WorkerAgent):
    def __init__(
        self,
        joins: list[str],
        *,
        token: str,
        data_dir: str,
        name: str,
        config: WorkerConfig,
        watch: LeaderWatchConfig | None = None,
    ) -> None:
        if not joins:
            raise ValueError("no coordinator address to join")
        super().__init__(joins[0], token, data_dir, name, config)
        self.coordinators = [parse_address(a) for a in joins]
        self.watch = watch or LeaderWatchConfig()
        self._probes: dict[tuple[str, int], Connection[ClientReply]] = {}
        self._wire = node_wire_config(connect_timeout_s=self.watch.probe_timeout_s)

    async def run(self) -> None:
        watcher = asyncio.get_running_loop().create_task(self._leader_watch())
        try:
            await super().run()
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            for conn in self._probes.values():
                conn.writer.close()

    async def _leader_watch(self) -> None:
        pause = 0.0  # the first look is at once: join the leader, not a follower
        while True:
            await asyncio.sleep(pause)
            leader = await self._find_leader()
            # No leader known (an election runs): look again soon, else at the interval.
            pause = self.watch.interval_s if leader is not None else self.watch.searching_s
            if leader is None:
                if self._conn is None:
                    # Nobody names a leader and we are not connected: try the next.
                    i = self.coordinators.index(self.join) if self.join in self.coordinators else 0
                    self.join = self.coordinators[(i + 1) % len(self.coordinators)]
                continue
            if leader != self.join:
                log.info("leader is now %s:%s", *leader)
                self.join = leader
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
                    if leader not in self.coordinators:
                        self.coordinators.append(leader)
                    return leader
        return None

    async def _probe(self, address: tuple[str, int]) -> str | None:
        """The leader ``address`` names (itself when it leads), or None."""
        try:
            conn = self._probes.get(address)
            if conn is None or conn.closed:
                conn = await asyncio.wait_for(
                    connect(*address, token=self.token, codec=_CODEC, config=self._wire),
                    self.watch.probe_timeout_s,
                )
                self._probes[address] = conn
            await conn.send(GetStatus(0, 0.0))
            reply = await asyncio.wait_for(conn.recv(), self.watch.probe_timeout_s)
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


def run_from_args(args: Any) -> None:
    from lepton_ai.wire import resolve_token

    if args.slots < 1 or args.spares < 0:
        raise ValueError(
            f"--slots must be >= 1 and --spares >= 0 (got {args.slots}, {args.spares})"
        )
    joins = [a.strip() for a in str(args.join).split(",") if a.strip()]
    config = WorkerConfig(slots=args.slots, executor=ExecutorConfig(spares=args.spares))
    name = args.name or f"w{os.getpid()}"
    token = resolve_token(args.token)
    watch_parent()
    logging.basicConfig(level=os.environ.get("LEPTON_LOG_LEVEL", "WARNING"))
    agent = HaWorkerAgent(joins, token=token, data_dir=args.data_dir, name=name, config=config)
    if not args.quiet:
        print(json.dumps({"worker": agent.worker_id, "pid": os.getpid()}), flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(agent.run())


def main(argv: list[str] | None = None) -> None:
    import argparse

    from lepton_ai.node.cli import add_worker_args

    parser = argparse.ArgumentParser(prog="lepton worker")
    add_worker_args(parser)
    run_from_args(parser.parse_args(argv))
    sys.exit(0)


if __name__ == "__main__":
    main()
