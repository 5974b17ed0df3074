"""Peer-to-peer messages of the Multi-Paxos core, and the values it stores per slot.

Every message is a msgspec ``Struct`` tagged with its class name, so the runtime encodes
any of them with ``msgspec.msgpack.encode(msg)`` and decodes with
``msgspec.msgpack.decode(buf, type=PeerMessage)``. Every message carries ``src`` (the
sender's node id) and a ``ballot``; the core checks that a leader-only message's ballot
belongs to its sender, so a peer cannot speak for another.

A ballot is ``(round, node_id)``; Python tuple order is the protocol's total order.
``ZERO_BALLOT`` is below every ballot a node can use (rounds start at 1).

Slots hold a ``Value``: a no-op (gap filler), a batch of client commands, or a
membership configuration. ``Value.origin`` is the ballot in which a leader first proposed
the value; it survives re-proposal by later leaders, so a proposer recognises its own
value when the slot is committed (see ``core.ProposalId``).
"""

from __future__ import annotations

from typing import Final

import msgspec

Ballot = tuple[int, int]
"""(round, node_id). Compared as a tuple."""

ZERO_BALLOT: Final[Ballot] = (0, 0)

KIND_NOOP: Final = 0
"""A gap filler chosen by a new leader; the state machine skips it."""
KIND_COMMANDS: Final = 1
"""A batch of client commands, applied in order."""
KIND_CONFIG: Final = 2
"""A membership change: ``members`` is the whole new configuration, ``commands`` holds at
most one opaque payload from the runtime (for example the new member's address)."""

NACK_STALE: Final = 0
"""The receiver promised a higher ballot (``Nack.promised``)."""
NACK_BEHIND: Final = 1
"""The receiver has compacted (or is far past) the candidate's commit point; the
candidate must be caught up before it may lead."""
NACK_NOT_MEMBER: Final = 2
"""The candidate is in no configuration the refuser knows of, and the refuser's commit
point (``commit``) is past the candidate's: if the candidate's own committed configuration
still includes it, a committed change has removed it since (see ``Replica.removed``)."""


class Value(msgspec.Struct, frozen=True, array_like=True):
    """What one slot holds."""

    kind: int
    origin: Ballot
    commands: tuple[bytes, ...] = ()
    members: tuple[int, ...] = ()


class Entry(msgspec.Struct, frozen=True, array_like=True):
    """An accepted value: slot ``slot`` holds ``value``, accepted at ``ballot``."""

    slot: int
    ballot: Ballot
    value: Value


class Snapshot(msgspec.Struct, frozen=True, array_like=True):
    """The state machine after applying every slot up to ``slot``, and the configuration
    in effect there. ``data`` is whatever ``StateMachine.snapshot()`` returned."""

    slot: int
    members: tuple[int, ...]
    data: bytes


class Prepare(msgspec.Struct, frozen=True, tag=True):
    """Phase 1a: ``src`` asks for a promise at ``ballot``; ``commit`` is its commit point,
    so a promise needs to carry only the slots above it."""

    src: int
    ballot: Ballot
    commit: int


class Promise(msgspec.Struct, frozen=True, tag=True):
    """Phase 1b: the sender promised ``ballot``. ``entries`` are all its accepted values
    above the candidate's commit point; the ones at or below ``commit`` are known chosen."""

    src: int
    ballot: Ballot
    commit: int
    entries: list[Entry]


class Accept(msgspec.Struct, frozen=True, tag=True):
    """Phase 2a for the contiguous slots ``first_slot .. first_slot+len(values)-1`` (may be
    empty: then it only carries ``commit``). ``commit`` is the leader's commit point: every
    value it sends at or below it is chosen."""

    src: int
    ballot: Ballot
    first_slot: int
    values: list[Value]
    commit: int


class Accepted(msgspec.Struct, frozen=True, tag=True):
    """Phase 2b, cumulative: the sender holds every slot up to ``through`` as accepted at
    ``ballot`` or known chosen. ``gap`` says an Accept skipped slots after ``through``
    (a lost message): the leader resends from ``through + 1``."""

    src: int
    ballot: Ballot
    through: int
    gap: bool = False


class Nack(msgspec.Struct, frozen=True, tag=True):
    """A refusal of ``ballot``. ``reason`` is NACK_STALE (``promised`` is the higher
    ballot the sender must beat) or NACK_BEHIND (``commit`` is the refuser's commit)."""

    src: int
    ballot: Ballot
    promised: Ballot
    reason: int
    commit: int


class Heartbeat(msgspec.Struct, frozen=True, tag=True):
    """The leader is alive at ``ballot``; carries its commit point and the newest
    read-index round ``read_seq`` that the acknowledgement confirms."""

    src: int
    ballot: Ballot
    commit: int
    read_seq: int


class HeartbeatAck(msgspec.Struct, frozen=True, tag=True):
    """Answer to a Heartbeat: the sender still follows ``ballot``; ``through`` as in
    Accepted, so a heartbeat also detects a lagging follower."""

    src: int
    ballot: Ballot
    through: int
    read_seq: int


class InstallSnapshot(msgspec.Struct, frozen=True, tag=True):
    """The leader replaces a follower's prefix up to ``snapshot.slot`` (the follower is
    behind the leader's compacted log)."""

    src: int
    ballot: Ballot
    snapshot: Snapshot
    commit: int


class Announce(msgspec.Struct, frozen=True, tag=True):
    """A learner (a standby replica, in no configuration) tells a member it exists and
    where it listens; the leader streams it the log as to a lagging peer, and forgets it
    when it falls silent. ``ballot`` is the highest ballot the learner promised (it
    follows leaders like an acceptor; informational). ``address`` is opaque to the core."""

    src: int
    ballot: Ballot
    address: str


PeerMessage = (
    Prepare
    | Promise
    | Accept
    | Accepted
    | Nack
    | Heartbeat
    | HeartbeatAck
    | InstallSnapshot
    | Announce
)
"""Decode with ``msgspec.msgpack.decode(buf, type=PeerMessage)``."""

PEER_MESSAGE_TYPES: Final = (
    Prepare,
    Promise,
    Accept,
    Accepted,
    Nack,
    Heartbeat,
    HeartbeatAck,
    InstallSnapshot,
    Announce,
)
