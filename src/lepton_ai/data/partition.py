"""Partitioning: splitting inputs into partitions and keys into shuffle buckets.

The bucket of a key must be the same in every process on every machine, so
Python's ``hash()`` is never used for it: ``hash(str)`` and ``hash(bytes)`` are
salted per process (PYTHONHASHSEED). ``stable_hash`` is a fixed function of the
key's *value*, and keys that compare equal in a dict (``1 == 1.0 == True``)
hash equal, so a map-side combine and the reduce side agree on key identity.
"""

from __future__ import annotations

import pickle
import struct
import zlib
from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # 2**64 / phi, the usual multiplicative-hash constant
_NONE_HASH = 0x5BD1E995
_SEQ_SEED = 0x345678


def _mix64(x: int) -> int:
    """Finalizer of splitmix64: spreads small ints (0, 1, 2, ...) over all bits."""
    x = (x + _GOLDEN) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def stable_hash(key: Any) -> int:
    """A 64-bit hash of ``key`` that is identical in every process and Python run.

    Fast paths for ``str``, ``bytes``, ``int``; ``bool`` and integral ``float`` hash
    as the equal ``int`` (they are the same dict key); tuples, lists and frozensets
    hash from their elements. Any other type hashes its pickle (protocol 5), so a
    custom key type must pickle canonically (equal values give equal bytes) - the
    analogue of Spark's requirement on ``hashCode``.
    """
    kind = type(key)
    if kind is str:
        return _mix64(zlib.crc32(key.encode("utf-8", "surrogatepass")) | (len(key) << 32))
    if kind is int or kind is bool:
        return _mix64(key & _MASK64)  # two's complement for negatives; deterministic
    if kind is bytes:
        return _mix64(zlib.crc32(key) | (len(key) << 32) | (1 << 63))
    return _stable_hash_slow(key)


def _stable_hash_slow(key: Any) -> int:
    if key is None:
        return _NONE_HASH
    if isinstance(key, float):
        if key.is_integer():
            return stable_hash(int(key))
        return _mix64(struct.unpack("<Q", struct.pack("<d", key))[0])
    if isinstance(key, (str, bytes, int)):  # subclasses: hash as the base value
        base = (
            str(key) if isinstance(key, str) else bytes(key) if isinstance(key, bytes) else int(key)
        )
        return stable_hash(base)
    if type(key).__module__ == "numpy" and hasattr(key, "item"):
        return stable_hash(key.item())  # np.int64(1) is the same dict key as 1
    if isinstance(key, (tuple, list)):
        acc = _SEQ_SEED
        for item in key:
            acc = _mix64(acc ^ stable_hash(item))
        return _mix64(acc ^ len(key))
    if isinstance(key, frozenset):
        acc = 0
        for item in key:  # order-independent: xor of element hashes
            acc ^= stable_hash(item)
        return _mix64(acc ^ len(key) ^ 0xF00D)
    return _mix64(zlib.crc32(pickle.dumps(key, protocol=5)))


def bucket_of(key: Any, num_buckets: int) -> int:
    """The shuffle bucket (0 <= b < num_buckets) of ``key``; the same in every process."""
    if num_buckets == 1:
        return 0
    return stable_hash(key) % num_buckets


# Every partition is a task the coordinator tracks and a slot in the job's log
# record, so a plan cannot ask for more than this per stage.
PARTITIONS_MAX = 100_000


def check_partitions(partitions: object, *, name: str = "partitions") -> int:
    """A user-given partition count: an int in 1..PARTITIONS_MAX, else TypeError/ValueError."""
    if isinstance(partitions, bool) or not isinstance(partitions, int):
        raise TypeError(f"{name} must be a positive int, got {type(partitions).__name__}")
    if partitions <= 0:
        raise ValueError(f"{name} must be > 0, got {partitions}")
    if partitions > PARTITIONS_MAX:
        raise ValueError(f"{name} must be <= {PARTITIONS_MAX}, got {partitions}")
    return partitions


def split_evenly(items: Sequence[T], partitions: int) -> list[Sequence[T]]:
    """Split ``items`` into ``partitions`` contiguous slices whose sizes differ by at most 1.

    Order is preserved: concatenating the slices gives ``items`` back. Some slices
    are empty when there are fewer items than partitions.
    """
    check_partitions(partitions)
    n = len(items)
    base, extra = divmod(n, partitions)
    out: list[Sequence[T]] = []
    start = 0
    for i in range(partitions):
        stop = start + base + (1 if i < extra else 0)
        out.append(items[start:stop])
        start = stop
    return out


def split_range(start: int, stop: int, step: int, partitions: int) -> list[tuple[int, int, int]]:
    """Split ``range(start, stop, step)`` into ``partitions`` contiguous sub-ranges."""
    r = range(start, stop, step)
    bounds: list[tuple[int, int, int]] = []
    for part in split_evenly(r, partitions):
        sub = part if isinstance(part, range) else range(0)
        bounds.append((sub.start, sub.stop, sub.step) if len(sub) else (0, 0, 1))
    return bounds
