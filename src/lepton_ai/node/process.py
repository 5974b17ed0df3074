"""Process supervision shared by every lepton program.

A child must die with its parent, however the parent dies (exit, Ctrl-C,
SIGKILL), so nothing is ever left running. Two mechanisms, because each alone
has a hole:

* ``PR_SET_PDEATHSIG`` (Linux): the kernel sends SIGKILL when the parent dies.
  It is tied to the parent *thread* that forked, and there is a race between
  fork and the ``prctl`` call, closed by checking ``getppid()`` afterwards.
* a *lifeline* pipe: the parent keeps the write end (never inherited by anyone
  else) and the child watches the read end; EOF means the parent is gone. This
  works on every POSIX system and for parents that spawn from other threads.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable

PR_SET_PDEATHSIG = 1
PARENT_PID_ENV = "LEPTON_PARENT_PID"
LIFELINE_FD_ENV = "LEPTON_LIFELINE_FD"


def set_pdeathsig(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` when our parent dies; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _exit_now(code: int) -> None:
    os._exit(code)


def watch_parent(on_parent_death: Callable[[], None] | None = None) -> None:
    """Arm both mechanisms from the environment the parent gave us.

    ``on_parent_death`` runs in the watcher thread before the process exits (for
    example to kill our own children); it must be quick.
    """
    # Popped, not read: our own children must not inherit our parent's lifeline.
    expected = os.environ.pop(PARENT_PID_ENV, None)
    if expected is not None:
        set_pdeathsig()
        # The parent may have died between our fork and the prctl: then we have
        # already been re-parented and no signal will ever come.
        if os.getppid() != int(expected):
            if on_parent_death is not None:
                on_parent_death()
            _exit_now(1)
    fd_text = os.environ.pop(LIFELINE_FD_ENV, None)
    if fd_text is None:
        return
    fd = int(fd_text)

    def watch() -> None:
        with contextlib.suppress(OSError):
            while os.read(fd, 64):
                pass
        if on_parent_death is not None:
            on_parent_death()
        _exit_now(1)

    threading.Thread(target=watch, name="lifeline", daemon=True).start()


class Lifeline:
    """The parent's side: a pipe whose read end one child inherits."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_inheritable(self.read_fd, True)

    def child_env(self) -> dict[str, str]:
        env = {LIFELINE_FD_ENV: str(self.read_fd)}
        # PDEATHSIG fires when the *thread* that forked exits: only arm it when
        # spawning from the main thread, else a finished helper thread would
        # take the whole cluster down. The lifeline covers the other case.
        if threading.current_thread() is threading.main_thread():
            env[PARENT_PID_ENV] = str(os.getpid())
        return env

    def after_spawn(self) -> None:
        """Close the child's end in the parent so only the child holds it."""
        with contextlib.suppress(OSError):
            os.close(self.read_fd)

    def cut(self) -> None:
        """Close our end: the child sees EOF and exits."""
        with contextlib.suppress(OSError):
            os.close(self.write_fd)


PRIVATE_UMASK = 0o077


def private_files() -> None:
    """Everything this process creates from now on is its user's only: directories
    0700, files 0600 (logs, stored objects and shuffle files hold user data; state
    files hold the token). For the programs we start, never for a user's process."""
    os.umask(PRIVATE_UMASK)


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    # State is the field after the parenthesised command name.
    state = stat.rsplit(b")", 1)[1].split()[0]
    return state not in (b"Z", b"X")


def kill_pid(pid: int, sig: int = signal.SIGKILL) -> bool:
    """Send ``sig`` to ``pid``; False if it no longer exists."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True
