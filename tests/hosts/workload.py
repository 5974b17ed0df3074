"""Jepsen-style workloads for the bed: KV clients recording a history, jobs with known
answers, and the record (history + fault schedule) written as JSON for a failing run.

    run = Run("leader_isolated")
    with KvLoad(run, cluster.paxos_addresses, token, clients=3):
        run.fault("isolate", host=1); ...; run.fault("heal")
    final_reads(run, ...); check_linearizable(run, min_acked=20)
    path = run.dump(tmp_path)       # {"history": [...], "faults": [...], "notes": {...}}

Every KV operation is recorded with its call and return times (seconds since the run
began, from this process's monotonic clock); one that raised (timeout, Unavailable)
has ``ret`` None: its outcome is unknown, and the checker may place it anywhere after
its call or nowhere. Values are unique, so a stale or lost write shows.
"""

from __future__ import annotations

import collections
import itertools
import json
import operator
import random
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cloudpickle

from lepton_ai.compute.api import DistributedTask
from lepton_ai.consensus.client import KvClientConfig
from lepton_ai.consensus.client_sync import KV
from lepton_ai.errors import LeptonError
from lepton_ai.sim.linearizability import Operation, check_history

# The job functions below run in the executors, which cannot import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

KEYS = ("x", "y", "z")
OP_DEADLINE_S = 3.0  # one KV call, retries included: a partition yields unknowns, not hangs
OP_ATTEMPT_S = 1.0
FINAL_READ_DEADLINE_S = 20.0
THINK_S = 0.01  # between two operations of one client (2 cores: do not saturate them)
_values = itertools.count(1)


@dataclass
class Run:
    """One scenario's record: its KV history, its faults, and free-form notes."""

    name: str
    t0: float = field(default_factory=time.monotonic)
    history: list[Operation] = field(default_factory=list)
    faults: list[dict[str, Any]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def keys(self) -> tuple[str, ...]:
        """This run's keys: the bed's cluster outlives a test, and the checker assumes
        every key starts absent."""
        return tuple(f"{self.name}/{k}" for k in KEYS)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def add(self, op: Operation) -> None:
        with self._lock:
            self.history.append(op)

    def fault(self, kind: str, **detail: Any) -> float:
        """Record a fault (or heal) at this moment; its time."""
        t = self.now()
        with self._lock:
            self.faults.append({"t": round(t, 4), "kind": kind, **detail})
        return t

    def dump(self, directory: Path) -> Path:
        path = Path(directory) / f"{self.name}.json"
        with self._lock:
            record = {
                "name": self.name,
                "faults": self.faults,
                "notes": self.notes,
                "history": [asdict(op) for op in self.history],
            }
        path.write_text(json.dumps(record, indent=1, default=repr))
        return path

    def acked_writes(self, after: float = 0.0) -> list[Operation]:
        with self._lock:
            return [
                op
                for op in self.history
                if op.ret is not None and op.kind != "get" and op.call >= after
            ]


def load_history(path: Path) -> list[Operation]:
    """A dumped run's history, to check again (``check_history(load_history(p))``)."""
    record = json.loads(Path(path).read_text())
    return [Operation(**op) for op in record["history"]]


# -- KV clients -------------------------------------------------------------------------


class KvLoad:
    """``clients`` threads, each its own KV session, doing put/get/cas on KEYS until stopped."""

    def __init__(self, run: Run, addresses: Sequence[str], token: str, clients: int = 3) -> None:
        self.run = run
        self.addresses = list(addresses)
        self.token = token
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, args=(c,), name=f"kv-client-{c}", daemon=True)
            for c in range(clients)
        ]

    def __enter__(self) -> KvLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(OP_DEADLINE_S * 3)

    def _loop(self, client: int) -> None:
        rng = random.Random(client)
        config = KvClientConfig(deadline_s=OP_DEADLINE_S, attempt_timeout_s=OP_ATTEMPT_S)
        seen: dict[str, Any] = {}
        with KV(self.addresses, token=self.token, config=config) as kv:
            while not self._stop.is_set():
                key = rng.choice(self.run.keys)
                kind = rng.choices(("put", "get", "cas"), weights=(4, 4, 2))[0]
                op = one_op(self.run, kv, client, kind, key, expected=seen.get(key))
                if op.ret is not None and op.kind == "get":
                    seen[key] = op.output
                elif (op.ret is not None and op.kind == "put") or op.output is True:
                    seen[key] = op.value
                self._stop.wait(THINK_S)


