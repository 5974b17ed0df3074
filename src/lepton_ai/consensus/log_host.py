"""The seam between a replicated log and what runs on it.

The coordinator's durable state is a deterministic state machine fed by commands
from a log. Whether that log is a single local file (one coordinator) or the
Multi-Paxos replicated log (three or five) is hidden behind ``LogHost``: the
scheduler and every other controller change state only by ``submit``-ting
commands, never by writing state directly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from lepton_ai.errors import LeptonError


class NotLeader(LeptonError):
    """This replica cannot order commands; ``leader`` is its best guess of who can."""

    def __init__(self, leader: str | None) -> None:
        super().__init__(f"not the leader; try {leader or 'another replica'}")
        self.leader = leader


class StateMachine(Protocol):
    """A deterministic state machine: the same commands in the same order give the same state."""

    def apply(self, command: bytes) -> bytes:
        """Apply one committed command and return its result for the proposer."""
        ...

    def snapshot(self) -> bytes:
        """Serialise the whole state (used for log compaction and catch-up)."""
        ...

    def restore(self, data: bytes) -> None:
        """Replace the whole state with a snapshot taken by ``snapshot``."""
        ...


class LogHost(Protocol):
    """One replica of a log that feeds a ``StateMachine``."""

    async def submit(self, command: bytes) -> bytes:
        """Order ``command``, wait until it is applied here, return its result.

        Raises ``NotLeader`` on a replica that cannot order commands and
        ``lepton_ai.errors.Unavailable`` when no quorum answers in time.
        """
        ...

    async def read_barrier(self) -> None:
        """Return once local state reflects every command committed before the call.

        After it returns, reading the state machine is linearizable.
        """
        ...

    @property
    def is_leader(self) -> bool: ...

    @property
    def leader_address(self) -> str | None: ...

    def on_leadership(self, callback: Callable[[bool], None]) -> None:
        """Call ``callback(True)`` when this replica becomes leader, ``False`` when it stops."""
        ...
