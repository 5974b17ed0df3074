"""``DriverConfig``: the settings of the asyncio replica driver (``driver.ReplicaDriver``).

Tick length, inbox and proposal queue bounds, how a busy leader paces its slots
(``driver_pacing``), the submit deadline, the first campaign of a new group, and the
peer transport.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lepton_ai.consensus.transport import TransportConfig


@dataclass(frozen=True)
class DriverConfig:
    tick_s: float = 0.02  # one core tick; election timeouts are a number of ticks
    ticks_per_pass_max: int = 4  # after a stall (SIGSTOP, GC) do not fire a burst of ticks
    inbox_max: int = 65_536  # peer messages waiting for the loop; beyond: dropped (Paxos resends)
    proposals_pending_max: int = 65_536  # commands proposed and not yet committed
    proposals_per_pass_max: int = 2048  # commands handed to the core per loop pass
    # While this many slots are uncommitted, a leader keeps new proposals in its queue:
    # they all go into the next slot once one commits. A busy leader otherwise seals a
    # slot per loop pass (~1.4 commands each under a task stream) and pays a round of
    # messages, WAL writes and follower passes for every one. The default leaves the
    # pipeline to the core (PaxosConfig.inflight_max); the coordinator uses 1.
    slots_in_flight_max: int = 1024
    # A leader opens a new slot at most once per this interval while it is busy: while
    # commands queued up behind the slot that committed last, or that slot carried at
    # least ``stream_batch_min`` commands. An idle leader's command goes at once, also
    # one that a commit's own apply proposes (a job's JobFinished after its last
    # TaskFinished): pacing it would add the interval to the critical path of every
    # stage for nothing. Bounds replication rounds per second (each costs every
    # follower a wake-up, a read, a WAL write and a reply), so a stream of commands
    # rides in fewer, larger slots. 0: no pacing.
    batch_interval_s: float = 0.0
    stream_batch_min: int = 4
    submit_timeout_s: float = 10.0  # LogHost.submit / read_barrier deadline
    # A brand-new group's lowest id campaigns once it reaches a quorum of peers, within
    # this long (then the ordinary election timeouts decide); polled at this interval.
    first_campaign_wait_s: float = 2.0
    first_campaign_poll_s: float = 0.005
    transport: TransportConfig = field(default_factory=TransportConfig)

    def __post_init__(self) -> None:
        if self.tick_s <= 0 or self.ticks_per_pass_max < 1 or self.inbox_max < 1:
            raise ValueError("tick_s, ticks_per_pass_max and inbox_max must be positive")
        if self.slots_in_flight_max < 1 or self.proposals_per_pass_max < 1:
            raise ValueError("slots_in_flight_max and proposals_per_pass_max must be >= 1")
        if self.stream_batch_min < 1:
            raise ValueError("stream_batch_min must be >= 1")
        if not 0.0 <= self.batch_interval_s < self.submit_timeout_s:
            raise ValueError("batch_interval_s must be >= 0 and below submit_timeout_s")
