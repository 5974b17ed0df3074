"""A linearizability checker for KV histories (Wing & Gong search, Lowe's memoisation).

A history is a list of ``Operation``: what a client invoked, when (``call``), and,
if it got an answer, when (``ret``) and what (``output``). The history is
linearizable iff there is a total order of the operations that respects real time
(an operation that returned before another was called comes first) and in which
every operation's output is what a single-copy KV would give.

As in porcupine (Athalye), the search is

* **partitioned per key**: KV operations on different keys commute, so each key's
  sub-history is checked alone (exponentially cheaper than the whole);
* **memoised**: a (set of linearized operations, state) pair already explored is
  never explored again;
* **aware of unknown outcomes**: an operation whose client gave up (timeout, crash)
  may or may not have taken effect. It gets an infinite return time, so the search
  may place it anywhere after its call - including after every other operation,
  which is the same as never having taken effect. A read with unknown outcome
  observed nothing and is dropped.

The checker is pure (no I/O, no clock) and bounded by ``steps_max`` per key; if the
bound is hit the verdict is ``None`` (unknown), never a guess.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

KINDS = ("put", "get", "delete", "cas")


@dataclass(frozen=True)
class Operation:
    """One client operation on one key.

    ``value``: put's value or cas's new value. ``expected``: cas's expected value
    (None = key absent). ``output``: get's value (None = absent), cas's success
    flag; ignored for put/delete. ``ret=None`` means the outcome is unknown.
    """

    client: int
    kind: str
    key: str
    call: float
    ret: float | None
    value: Any = None
    expected: Any = None
    output: Any = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown operation kind {self.kind!r}; expected one of {KINDS}")
        if self.ret is not None and self.ret < self.call:
            raise ValueError(f"operation returns ({self.ret}) before it is called ({self.call})")


@dataclass(frozen=True)
class CheckResult:
    """``ok``: True (linearizable), False (not), None (search bound reached)."""

    ok: bool | None
    key: str | None = None
    reason: str = ""
    keys_checked: int = 0
    steps: int = 0


def _freeze(value: Any) -> Hashable:
    if isinstance(value, dict):
        return ("__dict__", tuple(sorted((k, _freeze(v)) for k, v in value.items())))
    if isinstance(value, list | tuple):
        return ("__seq__", tuple(_freeze(v) for v in value))
    return value  # type: ignore[no-any-return]


def _step(state: Hashable, op: Operation) -> tuple[bool, Hashable]:
    """The sequential KV model for one key: state is its frozen value (None = absent)."""
    if op.kind == "put":
        return True, _freeze(op.value)
    if op.kind == "delete":
        return True, None
    if op.kind == "get":
        return state == _freeze(op.output), state
    matches = state == _freeze(op.expected)
    if op.ret is None:  # unknown outcome: whichever branch the state allows
        return True, (_freeze(op.value) if matches else state)
    if bool(op.output) != matches:
        return False, state
    return True, (_freeze(op.value) if matches else state)


@dataclass
class _Node:
    op_id: int
    is_call: bool
    time: float
    prev: _Node | None = None
    next: _Node | None = None
    match: _Node | None = field(default=None, repr=False)


def _build_list(ops: list[Operation]) -> _Node:
    events: list[tuple[float, int, int]] = []
    for i, op in enumerate(ops):
        events.append((op.call, 0, i))
        events.append((math.inf if op.ret is None else op.ret, 1, i))
    # Calls sort before returns at equal times: touching operations count as
    # concurrent, the permissive reading when clocks have finite resolution.
    events.sort()
    head = _Node(-1, False, -math.inf)
    calls: dict[int, _Node] = {}
    tail = head
    for time, kind, i in events:
        node = _Node(i, kind == 0, time, prev=tail)
        tail.next = node
        tail = node
        if kind == 0:
            calls[i] = node
        else:
            calls[i].match = node
    return head


def _lift(call: _Node) -> None:
    for node in (call, call.match):
        if node is None or node.prev is None:
            raise AssertionError("linked-list invariant broken while lifting")
        node.prev.next = node.next
        if node.next is not None:
            node.next.prev = node.prev


def _unlift(call: _Node) -> None:
    for node in (call.match, call):
        if node is None or node.prev is None:
            raise AssertionError("linked-list invariant broken while unlifting")
        node.prev.next = node
        if node.next is not None:
            node.next.prev = node


def check_key(
    ops: list[Operation], initial: Any = None, steps_max: int = 2_000_000
) -> tuple[bool | None, int]:
    """Check one key's sub-history. Returns (verdict, steps explored)."""
    head = _build_list(ops)
    state: Hashable = _freeze(initial)
    linearized = 0
    seen: set[tuple[int, Hashable]] = set()
    stack: list[tuple[_Node, Hashable]] = []
    entry = head.next
    steps = 0
    while head.next is not None:
        steps += 1
        if steps > steps_max:
            return None, steps
        if entry is None:
            raise AssertionError("ran off the event list without a return event")
        if entry.is_call:
            ok, new_state = _step(state, ops[entry.op_id])
            if ok:
                new_linearized = linearized | (1 << entry.op_id)
                if (new_linearized, new_state) not in seen:
                    seen.add((new_linearized, new_state))
                    stack.append((entry, state))
                    state, linearized = new_state, new_linearized
                    _lift(entry)
                    entry = head.next
                    continue
            entry = entry.next
        else:
            # A return whose call is still pending: something before it must be undone.
            if not stack:
                return False, steps
            entry, state = stack.pop()
            linearized &= ~(1 << entry.op_id)
            _unlift(entry)
            entry = entry.next
    return True, steps


def check_history(
    history: Iterable[Operation], initial: dict[str, Any] | None = None, steps_max: int = 2_000_000
) -> CheckResult:
    """Check a whole KV history, key by key; stops at the first key that fails."""
    by_key: dict[str, list[Operation]] = {}
    for op in history:
        if op.kind == "get" and op.ret is None:
            continue  # an unanswered read constrains nothing
        by_key.setdefault(op.key, []).append(op)
    initial = initial or {}
    total = 0
    unknown: str | None = None
    for n, (key, ops) in enumerate(sorted(by_key.items()), start=1):
        verdict, steps = check_key(ops, initial.get(key), steps_max)
        total += steps
        if verdict is False:
            return CheckResult(
                False, key, f"key {key!r}: no linearization of {len(ops)} operations", n, total
            )
        if verdict is None and unknown is None:
            unknown = key
    if unknown is not None:
        return CheckResult(
            None, unknown, f"key {unknown!r}: search bound reached", len(by_key), total
        )
    return CheckResult(True, None, "linearizable", len(by_key), total)
