"""Exceptions shared by every layer.

Expected failures are typed so a caller can tell its own misuse (ValueError,
TypeError) from a peer's misbehaviour (ProtocolError) and from the cluster being
unable to answer (Unavailable).
"""

from __future__ import annotations

from collections.abc import Sequence


class LeptonError(Exception):
    """Base class of every lepton_ai error."""


class InvariantError(AssertionError):
    """An invariant of a core broke: a bug, not a caller's misuse nor a peer's fault.

    Its state can no longer be trusted, so the process must stop (never catch it
    and carry on); the log survives and a restart rebuilds from it. ``history``
    holds what led there when the core keeps it (a task's last transitions),
    oldest first; the message includes it too. An AssertionError, so a check that
    raises it survives ``python -O`` and still reads as a failed assertion.
    """

    def __init__(self, message: str, *, history: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.history = tuple(history)


class Unavailable(LeptonError):
    """No quorum or no leader answered within the caller's deadline."""


class ProtocolError(LeptonError):
    """A peer sent something the protocol does not allow; its connection is closed."""


class AuthError(ProtocolError):
    """A peer failed the HMAC handshake (wrong token or wrong protocol version)."""


class TlsError(AuthError):
    """A TLS handshake failed: a certificate not from the cluster CA, none at all, or
    one side speaking TLS and the other not. The message names which."""


class FrameTooLarge(ProtocolError):
    """A frame's declared length exceeds the configured bound."""


class JobFailed(LeptonError):
    """A job ended without a result (retries exhausted, cancelled, or lost)."""


class JobCancelled(JobFailed):
    """The job was cancelled (``Job.cancel()``, ``lepton job cancel``) before it ended."""


class TaskError(JobFailed):
    """User code raised inside a task. Carries the partition and the remote traceback."""

    def __init__(self, message: str, *, stage: int, partition: int, traceback: str) -> None:
        super().__init__(f"{message} (stage {stage}, partition {partition})\n{traceback}")
        self.stage = stage
        self.partition = partition
        self.remote_traceback = traceback


class StorageFull(LeptonError):
    """No node (or too few distinct nodes) has room for an object; nothing was stored."""


class DataLost(LeptonError):
    """Every replica of a stored object is gone or corrupt."""


class LimitExceeded(LeptonError, ValueError):
    """A request is over a named limit (the message names it); nothing changed."""
