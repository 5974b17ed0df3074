"""Process restarts: a pure reconciler that keeps every member process running.

Desired state: each registered member (a coordinator or a worker agent) runs.
Observed state: for each member, whether its process runs and, if it ended, how.
The shell (``node/supervise.py``) polls the processes, feeds ``step`` and carries
out the actions; the same core runs inside ``LocalCluster`` and under
``lepton cluster up``'s supervisor process.

Rules (Kubernetes' ``restartPolicy: Always`` with CrashLoopBackOff):

* The first restart after a member ran stably is immediate; each further quick
  death doubles the wait (``Backoff``), capped.
* A member that ran ``stable_after_s`` resets its count of quick deaths.
* After ``crash_loop_max`` quick deaths in a row the member is reported as
  crash-looping, once per loop. What happens next depends on who ended it:

  - it failed by itself (an exit code, SIGSEGV, SIGABRT): restarting cannot fix a
    program that cannot start (a bad flag, a broken disk), so it is left down
    until ``reset`` (an operator's restart);
  - it was killed from outside (SIGKILL, SIGTERM, SIGINT, SIGHUP: a chaos tool,
    the OOM killer, an operator): the program is fine, so it keeps being
    restarted, at the capped back-off (Kubernetes' CrashLoopBackOff), and the
    loop ends once it runs ``stable_after_s``.
* A member that exits with ``EXIT_REMOVED`` (it was removed from the
  coordinator group) or with 0 after being asked to stop is not restarted.
* A paused (SIGSTOPped) process is alive: the failure detector of the
  coordinators handles hangs, not this core.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lepton_ai.heal.backoff import Backoff
from lepton_ai.heal.membership import EXIT_REMOVED

# A coordinator removed from the Paxos group exits with EXIT_REMOVED: restarting
# it would only have it refused again.
MEMBERS_MAX = 1_024  # a supervisor watches at most this many processes


@dataclass(frozen=True)
class Observed:
    """One member as the shell saw it: running, or ended with ``exit_code``
    (negative: killed by that signal, as ``subprocess`` reports it)."""

    running: bool
    exit_code: int | None = None


@dataclass(frozen=True)
class StartMember:
    """Start (again) the process of ``member``; ``restarts`` counts this one."""

    member: str
    restarts: int
    delay_s: float  # how long it waited after the death (for the event log)
    cause: str  # the previous exit, described


@dataclass(frozen=True)
class ReportCrashLoop:
    member: str
    deaths: int
    cause: str
    retrying: bool  # killed from outside: retried at the capped back-off; else left down


@dataclass(frozen=True)
class ReportGone:
    """The member ended on purpose (removed from the group, or stopped): not restarted."""

    member: str
    cause: str


RestartAction = StartMember | ReportCrashLoop | ReportGone


@dataclass
class MemberRecord:
    """What the core knows of one member, shown by ``status()``."""

    restarts: int = 0
    quick_deaths: int = 0  # consecutive deaths within stable_after_s of their start
    started_at: float = 0.0
    died_at: float | None = None  # set while it is down and waiting for its restart
    last_exit: str = ""
    state: str = "running"  # running | waiting | crashloop | gone
    looping: bool = False  # reported as crash-looping; cleared once it runs stably

    @property
    def verdict(self) -> str:
        """What status shows for the member instead of its process's health, or ""
        (it runs, or waits for an ordinary restart): "crashloop" while it is down
        in a crash loop, "gone" once it ended for good."""
        if self.state in {"gone", "crashloop"}:
            return self.state
        return "crashloop" if self.looping and self.state == "waiting" else ""


@dataclass
class RestartConfig:
    backoff: Backoff = field(default_factory=lambda: Backoff(initial_s=0.5, max_s=30.0))
    stable_after_s: float = 30.0
    crash_loop_max: int = 6

    def __post_init__(self) -> None:
        if self.stable_after_s <= 0 or self.crash_loop_max < 1:
            raise ValueError(f"bad restart config {self}")


def describe_exit(code: int | None) -> str:
    """``-9`` -> ``killed by SIGKILL``; ``1`` -> ``exit 1``."""
    if code is None:
        return "running"
    if code < 0:
        return f"killed by {_signal_name(-code)}"
    if code == EXIT_REMOVED:
        return f"exit {code} (removed from the coordinator group)"
    return f"exit {code}"


# Signals another process sends: the program did not fail by itself.
_EXTERNAL_SIGNALS = frozenset({1, 2, 9, 15})


def killed_from_outside(code: int | None) -> bool:
    """Did the member end by a signal another process sent (not by its own failure)?"""
    return code is not None and -code in _EXTERNAL_SIGNALS


def _signal_name(number: int) -> str:
    # No ``signal`` module here (the purity rule bans os-level imports): the
    # signals a process supervisor meets, by their Linux numbers.
    names = {1: "SIGHUP", 2: "SIGINT", 6: "SIGABRT", 9: "SIGKILL", 11: "SIGSEGV", 15: "SIGTERM"}
    return names.get(number, f"signal {number}")


class RestartReconciler:
    """Decides which member processes to start again, and when."""

    def __init__(self, config: RestartConfig | None = None) -> None:
        self.config = config or RestartConfig()
        self.members: dict[str, MemberRecord] = {}

    def add(self, member: str, now: float) -> None:
        """A member the caller has just started."""
        if member not in self.members and len(self.members) >= MEMBERS_MAX:
            raise ValueError(f"at most {MEMBERS_MAX} members per supervisor")
        self.members[member] = MemberRecord(started_at=now)

    def remove(self, member: str) -> None:
        """Stop watching ``member`` (the cluster is shutting it down on purpose)."""
        self.members.pop(member, None)

    def reset(self, member: str, now: float) -> None:
        """The caller (re)started ``member`` itself (an operator's restart): a fresh
        record keeps its restart count but forgets crash loops and waits."""
        old = self.members.get(member)
        self.members[member] = MemberRecord(
            restarts=old.restarts if old else 0, last_exit=old.last_exit if old else ""
        )
        self.members[member].started_at = now

    def step(self, observed: dict[str, Observed], now: float) -> list[RestartAction]:
        actions: list[RestartAction] = []
        for member, rec in self.members.items():
            seen = observed.get(member)
            if seen is None or rec.state in ("crashloop", "gone"):
                continue
            if rec.state == "running" and not seen.running:
                action = self._died(member, rec, seen.exit_code, now)
                if action is not None:
                    actions.append(action)
            if rec.state == "waiting" and self._due(rec, now):
                actions.append(self._restart(member, rec, now))
        return actions

    def start_failed(self, member: str, now: float, why: str) -> RestartAction | None:
        """The shell could not start ``member`` (e.g. its port is still taken):
        a quick death like any other, retried after the back-off."""
        rec = self.members.get(member)
        if rec is None:
            return None
        rec.started_at = now
        return self._died(member, rec, None, now, f"start failed: {why}")

    def _died(
        self, member: str, rec: MemberRecord, code: int | None, now: float, why: str = ""
    ) -> RestartAction | None:
        rec.last_exit = why or describe_exit(code)
        if code == EXIT_REMOVED:
            rec.state = "gone"
            return ReportGone(member, rec.last_exit)
        if now - rec.started_at >= self.config.stable_after_s:
            rec.quick_deaths, rec.looping = 0, False
        rec.quick_deaths += 1
        rec.died_at = now
        rec.state = "waiting"
        if rec.quick_deaths <= self.config.crash_loop_max:
            return None
        retrying = killed_from_outside(code)
        if not retrying:
            rec.state = "crashloop"
        if rec.looping and retrying:
            return None  # reported when the loop began
        rec.looping = True
        return ReportCrashLoop(member, rec.quick_deaths, rec.last_exit, retrying)

    def _delay(self, rec: MemberRecord) -> float:
        # The first quick death restarts at once; each further one waits longer.
        return self.config.backoff.next_delay(rec.quick_deaths - 1)

    def _due(self, rec: MemberRecord, now: float) -> bool:
        return rec.died_at is not None and now >= rec.died_at + self._delay(rec)

    def _restart(self, member: str, rec: MemberRecord, now: float) -> StartMember:
        delay = now - (rec.died_at if rec.died_at is not None else now)
        rec.restarts += 1
        rec.state = "running"
        rec.started_at = now
        rec.died_at = None
        return StartMember(member, rec.restarts, delay, rec.last_exit)

    def next_due(self, now: float) -> float | None:
        """When the earliest waiting restart falls due (for the shell's sleep)."""
        due = [
            rec.died_at + self._delay(rec)
            for rec in self.members.values()
            if rec.state == "waiting" and rec.died_at is not None
        ]
        return min(due) if due else None
