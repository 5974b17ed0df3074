"""The shell of the restart reconciler: a thread that watches member processes.

``Supervisor`` polls the processes it is given (``poll`` returns, per member,
whether its process runs and its exit code), feeds ``heal.restarts`` and starts
members again through ``start``. It runs inside ``LocalCluster`` (the user's
process) and inside ``lepton cluster up``'s detached supervisor
(``python -m lepton_ai.node.cluster_up``); on many hosts systemd does the same job
(``deploy/systemd/``).

Events ("member_restarted", "crash_loop", ...) go out on their own thread: the
sink may be the coordinators, which can be down at that very moment, and a
restart must never wait for them.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from lepton_ai.heal.restarts import (
    MemberRecord,
    Observed,
    ReportCrashLoop,
    ReportGone,
    RestartConfig,
    RestartReconciler,
    StartMember,
)
from lepton_ai.monitor.events import EventKind

log = logging.getLogger(__name__)

POLL_S = 0.05  # how often processes are checked: a death is seen within this
EVENTS_QUEUED_MAX = 256  # events waiting for their sink; older ones are dropped past this


class Supervisor:
    """Keeps the members ``poll`` reports running; thread-safe through ``lock``."""

    def __init__(
        self,
        poll: Callable[[], dict[str, Observed]],
        start: Callable[[str], int],
        on_event: Callable[[str, str, float], None],
        lock: threading.RLock,
        *,
        config: RestartConfig | None = None,
        on_gone: Callable[[str], None] | None = None,
    ) -> None:
        self.core = RestartReconciler(config)
        self._poll = poll
        self._start = start  # starts the member's process; returns its pid
        self._lock = lock  # held by the caller while it changes the processes too
        self._events: queue.Queue[tuple[str, str, float] | None] = queue.Queue(EVENTS_QUEUED_MAX)
        self._on_event = on_event
        self._on_gone = on_gone  # called (under the lock) for a member left down for good
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, name="lepton-supervisor", daemon=True),
            threading.Thread(target=self._send_events, name="lepton-events", daemon=True),
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        try:
            self._events.put_nowait(None)
        except queue.Full:
            pass
        for t in self._threads:
            if t.is_alive() and t is not threading.current_thread():
                t.join(5.0)

    def record(self, member: str) -> MemberRecord | None:
        with self._lock:
            return self.core.members.get(member)

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self.tick()
            except Exception:  # a supervisor must outlive any one bad tick
                log.exception("supervisor tick failed")

    def tick(self) -> None:
        with self._lock:
            if self._stop.is_set():
                return
            now = time.monotonic()
            for action in self.core.step(self._poll(), now):
                self._carry_out(action)

    def _carry_out(self, action: StartMember | ReportCrashLoop | ReportGone) -> None:
        if isinstance(action, StartMember):
            try:
                pid = self._start(action.member)
            except OSError as exc:
                self._emit(EventKind.RESTART_FAILED, f"{_name(action.member)}: {exc}")
                failed = self.core.start_failed(action.member, time.monotonic(), str(exc))
                if failed is not None:
                    self._carry_out(failed)
                return
            self._emit(
                EventKind.MEMBER_RESTARTED,
                f"{_name(action.member)} pid {pid} after {action.cause} "
                f"(restart {action.restarts}, waited {action.delay_s:.2f} s)",
            )
        elif isinstance(action, ReportCrashLoop):
            then = "retried at the back-off cap" if action.retrying else "left down"
            self._emit(
                EventKind.CRASH_LOOP,
                f"{_name(action.member)} died {action.deaths} times in a row "
                f"({action.cause}): {then}",
            )
        else:
            self._emit(
                EventKind.MEMBER_GONE, f"{_name(action.member)}: {action.cause}; not restarted"
            )
            if self._on_gone is not None:
                self._on_gone(action.member)

    def _emit(self, kind: str, detail: str) -> None:
        log.info("%s: %s", kind, detail)
        try:
            self._events.put_nowait((kind, detail, time.time()))
        except queue.Full:
            pass  # the sink is down for long: the log line above has it

    def _send_events(self) -> None:
        while True:
            item = self._events.get()
            if item is None:
                return
            try:
                self._on_event(*item)
            except Exception as exc:  # noqa: BLE001 - the sink (coordinators) may be down now
                log.debug("event %s not recorded: %s", item[0], exc)


def _name(member: str) -> str:
    role, _, id = member.partition("-")
    return f"{role} {id}"


def member_key(role: str, id: str) -> str:
    return f"{role}-{id}"
