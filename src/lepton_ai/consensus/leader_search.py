"""How a client finds the new leader after losing the old one: pure decisions, time passed in.

Both clients (the KV client and the coordinator client) use it. After a leader dies,
the replicas a client asks next still name the dead leader until their own election
timer fires (a follower learns of a death only from the leader's silence), then name
none until a candidate wins. A client that slept on an exponential back-off between
tries woke long after the new leader was elected (0.6 s median, 0.9 s max for a
0.3 s election). Instead, the client

* suspects an address that failed (closed, refused, silent) for ``suspect_s``: a
  hint naming a suspect is read as "no leader known yet", not followed into one more
  refused connection. Suspicion expires, so a replica that restarts and wins again is
  followed again; a replica that answers is cleared at once;
* asks every replica it does not suspect right away, and again every ``poll_s``
  (growing to ``poll_max_s``) while none names a leader it can use: the new leader is
  found within a poll of its election;
* pauses on the longer back-off (``backoff_s`` doubling to ``backoff_max_s``) only
  when it suspects every replica: the whole group is down or restarting and nobody
  would answer a fast poll.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from lepton_ai.heal.backoff import Backoff

A = TypeVar("A", bound=Hashable)  # a replica's address: "host:port" or (host, port)


@dataclass(frozen=True)
class SearchConfig:
    suspect_s: float = 1.0  # longer than an election (0.2-0.4 s timer + one round trip)
    # Pause before asking again while nobody names a leader, growing to poll_max_s (many
    # clients may poll one election): a client sees a new leader at most this late.
    poll_s: float = 0.01
    poll_max_s: float = 0.02
    backoff_s: float = 0.02  # pause when every replica is suspect, doubled up to the max
    backoff_max_s: float = 0.3
    addresses_max: int = 64  # replicas remembered (those given, then those hints named)

    def __post_init__(self) -> None:
        if self.suspect_s < 0 or self.addresses_max < 1:
            raise ValueError("suspect_s must be >= 0 and addresses_max >= 1")
        Backoff(self.poll_s, 1.5, self.poll_max_s)  # ValueError if inconsistent
        Backoff(self.backoff_s, 2.0, self.backoff_max_s)


class LeaderSearch(Generic[A]):
    """What one client believes about its replicas' reachability (shared by its requests)."""

    def __init__(self, addresses: Sequence[A], config: SearchConfig | None = None) -> None:
        if not addresses:
            raise ValueError("no replica addresses")
        self.addresses: list[A] = list(addresses)
        self.config = config or SearchConfig()
        self._poll = Backoff(self.config.poll_s, 1.5, self.config.poll_max_s)
        self._backoff = Backoff(self.config.backoff_s, 2.0, self.config.backoff_max_s)
        self._failed_at: dict[A, float] = {}  # bounded: one entry per known address

    def add(self, address: A) -> None:
        """A replica the client was not told about (a redirect named it, e.g. one that
        joined the group): remembered, so that its death is suspected like any other's."""
        if address not in self.addresses and len(self.addresses) < self.config.addresses_max:
            self.addresses.append(address)

    def failed(self, address: A, now: float) -> None:
        """``address`` did not answer (connection closed, refused, timed out)."""
        self.add(address)
        if address in self.addresses:
            self._failed_at[address] = now

    def answered(self, address: A) -> None:
        """``address`` answered: it is alive, whatever it said."""
        self._failed_at.pop(address, None)

    def suspect(self, address: A, now: float) -> bool:
        failed = self._failed_at.get(address)
        return failed is not None and now - failed < self.config.suspect_s

    def usable(self, leader: A | None, now: float) -> bool:
        """Is ``leader`` (a replica's hint) worth going to? Not if none or suspect."""
        return leader is not None and not self.suspect(leader, now)

    def to_ask(self, now: float) -> list[A]:
        """The replicas to ask for the leader: those not suspect, or all if every one is."""
        alive = [a for a in self.addresses if not self.suspect(a, now)]
        return alive or list(self.addresses)

    def next_to_ask(self, after: A, asked: Collection[A], now: float) -> A | None:
        """The first replica to ask, in order after ``after``, not in ``asked``; None if
        every one worth asking was asked."""
        candidates = set(self.to_ask(now))
        start = self.addresses.index(after) + 1 if after in self.addresses else 0
        n = len(self.addresses)
        for i in range(n):
            address = self.addresses[(start + i) % n]
            if address in candidates and address not in asked:
                return address
        return None

    def pause_s(self, empty_rounds: int, now: float) -> float:
        """The pause after ``empty_rounds`` rounds in a row named no usable leader."""
        if all(self.suspect(a, now) for a in self.addresses):
            return self._backoff.next_delay(empty_rounds)
        return self._poll.next_delay(empty_rounds)


class Asking(Generic[A]):
    """One request's walk over the replicas while it knows no leader (sequential asking:
    the request itself is the question, and a follower answers it with its hint)."""

    def __init__(self, search: LeaderSearch[A]) -> None:
        self.search = search
        self.asked: set[A] = set()  # since the last pause; bounded by the replicas
        self.empty_rounds = 0

    def next(self, after: A, now: float) -> tuple[A, float]:
        """``after`` named no usable leader: the replica to ask next, and the pause before
        asking it (0 while some replica of this round was not asked yet)."""
        self.asked.add(after)
        nxt = self.search.next_to_ask(after, self.asked, now)
        if nxt is not None:
            return nxt, 0.0
        self.empty_rounds += 1
        self.asked.clear()
        pause = self.search.pause_s(self.empty_rounds, now)
        return self.search.next_to_ask(after, self.asked, now) or after, pause

    def found(self) -> None:
        """A leader was named: a later loss starts with a fast poll again."""
        self.asked.clear()
        self.empty_rounds = 0
