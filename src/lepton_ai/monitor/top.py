"""``lepton top``: the dashboard's overview in the terminal (``rich``).

One frame is members, jobs, deployments and the latest events, drawn from the
same ``DashboardSource.snapshot()`` the web dashboard shows.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from lepton_ai.monitor.dashboard_source import DashboardSource
from lepton_ai.monitor.events import phase_of
from lepton_ai.monitor.timeline import clock

TOP_JOBS_MAX = 8  # jobs in one frame
TOP_EVENTS_MAX = 12  # events in one frame
TOP_INTERVAL_S_MIN = 0.2  # the fastest refresh allowed (each one asks the cluster)
_GOOD = {"leader", "follower", "alive", "idle", "ready", "finished"}
_BAD = {"dead", "down", "crashloop", "gone", "failed", "suspect"}
_PHASE_STYLES = {"fault": "red", "detection": "yellow", "healing": "green"}


def _style(state: str) -> str:
    if state in _GOOD:
        return "green"
    return "red" if state in _BAD else "yellow"


def _members(snap: dict[str, Any]) -> Table:
    table = Table(title="members", title_justify="left", expand=False)
    for col in ("role", "id", "node", "pid", "address", "health", "restarts"):
        table.add_column(col)
    for m in snap["members"]:
        table.add_row(
            m["role"],
            m["id"],
            m["node"],
            str(m["pid"] or ""),
            m["address"],
            Text(m["health"], style=_style(m["health"])),
            str(m["restarts"]),
        )
    return table


def _jobs(snap: dict[str, Any]) -> Table:
    table = Table(title="jobs", title_justify="left")
    for col in ("job", "name", "status", "progress", "duration"):
        table.add_column(col)
    for j in snap["jobs"][:TOP_JOBS_MAX]:
        duration = "" if j["duration_s"] is None else f"{j['duration_s']:.2f} s"
        table.add_row(
            j["job_id"],
            j["name"],
            Text(j["status"], style=_style(j["status"])),
            f"{j['done']}/{j['total']} ({j['percent']:.0f}%)",
            duration,
        )
    return table


def _deployments(snap: dict[str, Any]) -> Table:
    table = Table(title="deployments", title_justify="left")
    for col in ("name", "version", "ready", "urls"):
        table.add_column(col)
    for d in snap["deployments"]:
        ready = Text(
            f"{d['ready']}/{d['replicas']}",
            style=_style("ready" if d["ready"] >= d["replicas"] else "starting"),
        )
        table.add_row(d["name"], f"v{d['version']}", ready, " ".join(d["urls"]))
    return table


def _events(snap: dict[str, Any]) -> Table:
    table = Table(title="recent events", title_justify="left")
    for col in ("time", "kind", "detail"):
        table.add_column(col)
    for e in snap["events"][-TOP_EVENTS_MAX:]:
        style = _PHASE_STYLES.get(e.get("phase") or phase_of(e["kind"]), "")
        job = f" [{e['job_id']}]" if e.get("job_id") else ""
        table.add_row(clock(float(e["t"])), Text(e["kind"], style=style), f"{e['detail']}{job}")
    return table


def render(snap: dict[str, Any]) -> RenderableType:
    """One frame of ``lepton top``."""
    head = Text(f"lepton_ai {snap['address']}  leader {snap['leader'] or 'none'}  ", style="bold")
    head.append(clock(float(snap["fetched_at"])), style="dim")
    parts: list[RenderableType] = [head]
    parts += [Text(f"{k}: {v}", style="red") for k, v in snap["errors"].items()]
    parts += [_members(snap), _jobs(snap), _deployments(snap), _events(snap)]
    return Group(*parts)


def run_top(
    source: DashboardSource,
    *,
    once: bool = False,
    interval_s: float = 1.0,
    console: Console | None = None,
    frames_max: int | None = None,
) -> None:
    """Draw frames until Ctrl-C (or ``frames_max``); ``once``: print one and return."""
    console = console or Console()
    try:
        if once:
            console.print(render(source.snapshot()))
            return
        interval_s = max(interval_s, TOP_INTERVAL_S_MIN)
        frames = 0
        with Live(render(source.snapshot()), console=console, auto_refresh=False) as live:
            while frames_max is None or frames < frames_max:
                time.sleep(interval_s)
                live.update(render(source.snapshot()), refresh=True)
                frames += 1
    finally:
        source.close()
