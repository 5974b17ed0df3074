"""Safety checks of the simulator, run at every step.

* Learner safety: one value per slot across every replica and every restart (``chosen``),
  applied in slot order with no gaps; a snapshot equals the chosen prefix it stands for.
* Acceptor safety: at one ballot, one slot holds one value on every acceptor; a value
  accepted by a majority of the configuration at one ballot is chosen, and no other
  value may ever be chosen for that slot (checked before any replica learns it).
* Exactly once: no client command is chosen twice (the simulated clients never resubmit
  a command that might still be chosen).
* Reads: a read released by read-index sees every slot chosen before it was asked.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import msgspec

from lepton_ai.consensus.peer_messages import KIND_COMMANDS, Ballot, Entry, Value


class SafetyViolation(AssertionError):
    """The consensus core broke a safety property in simulation."""


def chain(prev: bytes, slot: int, value: Value) -> bytes:
    h = hashlib.blake2b(prev, digest_size=16)
    h.update(slot.to_bytes(8, "big"))
    h.update(msgspec.msgpack.encode(value))
    return h.digest()


class SmState(msgspec.Struct, array_like=True):
    """The simulated state machine: a hash chain over the applied (slot, value) prefix."""

    slot: int = 0
    digest: bytes = b""
    commands: int = 0


@dataclass(slots=True)
class SafetyChecker:
    members: tuple[int, ...]
    static_membership: bool = True
    """Acceptor-level quorum checks assume the bootstrap configuration; turned off by a
    membership change (learner-level checks still run)."""
    chosen: dict[int, Value] = field(default_factory=dict)
    digests: dict[int, bytes] = field(default_factory=lambda: {0: b""})
    accepted_at: dict[tuple[int, Ballot], Value] = field(default_factory=dict)
    acceptors: dict[tuple[int, Ballot], set[int]] = field(default_factory=dict)
    quorum_chosen: dict[int, Value] = field(default_factory=dict)
    command_slot: dict[bytes, int] = field(default_factory=dict)
    checks: int = 0
    hint: str = ""
    """Appended to every violation: the seed and the command that replays the run."""

    def violation(self, message: str) -> SafetyViolation:
        return SafetyViolation(f"{message} [{self.hint}]")

    def on_persist(self, node: int, entry: Entry) -> None:
        """An acceptor durably accepted ``entry``."""
        self.checks += 1
        key = (entry.slot, entry.ballot)
        prev = self.accepted_at.get(key)
        if prev is not None and prev != entry.value:
            raise self.violation(f"slot {entry.slot} has two values at ballot {entry.ballot}")
        self.accepted_at[key] = entry.value
        if not self.static_membership:
            return
        voters = self.acceptors.setdefault(key, set())
        voters.add(node)
        if len(voters) >= len(self.members) // 2 + 1:
            self._chosen_by_quorum(entry.slot, entry.value)

    def _chosen_by_quorum(self, slot: int, value: Value) -> None:
        known = self.quorum_chosen.get(slot)
        if known is not None and known != value:
            raise self.violation(f"slot {slot}: a majority accepted two different values")
        self.quorum_chosen[slot] = value
        learned = self.chosen.get(slot)
        if learned is not None and learned != value:
            raise self.violation(f"slot {slot}: learned value differs from the quorum's")

    def on_apply(self, node: int, state: SmState, slot: int, value: Value) -> None:
        """Replica ``node`` applies ``value`` at ``slot`` on top of ``state``."""
        self.checks += 1
        if slot != state.slot + 1:
            raise self.violation(f"node {node} applies slot {slot} after {state.slot}")
        known = self.chosen.get(slot)
        if known is None:
            q = self.quorum_chosen.get(slot)
            if q is not None and q != value:
                raise self.violation(f"slot {slot}: node {node} learned a value no quorum chose")
            self.chosen[slot] = value
            self.digests[slot] = chain(self.digests[slot - 1], slot, value)
            if value.kind == KIND_COMMANDS:
                for cmd in value.commands:
                    if cmd in self.command_slot:
                        raise self.violation(
                            f"command {cmd!r} chosen twice (slots {self.command_slot[cmd]}, {slot})"
                        )
                    self.command_slot[cmd] = slot
        elif known != value:
            raise self.violation(
                f"slot {slot}: node {node} applies {value!r}, but {known!r} was chosen"
            )
        state.slot = slot
        state.digest = self.digests[slot]
        state.commands += len(value.commands) if value.kind == KIND_COMMANDS else 0

    def on_restore(self, node: int, state: SmState) -> None:
        """Replica ``node`` installed a snapshot standing for the prefix up to its slot."""
        self.checks += 1
        expect = self.digests.get(state.slot)
        if expect is None:
            raise self.violation(f"node {node} installed a snapshot at unknown slot {state.slot}")
        if expect != state.digest:
            raise self.violation(f"node {node}: snapshot at slot {state.slot} differs")

    def max_chosen(self) -> int:
        return max(self.chosen, default=0)
