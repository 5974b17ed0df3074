"""The seed's consensus cost model, T' = p + d + m·u + e, as a replica measures it.

* **p** (propose): a command's wait at the leader from its arrival to its slot's
  Accept leaving (batching: commands arriving while a slot is in flight wait for
  the next one);
* **d** (decide): from the Accept leaving to the slot known chosen (a quorum's
  fdatasyncs and acknowledgements);
* **u** (update): applying one command to a replica's state machine;
* **e** (election): from this replica knowing no leader to knowing one again.

Plain bucket arrays (``monitor.metrics.Histo``): the driver's hot path only adds to
them; ``/metrics`` exposes them as ``lepton_paxos_{propose,decide,apply,election}
_seconds`` and ``lepton estimate consensus`` reads their means.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from lepton_ai.monitor.metrics import CONSENSUS_BUCKETS_S, Histo

ELECTION_BUCKETS_S = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0)
SLOTS_TRACKED_MAX = 4096  # slots in flight whose Accept time is kept (more are not timed)


class ConsensusTimings:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock  # the driver's (monotonic seconds)
        self.propose = Histo(CONSENSUS_BUCKETS_S)
        self.decide = Histo(CONSENSUS_BUCKETS_S)
        self.apply = Histo(CONSENSUS_BUCKETS_S)
        self.election = Histo(ELECTION_BUCKETS_S)
        # Arrival times, in step with the driver's proposal queue (appended and
        # popped together: the driver pops only in ``_take_proposals``).
        self._queued: deque[float] = deque()
        self._sent: dict[int, float] = {}  # slot -> when its Accept left
        self._leaderless_since: float | None = self._clock()  # at start: none known

    def queued(self) -> None:
        self._queued.append(self._clock())

    def proposing(self, count: int, now: float) -> None:
        for _ in range(min(count, len(self._queued))):
            self.propose.observe(now - self._queued.popleft())

    def sent(self, slot: int, now: float) -> None:
        if len(self._sent) < SLOTS_TRACKED_MAX:
            self._sent.setdefault(slot, now)

    def committed(self, slot: int) -> None:
        started = self._sent.pop(slot, None)
        if started is not None:
            self.decide.observe(self._clock() - started)

    def applied(self, commands: int, seconds: float) -> None:
        if commands:
            self.apply.observe(seconds / commands)

    def leader_changed(self, known: bool, leading: bool) -> None:
        now = self._clock()
        if not leading:
            self._sent.clear()  # this term's slots are no longer this replica's to time
        if not known:
            if self._leaderless_since is None:
                self._leaderless_since = now
        elif self._leaderless_since is not None:
            self.election.observe(now - self._leaderless_since)
            self._leaderless_since = None
