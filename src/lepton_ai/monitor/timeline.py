"""One way to print a timeline event, for every command that prints them."""

from __future__ import annotations

import time
from typing import Any


def format_event(e: dict[str, Any]) -> str:
    """``14:03:07.412 worker_lost        1 (1-4242-ab12): connection closed [j1234]``:
    local clock time to the millisecond, the kind, the detail, the job if any."""
    job = f" [{e['job_id']}]" if e.get("job_id") else ""
    return f"{clock(float(e['t']))} {e['kind']:<18} {e['detail']}{job}"


def clock(t: float) -> str:
    """Wall-clock seconds as local ``HH:MM:SS.mmm``."""
    return f"{time.strftime('%H:%M:%S', time.localtime(t))}.{int(t % 1 * 1000):03d}"
