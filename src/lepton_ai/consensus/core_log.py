"""The replica's log: accepted entries above a snapshot, the commit point, configurations.

Plain data structure of the Multi-Paxos core (no I/O). Slots are numbered from 1;
slot 0 is the empty prefix. Entries at or below ``snapshot.slot`` may be kept for a
while (``log_retain_entries``) so a slightly lagging peer is caught up without a snapshot.
"""

from __future__ import annotations

from lepton_ai.consensus.core_types import InvariantError
from lepton_ai.consensus.peer_messages import KIND_CONFIG, Ballot, Entry, Snapshot, Value


class Log:
    """Accepted values per slot, the chosen prefix and the membership history."""

    def __init__(self, members: tuple[int, ...]) -> None:
        self.snapshot = Snapshot(slot=0, members=tuple(members), data=b"")
        self.entries: dict[int, Entry] = {}
        self.first = 1
        """Lowest slot still held in ``entries`` (older ones were compacted)."""
        self.last = 0
        """Highest slot with an entry, or the snapshot slot."""
        self.commit = 0
        """Every slot up to here is chosen and held (or inside the snapshot)."""
        self.config_slots: dict[int, tuple[int, ...]] = {}

    # -- reading ------------------------------------------------------------------------

    def get(self, slot: int) -> Entry | None:
        return self.entries.get(slot)

    def value(self, slot: int) -> Value:
        entry = self.entries.get(slot)
        if entry is None:
            raise InvariantError(f"slot {slot} is not in the log (first={self.first})")
        return entry.value

    def has(self, slot: int) -> bool:
        return slot in self.entries

    def config_at(self, slot: int) -> tuple[int, ...]:
        """Members in effect once every slot up to ``slot`` is applied."""
        best = -1
        members = self.snapshot.members
        for s, m in self.config_slots.items():
            if self.snapshot.slot < s <= slot and s > best:
                best, members = s, m
        return members

    def committed_config(self) -> tuple[int, ...]:
        return self.config_at(self.commit)

    def pending_config(self) -> tuple[int, tuple[int, ...]] | None:
        """The newest configuration entry above the commit point, if any."""
        above = [s for s in self.config_slots if s > self.commit]
        if not above:
            return None
        s = max(above)
        return s, self.config_slots[s]

    def entries_from(self, start: int, count_max: int, bytes_max: int) -> list[Value]:
        """Contiguous values from ``start`` (at least one if present), within bounds."""
        out: list[Value] = []
        size = 0
        slot = start
        while slot <= self.last and len(out) < count_max:
            entry = self.entries.get(slot)
            if entry is None:
                break
            size += sum(len(c) for c in entry.value.commands)
            if out and size > bytes_max:
                break
            out.append(entry.value)
            slot += 1
        return out

    def contiguous_at(self, start: int, ballot: Ballot) -> int:
        """Highest slot ``h >= start`` with every slot in (start, h] accepted at ``ballot``."""
        h = start
        while True:
            entry = self.entries.get(h + 1)
            if entry is None or entry.ballot != ballot:
                return h
            h += 1

    def held_through(self, limit: int) -> int:
        """Highest slot ``<= limit`` such that every slot above the commit point up to it
        is held (used to trust a persisted commit hint only as far as the entries go)."""
        h = self.commit
        while h < limit and (h + 1) in self.entries:
            h += 1
        return h

    # -- writing ------------------------------------------------------------------------

    def put(self, entry: Entry) -> None:
        """Store an accepted entry (above the commit point only: chosen slots never change)."""
        if entry.slot <= self.commit:
            raise InvariantError(f"overwrite of chosen slot {entry.slot} (commit {self.commit})")
        self.entries[entry.slot] = entry
        if entry.value.kind == KIND_CONFIG:
            self.config_slots[entry.slot] = tuple(entry.value.members)
        else:
            self.config_slots.pop(entry.slot, None)
        self.last = max(self.last, entry.slot)

    def advance_commit(self, slot: int) -> bool:
        """Move the commit point forward to ``slot``; every slot up to it must be held."""
        if slot <= self.commit:
            return False
        for s in range(self.commit + 1, slot + 1):
            if s not in self.entries:
                raise InvariantError(f"commit to {slot} with slot {s} missing")
        self.commit = slot
        return True

    def install(self, snapshot: Snapshot) -> None:
        """Replace the prefix up to ``snapshot.slot`` by the snapshot (catch-up or restart)."""
        if snapshot.slot < self.commit:
            raise InvariantError("snapshot behind the commit point")
        self.snapshot = snapshot
        for s in [s for s in self.entries if s <= snapshot.slot]:
            del self.entries[s]
        for s in [s for s in self.config_slots if s <= snapshot.slot]:
            del self.config_slots[s]
        self.first = snapshot.slot + 1
        self.commit = snapshot.slot
        self.last = max(self.last, snapshot.slot)

    def compact(self, snapshot: Snapshot, retain: int) -> None:
        """Record a local snapshot and drop entries more than ``retain`` slots below it."""
        if snapshot.slot > self.commit:
            raise InvariantError("snapshot of uncommitted slots")
        self.snapshot = snapshot
        for s in [s for s in self.config_slots if s <= snapshot.slot]:
            del self.config_slots[s]
        cut = snapshot.slot - retain
        for s in range(self.first, cut + 1):
            self.entries.pop(s, None)
        self.first = max(self.first, cut + 1)
