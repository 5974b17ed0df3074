"""The simulated disk: what a node's runtime has durably written, and its fdatasync.

``SimDisk`` holds what survived (a crash keeps only that). ``DiskConfig`` says how long
an fdatasync takes in simulated time and whether a leader's Accept/Heartbeat may leave
before it (``ready_order.split_early``, the real driver's order); ``InFlightSync`` is a
Ready whose sync is running, ``SyncStats`` counts how often that window was exercised.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lepton_ai.consensus.core_types import DurableState, Ready
from lepton_ai.consensus.peer_messages import ZERO_BALLOT, Ballot, Entry, Snapshot
from lepton_ai.consensus.ready_order import Outgoing


@dataclass(slots=True)
class SimDisk:
    """What one node's runtime has durably written."""

    promised: Ballot = ZERO_BALLOT
    entries: dict[int, Entry] = field(default_factory=dict)
    snapshot: Snapshot | None = None
    commit: int = 0

    def durable_state(self) -> DurableState:
        return DurableState(
            promised=self.promised,
            entries=[self.entries[s] for s in sorted(self.entries)],
            snapshot=self.snapshot,
            commit=self.commit,
        )


@dataclass(slots=True)
class DiskConfig:
    """Timing of the simulated fdatasync and what may overtake it (units as the network)."""

    sync_units_min: int = 1
    sync_units_max: int = 4
    """A Ready that must sync blocks its node this long (drawn per sync). ``0``/``0``
    persists at once, before anything is sent: no window for early messages at all."""
    early_send: bool = True
    """Send a leader's Accept/Heartbeat before its sync, as the driver does; False keeps
    every message behind the sync (the strict persist-then-send order)."""
    crash_in_sync: float = 0.0
    """Probability that a sync which sent messages early never completes: the node dies
    at a random moment after them (up to twice the network's largest delay), losing or
    tearing what it had not synced."""

    def validate(self) -> None:
        if not 0 <= self.sync_units_min <= self.sync_units_max:
            raise ValueError("need 0 <= sync_units_min <= sync_units_max")
        if not 0.0 <= self.crash_in_sync <= 1.0:
            raise ValueError(f"crash_in_sync must be a probability, got {self.crash_in_sync}")


@dataclass(slots=True)
class SyncStats:
    """How often the early-send window was really exercised."""

    syncs: int = 0
    early_sent: int = 0
    """Messages sent before their Ready was durable."""
    early_delivered_in_sync: int = 0
    """Of those, delivered to a peer while the sender's sync was still running."""
    crashes_in_sync: int = 0
    early_entries_lost: int = 0
    """Entries of a crashed sync that had sent messages early and did not reach the disk."""
    deferred: int = 0
    """Messages, ticks and client calls that waited for a node's blocked loop."""


@dataclass(slots=True)
class InFlightSync:
    """A node's Ready whose fdatasync is running (the node's loop is blocked until ``done_at``)."""

    ready: Ready
    late: Outgoing
    done_at: int
    crash: bool
    """The sync never completes: the node crashes at ``done_at``."""
    early_seq: tuple[int, int]
    """Network sequence numbers (lo, hi] of the messages this sync sent early."""


def records(rd: Ready) -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    if rd.persist_ballot is not None:
        out.append(("ballot", rd.persist_ballot))
    out.extend(("entry", e) for e in rd.persist_entries)
    if rd.persist_snapshot is not None:
        out.append(("snapshot", rd.persist_snapshot))
    if rd.persist_commit is not None:
        out.append(("commit", rd.persist_commit))
    return out