def one_op(run: Run, kv: KV, client: int, kind: str, key: str, *, expected: Any) -> Operation:
    """Do one operation through ``kv`` and record it (unknown outcome if it raised)."""
    value = next(_values) if kind != "get" else None
    call = run.now()
    try:
        if kind == "put":
            kv.put(key, value)
            output: Any = None
        elif kind == "get":
            output = kv.get(key)
        else:
            output = kv.cas(key, expected, value)
        ret: float | None = run.now()
    except (LeptonError, OSError, TimeoutError):
        ret, output = None, None
    op = Operation(client, kind, key, call, ret, value=value, expected=expected, output=output)
    run.add(op)
    return op


def final_reads(run: Run, addresses: Sequence[str], token: str) -> None:
    """After healing, a fresh client reads every key: a lost acknowledged write then
    makes the history non-linearizable."""
    config = KvClientConfig(deadline_s=FINAL_READ_DEADLINE_S)
    with KV(list(addresses), token=token, config=config) as kv:
        for key in run.keys:
            call = run.now()
            got = kv.get(key)
            run.add(Operation(999, "get", key, call, run.now(), output=got))


def check_linearizable(run: Run, min_acked: int) -> str:
    """Assert the history is linearizable with at least ``min_acked`` acknowledged writes;
    a one-line summary."""
    acked = run.acked_writes()
    unknown = sum(1 for op in run.history if op.ret is None)
    result = check_history(run.history)
    summary = (
        f"{len(run.history)} ops, {len(acked)} acked writes, {unknown} unknown, "
        f"{result.steps} checker steps"
    )
    run.notes["history"] = summary
    assert result.ok is True, f"{run.name}: not linearizable: {result.reason} ({summary})"
    assert len(acked) >= min_acked, f"{run.name}: only {len(acked)} acked writes ({summary})"
    return summary


# -- jobs ---------------------------------------------------------------------------------

WORDS = ("paxos", "quorum", "ballot", "leader", "learner", "acceptor", "lease", "epoch")


def corpus(lines: int, seed: int) -> list[str]:
    """Seeded text: its word count is known exactly (``expected_counts``)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(lines)]


def expected_counts(text: Iterable[str]) -> dict[str, int]:
    return dict(collections.Counter(w for line in text for w in line.split()))


def _slow_split(lines: Iterable[str], pause_s: float) -> Iterator[str]:
    """A map partition that takes ``pause_s``: the job lasts long enough to be cut."""
    time.sleep(pause_s)
    for line in lines:
        yield from line.split()


def submit_wordcount(
    cluster: Any, text: list[str], partitions: int, pause_s: float, name: str
) -> Any:
    """A detached two-stage word count (map on every worker, a hash shuffle across hosts)."""
    task = DistributedTask(cluster)
    return (
        task.parallelize(text, partitions)
        .map_partitions(lambda part: _slow_split(part, pause_s))
        .map(lambda w: (w, 1))
        .reduce_by_key(operator.add, partitions=2)
        .submit(name=name, progress=False)
    )


def check_wordcount(result: list[tuple[str, int]], text: list[str]) -> None:
    """Exactly the serial answer: a task output counted twice or lost would show."""
    assert len(result) == len({w for w, _ in result}), f"a word appears twice: {result}"
    assert dict(result) == expected_counts(text)
