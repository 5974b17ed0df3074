"""The callers a replica driver owes an answer: ``Waiters``, and how they are answered.

A caller of ``ReplicaDriver.propose_cb`` (or ``change_members_cb``) waits for the slot
its command went into; one of ``read_index_cb`` for its read index. Each holds a
``Done`` callback, called exactly once: with the command's result, or with the error
that ended the wait (``ProposalLost``, ``LeadershipLost``, ``NotLeader``, ...).
``resolver`` and ``discard`` turn a ``Done`` into an asyncio future.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from lepton_ai.consensus.core_types import ProposalId
from lepton_ai.consensus.peer_messages import Value
from lepton_ai.errors import LeptonError

Done = Callable[[bytes | None, BaseException | None], None]
"""Called once with (result, None) or (None, error)."""


class ProposalLost(LeptonError):
    """The slot a command was proposed into committed another value: it did not take effect."""


class LeadershipLost(LeptonError):
    """This replica stopped leading while the command was in flight: it may still commit."""


class Waiters:
    """Proposals waiting for their slot to be applied, and reads for their read index."""

    def __init__(self) -> None:
        self._by_slot: dict[int, list[tuple[ProposalId, Done]]] = {}
        self.count = 0  # proposals waiting, over every slot
        self._reads: dict[int, Done] = {}
        self._read_ids = 0

    def add(self, pid: ProposalId, done: Done) -> None:
        self._by_slot.setdefault(pid.slot, []).append((pid, done))
        self.count += 1

    def applied(self, slot: int, value: Value, results: list[bytes]) -> None:
        """``slot`` was applied as ``value`` with ``results``: answer its waiters (a
        proposal whose value another one replaced did not take effect)."""
        waiting = self._by_slot.pop(slot, None)
        if not waiting:
            return
        self.count -= len(waiting)
        for pid, done in waiting:
            if pid.matches(value) and pid.index < len(results):
                done(results[pid.index], None)
            else:
                done(None, ProposalLost(f"slot {slot} chose another value"))

    def fail_through(self, slot: int) -> None:
        """An installed snapshot covers every slot up to ``slot``: their waiters cannot
        learn their results."""
        for s in [s for s in self._by_slot if s <= slot]:
            for _, done in self._by_slot.pop(s):
                self.count -= 1
                done(None, LeadershipLost("slot overtaken by an installed snapshot"))

    def fail_all(self) -> None:
        """Leadership lost. In-flight commands may still be chosen by the next leader;
        callers retry with the same session sequence, which the state machine
        deduplicates."""
        for waiting in self._by_slot.values():
            for _, done in waiting:
                done(None, LeadershipLost("leadership lost; retry on the leader"))
        self._by_slot.clear()
        self.count = 0

    def next_read_id(self) -> int:
        self._read_ids += 1
        return self._read_ids

    def add_read(self, rid: int, done: Done) -> None:
        self._reads[rid] = done

    def take_read(self, rid: int) -> Done | None:
        return self._reads.pop(rid, None)


def resolver(fut: asyncio.Future[bytes]) -> Done:
    def done(result: bytes | None, error: BaseException | None) -> None:
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result or b"")

    return done


async def discard(fut: asyncio.Future[bytes]) -> None:
    await fut
