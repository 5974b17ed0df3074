"""The replicated KV state machine: put, get, delete, cas with exactly-once client sessions.

Commands and results are msgspec structs encoded as MessagePack bytes, because the
log carries opaque bytes (``StateMachine.apply(bytes) -> bytes``).

Sessions (Raft dissertation, section 6.3): a client first commits ``OpenSession``
and receives a session id chosen by the log itself (so every replica agrees on
it). Each later command carries ``(session, seq, ack_below)``: ``seq`` numbers the
client's commands, ``ack_below`` says "I have seen the results of all my commands
below this number". A command whose ``seq`` was already applied is not applied
again - its first result is returned from the session's cache - which is what
makes a client's retry after a timeout safe. Results below ``ack_below`` are
dropped, so pipelined clients keep only their in-flight window cached.

The session table is bounded (``KvConfig.sessions_max``): the least recently used
session is evicted, measured in applied commands (never wall time: every replica
must evict the same session at the same point). A command on an evicted or
unknown session gets ``error="session_expired"`` and changes nothing; the client
opens a new session and only retries commands it knows did not take effect.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import msgspec

from lepton_ai.errors import LeptonError


class Put(msgspec.Struct, tag="put", frozen=True):
    key: str
    value: Any


class Get(msgspec.Struct, tag="get", frozen=True):
    key: str


class Delete(msgspec.Struct, tag="delete", frozen=True):
    key: str


class Cas(msgspec.Struct, tag="cas", frozen=True):
    """Set ``key`` to ``new`` iff its value equals ``expected`` (None means "absent")."""

    key: str
    expected: Any
    new: Any


Op = Put | Get | Delete | Cas


class OpenSession(msgspec.Struct, tag="open", frozen=True):
    pass


class Request(msgspec.Struct, tag="req", frozen=True):
    session: int
    seq: int
    ack_below: int
    op: Op


class Noop(msgspec.Struct, tag="noop", frozen=True):
    """A command that changes nothing (used to commit a leader's first slot or probe the log)."""


Command = OpenSession | Request | Noop


class KvResult(msgspec.Struct, frozen=True, omit_defaults=True):
    """Outcome of one command.

    ``ok``: put/delete always, cas iff it swapped. ``found``/``value``: the key's value
    before the command (get: its value). ``error``: set when nothing was applied.
    """

    ok: bool = True
    found: bool = False
    value: Any = None
    session: int = 0
    error: str | None = None


_command_encoder = msgspec.msgpack.Encoder()
_command_decoder: msgspec.msgpack.Decoder[Command] = msgspec.msgpack.Decoder(Command)
_result_decoder: msgspec.msgpack.Decoder[KvResult] = msgspec.msgpack.Decoder(KvResult)


def encode_command(command: Command) -> bytes:
    return _command_encoder.encode(command)


def decode_command(data: bytes) -> Command:
    return _command_decoder.decode(data)


def encode_result(result: KvResult) -> bytes:
    return _command_encoder.encode(result)


def decode_result(data: bytes) -> KvResult:
    return _result_decoder.decode(data)


class KvError(LeptonError):
    """The KV machine refused a command (``session_expired``, ``stale``, ``too_large``)."""


@dataclass(frozen=True)
class KvConfig:
    sessions_max: int = 10_000
    results_per_session_max: int = 10_000
    key_bytes_max: int = 1024
    value_bytes_max: int = 1024 * 1024

    def __post_init__(self) -> None:
        for name in ("sessions_max", "results_per_session_max", "key_bytes_max"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")


class _Session(msgspec.Struct):
    ack_below: int = 0
    results: dict[int, bytes] = msgspec.field(default_factory=dict)


class _Snapshot(msgspec.Struct):
    data: dict[str, Any]
    sessions: list[tuple[int, _Session]]  # LRU order, least recent first
    next_session: int
    applied: int


class KvMachine:
    """Deterministic KV state machine; implements ``lepton_ai.consensus.log_host.StateMachine``."""

    def __init__(self, config: KvConfig | None = None) -> None:
        self.config = config or KvConfig()
        self._data: dict[str, Any] = {}
        self._sessions: OrderedDict[int, _Session] = OrderedDict()
        self._next_session = 1
        self.applied = 0
        self.evictions = 0

    # -- StateMachine ----------------------------------------------------
    def apply(self, command: bytes) -> bytes:
        self.applied += 1
        try:
            decoded = decode_command(command)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            # A committed command must never stop the replica; every replica
            # rejects it identically, so state stays consistent.
            return encode_result(KvResult(ok=False, error=f"bad command: {exc}"))
        if isinstance(decoded, Noop):
            return encode_result(KvResult())
        if isinstance(decoded, OpenSession):
            return encode_result(self._open_session())
        return self._apply_request(decoded)

    def snapshot(self) -> bytes:
        snap = _Snapshot(
            data=self._data,
            sessions=list(self._sessions.items()),
            next_session=self._next_session,
            applied=self.applied,
        )
        return msgspec.msgpack.encode(snap)

    def restore(self, data: bytes) -> None:
        snap = msgspec.msgpack.decode(data, type=_Snapshot)
        self._data = dict(snap.data)
        self._sessions = OrderedDict(snap.sessions)
        self._next_session = snap.next_session
        self.applied = snap.applied

    # -- local reads (after a read barrier they are linearizable) ----------
    def read(self, op: Get) -> KvResult:
        if op.key in self._data:
            return KvResult(found=True, value=self._data[op.key])
        return KvResult(found=False)

    def __len__(self) -> int:
        return len(self._data)

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    # -- internals ------------------------------------------------------------
    def _open_session(self) -> KvResult:
        sid = self._next_session
        self._next_session += 1
        self._sessions[sid] = _Session()
        while len(self._sessions) > self.config.sessions_max:
            self._sessions.popitem(last=False)
            self.evictions += 1
        return KvResult(session=sid)

    def _apply_request(self, req: Request) -> bytes:
        session = self._sessions.get(req.session)
        if session is None:
            return encode_result(KvResult(ok=False, error="session_expired"))
        self._sessions.move_to_end(req.session)
        if req.ack_below > session.ack_below:
            session.ack_below = req.ack_below
            _drop_acknowledged(session.results, req.ack_below, full=False)
        cached = session.results.get(req.seq)
        if cached is not None:
            return cached
        if req.seq < session.ack_below:
            # The client already saw this result and moved on; nobody waits for it.
            return encode_result(KvResult(ok=False, error="stale"))
        if len(session.results) >= self.config.results_per_session_max:
            _drop_acknowledged(session.results, session.ack_below, full=True)
        if len(session.results) >= self.config.results_per_session_max:
            return encode_result(KvResult(ok=False, error="too_many_in_flight"))
        result = encode_result(self._apply_op(req.op))
        session.results[req.seq] = result
        return result

    def _apply_op(self, op: Op) -> KvResult:
        if not op.key:
            return KvResult(ok=False, error="invalid: empty key")
        try:
            key_bytes = len(op.key.encode())
        except UnicodeEncodeError:  # a lone surrogate from a hostile client: never stored
            return KvResult(ok=False, error="invalid: key is not valid Unicode")
        if key_bytes > self.config.key_bytes_max:
            return KvResult(ok=False, error="too_large: key")
        found = op.key in self._data
        before = self._data.get(op.key)
        if isinstance(op, Get):
            return KvResult(found=found, value=before)
        if isinstance(op, Put):
            if op.value is None:
                # None means "absent" in cas; storing it would make the two indistinguishable.
                return KvResult(ok=False, found=found, value=before, error="none_value")
            if len(_command_encoder.encode(op.value)) > self.config.value_bytes_max:
                return KvResult(ok=False, error="too_large: value")
            self._data[op.key] = op.value
            return KvResult(found=found, value=before)
        if isinstance(op, Delete):
            self._data.pop(op.key, None)
            return KvResult(found=found, value=before)
        swapped = (not found and op.expected is None) or (found and before == op.expected)
        if swapped:
            if len(_command_encoder.encode(op.new)) > self.config.value_bytes_max:
                return KvResult(ok=False, found=found, value=before, error="too_large: value")
            if op.new is None:
                self._data.pop(op.key, None)
            else:
                self._data[op.key] = op.new
        return KvResult(ok=swapped, found=found, value=before)


def _drop_acknowledged(results: dict[int, bytes], ack_below: int, *, full: bool) -> None:
    """Forget results the client has seen. Results are inserted in (nearly) increasing
    sequence order, so popping from the front is O(dropped); ``full`` also sweeps
    stragglers that a retry inserted out of order (only when the cache is full)."""
    while results:
        first = next(iter(results))
        if first >= ack_below:
            break
        del results[first]
    if full:
        for seq in [s for s in results if s < ack_below]:
            del results[seq]
