"""Which of a ``Ready``'s messages may leave before its fdatasync (the leader's early send).

The rule the real driver (``consensus.driver.ReplicaDriver._handle``) and the simulator
runtime (``sim.cluster.SimCluster``) must share, so the simulator exercises the order the
driver really uses. Pure: imports only the consensus message and Ready types.

A leader's ``Accept`` and ``Heartbeat`` are proposals, not votes: sending them before this
replica's own fdatasync lets the followers' fdatasyncs overlap the leader's (Ongaro's
thesis, 10.2.1). That is safe because the core counts the leader's own acceptance only in
``Replica.advance``, i.e. after the Ready is durable. Everything that carries a vote of
this replica (``Promise``, ``Accepted``, ``HeartbeatAck``, ``Nack``) and everything else
(``Prepare``, ``InstallSnapshot``) waits for the sync.
"""

from __future__ import annotations

from lepton_ai.consensus.core_types import Ready
from lepton_ai.consensus.peer_messages import Accept, Heartbeat, PeerMessage

EARLY_TYPES = (Accept, Heartbeat)
"""Leader-role messages that carry no vote of their sender."""

Outgoing = list[tuple[int, PeerMessage]]


def commit_is_durable(rd: Ready) -> bool:
    """True unless ``rd`` commits a slot it also persists: a quorum that counted this
    replica's not yet synced vote (a single-voter group, or a new leader re-accepting a
    slot it learned was chosen) must not be announced - the commit point rides on every
    Accept/Heartbeat - before that vote is durable."""
    if not rd.committed or not rd.persist_entries:
        return True
    return rd.committed[-1][0] < min(entry.slot for entry in rd.persist_entries)


def split_early(rd: Ready) -> tuple[Outgoing, Outgoing]:
    """``(early, late)``: ``early`` may be sent before ``rd``'s durable part is fsynced,
    ``late`` only after. Without a sync to wait for, everything is ``late`` (sent after
    the unsynced write, in the order the core produced it)."""
    if not (rd.must_sync and rd.messages and commit_is_durable(rd)):
        return [], rd.messages
    early: Outgoing = []
    late: Outgoing = []
    for item in rd.messages:
        (early if isinstance(item[1], EARLY_TYPES) else late).append(item)
    return early, late
