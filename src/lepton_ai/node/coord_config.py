"""The coordinator's settings: one bound or interval per field (DESIGN.md section 4.4)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lepton_ai.compute.scheduler_events import SchedulerConfig
from lepton_ai.monitor.phi import PhiConfig
from lepton_ai.node.control import ControlConfig
from lepton_ai.node.coord_serve import ServeControlConfig
from lepton_ai.node.coord_storage import StorageControlConfig
from lepton_ai.node.node_net import node_wire_config
from lepton_ai.wire import WireConfig


@dataclass(frozen=True)
class CoordinatorConfig:
    tick_interval_s: float = 0.1
    heartbeat_interval_s: float = 0.1
    events_max: int = 10_000
    inflight_proposals_max: int = 10_000
    lost_workers_max: int = 10_000  # ids remembered so a lost incarnation cannot rejoin
    wait_timeout_max_s: float = 60.0
    fsync: bool = True
    # Retention: finished/failed jobs kept for their result (oldest evicted first);
    # part of the replicated state machine, so every replica must use the same value.
    finished_jobs_max: int = 256
    job_retention_s: float = 0.0  # finished jobs older than this are deleted (0: kept)
    expiry_interval_s: float = 1.0
    expiries_per_round_max: int = 1000
    alert_webhook: str = ""  # alerts raised and cleared are POSTed here ("" : none)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    storage: StorageControlConfig = field(default_factory=StorageControlConfig)
    serve: ServeControlConfig = field(default_factory=ServeControlConfig)
    phi: PhiConfig = field(default_factory=PhiConfig)
    wire: WireConfig = field(default_factory=node_wire_config)

    def control(self) -> ControlConfig:
        """The control core's share of the settings."""
        return ControlConfig(
            lost_workers_max=self.lost_workers_max,
            job_retention_s=self.job_retention_s,
            expiry_interval_s=self.expiry_interval_s,
            expiries_per_round_max=self.expiries_per_round_max,
            phi=self.phi,
        )
