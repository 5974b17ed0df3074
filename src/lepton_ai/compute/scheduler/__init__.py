"""The sans-I/O scheduler core (``core.Scheduler``); see ``core`` for what it does.

Modules: ``core`` (the Scheduler, event dispatch, reports and applied commands),
``task_state`` (a task's states and transition table), ``base`` (soft state and
shared steps), ``placement`` (workers, slots, locality, stealing),
``speculation`` (stragglers, backups, timeouts) and ``recovery`` (lost workers
and outputs, fetch failures, rebuilding after a leader change). This package was
the module ``compute/scheduler.py``: ``from lepton_ai.compute.scheduler import
Scheduler, SchedulerConfig`` works as it did.
"""

from lepton_ai.compute.scheduler.core import Scheduler
from lepton_ai.compute.scheduler.task_state import TRANSITIONS, TaskEvent, TaskState
from lepton_ai.compute.scheduler_events import (
    SchedulerAction,
    SchedulerConfig,
    SchedulerEvent,
)

__all__ = [
    "TRANSITIONS",
    "Scheduler",
    "SchedulerAction",
    "SchedulerConfig",
    "SchedulerEvent",
    "TaskEvent",
    "TaskState",
]
