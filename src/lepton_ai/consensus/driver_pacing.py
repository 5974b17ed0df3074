"""When a leading replica hands its queued proposals to the core: ``SlotPacer``.

A leader keeps new proposals queued while ``DriverConfig.slots_in_flight_max`` slots
are uncommitted (they all go into the next slot once one commits), and, while it is
busy, opens a new slot at most once per ``DriverConfig.batch_interval_s``, so a stream
of commands rides in fewer, larger slots. An idle leader's command goes at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from lepton_ai.consensus.core import Replica
from lepton_ai.consensus.driver_config import DriverConfig


class SlotPacer:
    """The driver's batching state: when proposals last went in, and whether it paces."""

    def __init__(
        self, config: DriverConfig, wake: Callable[[], None], clock: Callable[[], float]
    ) -> None:
        self._config = config
        self._clock = clock  # the driver's (monotonic seconds)
        self._wake = wake
        self.last_batch = 0.0  # monotonic time proposals last went into the core
        self._timer: asyncio.TimerHandle | None = None
        self.paced = False  # busy: pace new slots (see DriverConfig.batch_interval_s)
        self.last_batch_size = 0  # commands the leader's newest slot took
        self._seen_commit = 0

    def holding(self, core: Replica) -> bool:
        """True while proposals wait for a slot to commit or, while the leader is busy
        (``note_commit``), for the batch interval to pass (a leader only: a follower's
        queue is drained at once, every command failing with NotLeader). A commit
        arrives as a message and wakes the loop; the end of the interval is woken by a
        timer."""
        if not core.is_leader:
            return False
        if core.log.last - core.log.commit >= self._config.slots_in_flight_max:
            return True
        if not self.paced:
            return False
        wait_s = self.last_batch + self._config.batch_interval_s - self._clock()
        if wait_s <= 0:
            return False
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(wait_s, self._batch_due)
        return True

    def note_commit(self, commit: int, queued: bool) -> None:
        """On the first sight of a new commit point: were commands ``queued`` behind the
        slot that committed, or was that slot a large one? Then the leader is busy and
        paces its slots; if not, it is idle and the next command goes at once
        (DriverConfig.batch_interval_s). A momentarily empty queue in a stream of
        commands does not count as idle: the stream's slots are large."""
        if commit > self._seen_commit:
            self._seen_commit = commit
            self.paced = queued or self.last_batch_size >= self._config.stream_batch_min

    def take(self, queued: int, now: float) -> int:
        """Proposals go into the core at ``now``: how many of the ``queued`` this pass
        takes (bounded, so one burst cannot stall heartbeats and replies for long)."""
        self.last_batch = now
        self.last_batch_size = min(queued, self._config.proposals_per_pass_max)
        return self.last_batch_size

    def _batch_due(self) -> None:
        self._timer = None
        self._wake()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
