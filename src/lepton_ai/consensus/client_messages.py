"""Messages between KV clients and replicas (peer-to-peer messages live in ``peer_messages.py``).

Every request carries a request id (``rid``) chosen by the client, unique per
connection; the replica answers with exactly one message carrying the same id.
"""

from __future__ import annotations

import msgspec


class Submit(msgspec.Struct, tag=True, frozen=True):
    """Order ``command`` through the log and reply with the state machine's result."""

    rid: int
    command: bytes


class Read(msgspec.Struct, tag=True, frozen=True):
    """A linearizable read of one key (read index: no log write)."""

    rid: int
    key: str


class StatusQuery(msgspec.Struct, tag=True, frozen=True):
    rid: int


class ChangeMembers(msgspec.Struct, tag=True, frozen=True):
    """Add (with its ``address``) or remove one replica; replied to once committed."""

    rid: int
    add: bool
    node: int
    address: str = ""


class Reply(msgspec.Struct, tag=True, frozen=True):
    rid: int
    result: bytes


class Redirect(msgspec.Struct, tag=True, frozen=True):
    """This replica is not the leader; ``leader`` is its best guess (``host:port``) or None."""

    rid: int
    leader: str | None


class Failed(msgspec.Struct, tag=True, frozen=True):
    """The request did not complete here; ``maybe_applied`` says whether it may still commit."""

    rid: int
    reason: str
    maybe_applied: bool


class PeerStatus(msgspec.Struct, frozen=True):
    node: int
    address: str
    match_index: int | None  # the leader's view of the peer's log; None on a follower
    connected: bool


class Status(msgspec.Struct, tag=True, frozen=True):
    rid: int
    node: int
    address: str
    role: str
    leader: int | None
    leader_address: str | None
    ballot: str
    commit_index: int
    applied_index: int
    snapshot_index: int
    wal_bytes: int
    pid: int
    peers: list[PeerStatus]
    members: list[int] = msgspec.field(default_factory=list)
    service: str = ""  # the address of what this replica hosts (a coordinator's client port)
    metrics: str = ""  # the hosting program's HTTP /metrics address ("" none)


ClientMessage = Submit | Read | StatusQuery | ChangeMembers
ReplyMessage = Reply | Redirect | Failed | Status
