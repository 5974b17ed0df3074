"""The stored objects' durable metadata: a deterministic state machine fed by log commands.

The log holds only ``ObjectMeta`` (key -> object id, size, checksum, replica
nodes); the bytes live on the worker nodes. Every replica applies the same
commands in log order, so the machine is pure: time arrives inside commands
(``created_at``, ``older_than``), and every bound is a field of
``StorageStateConfig``, which must be identical on every replica.

Rules:

* ``ObjectPut`` creates or replaces a key; the replaced object is returned in
  ``StorageResult.removed`` so the leader deletes its bytes. An oid names one
  object forever: a put whose oid is already stored is rejected (a retried put
  must never return the live object as "replaced", or its bytes would go).
  ``if_absent`` makes a put an exactly-once commit: the first one wins.
* ``ObjectDeleted(key, oid)`` with an oid deletes only that object, so a stale
  delete cannot remove a newer object written to the same key.
* ``ReplicaAdded``/``ReplicaDropped`` name the object by oid: a command about an
  object that was replaced or deleted meanwhile is rejected and changes nothing.
  Dropping the last replica is allowed: the object is then lost (fsck reports it).
* ``JobObjectsDeleted`` and ``PrefixDeleted`` delete in bounded batches (one
  command must not stall every replica); ``more=True`` asks the leader to
  propose again (``PrefixDeleted`` with ``start_after=cursor``).

A rejected command changes nothing and says why. Use the machine directly as a
``StateMachine`` (``apply(bytes) -> bytes``) or embed it with ``apply_command``
and ``encode_storage_command``/``decode_storage_command``.
"""

from __future__ import annotations

import bisect
import builtins
import heapq
import math
import operator
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import msgspec

from lepton_ai.storage.messages import CHUNK_BYTES_MAX, KEY_BYTES_MAX, OID_RE, ObjectMeta

CRC_LIMIT = 1 << 32  # crc32c values are unsigned 32-bit

# ------------------------------------------------------------------ commands
# Tags are prefixed with "Storage": the coordinator's combined machine tries the job,
# meta, storage and KV decoders in turn, so no two machines may share a tag.


class ObjectPut(msgspec.Struct, frozen=True, tag="StoragePut"):
    """Create or replace ``meta.key``; ``if_absent``: reject when the key exists."""

    meta: ObjectMeta
    if_absent: bool = False


class ObjectDeleted(msgspec.Struct, frozen=True, tag="StorageDeleted"):
    """Delete ``key``; with ``oid``, only while the key still names that object."""

    key: str
    oid: str = ""


class ReplicaAdded(msgspec.Struct, frozen=True, tag="StorageReplicaAdded"):
    oid: str
    node: str


class ReplicaDropped(msgspec.Struct, frozen=True, tag="StorageReplicaDropped"):
    oid: str
    node: str


class JobObjectsDeleted(msgspec.Struct, frozen=True, tag="StorageJobObjectsDeleted"):
    """Delete the objects owned by ``job_id`` (in key order, a bounded batch per command)."""

    job_id: str


class PrefixDeleted(msgspec.Struct, frozen=True, tag="StoragePrefixDeleted"):
    """Delete objects under ``prefix`` created before ``older_than`` whose job is not kept.

    Scans keys after ``start_after`` (the previous result's ``cursor``).
    """

    prefix: str
    older_than: float
    keep_jobs: list[str] = []
    start_after: str = ""


StorageCommand = (
    ObjectPut | ObjectDeleted | ReplicaAdded | ReplicaDropped | JobObjectsDeleted | PrefixDeleted
)


class StorageResult(msgspec.Struct, frozen=True):
    """What ``apply`` returns to the proposer.

    ``removed``: the objects this command took out of the log (a replaced or deleted
    object): the leader deletes their bytes on ``replicas``. ``more``: a batch bound
    stopped the command early; propose it again (``PrefixDeleted``: from ``cursor``).
    """

    accepted: bool
    reason: str = ""
    removed: list[ObjectMeta] = []
    more: bool = False
    cursor: str = ""


_cmd_encoder = msgspec.msgpack.Encoder()
_cmd_decoder = msgspec.msgpack.Decoder(StorageCommand)
_result_decoder = msgspec.msgpack.Decoder(StorageResult)


def encode_storage_command(cmd: StorageCommand) -> bytes:
    return _cmd_encoder.encode(cmd)


def decode_storage_command(data: bytes) -> StorageCommand:
    """ValueError on bytes that are not a storage command (another machine's, or garbage)."""
    try:
        cmd: StorageCommand = _cmd_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise ValueError(f"malformed storage command: {exc}") from exc
    return cmd


def encode_storage_result(result: StorageResult) -> bytes:
    return _cmd_encoder.encode(result)


def decode_storage_result(data: bytes) -> StorageResult:
    return _result_decoder.decode(data)


# ------------------------------------------------------------------ validation


def check_key(key: str) -> str:
    """Why ``key`` is not a valid object key, or "" if it is."""
    if not key:
        return "empty key"
    if "\x00" in key:
        return "key contains NUL"
    if key.startswith("/"):
        return "key starts with '/'"
    try:
        n = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        return "key is not valid UTF-8"
    if n > KEY_BYTES_MAX:
        return f"key is {n} bytes (KEY_BYTES_MAX={KEY_BYTES_MAX})"
    return ""


def _is_oid(oid: str) -> bool:
    # fullmatch: OID_RE's "$" alone would accept a trailing newline.
    return OID_RE.fullmatch(oid) is not None


def _check_replicas(replicas: list[str], replicas_max: int) -> str:
    if not replicas:
        return "no replicas"
    if len(replicas) > replicas_max:
        return f"{len(replicas)} replicas (replicas_max={replicas_max})"
    if len(set(replicas)) != len(replicas):
        return "duplicate replica nodes"
    if not all(replicas):
        return "empty replica node id"
    return ""


# ------------------------------------------------------------------ sorted keys


class SortedKeys:
    """The keys in order, as a list of sorted blocks of at most ``2 * block`` keys.

    One flat sorted list costs an O(n) memmove per insert: ~50 us per put at 1e6
    random keys (measured), on every replica. Blocks make insert and delete
    O(log n + block) and keep in-order iteration from any key cheap.
    """

    def __init__(self, sorted_keys: Iterable[str] = (), block: int = 512) -> None:
        self._block = block
        keys = builtins.list(sorted_keys)
        self._blocks = [keys[i : i + block] for i in range(0, len(keys), block)]
        self._maxes = [b[-1] for b in self._blocks]  # last key of each block
        self._len = len(keys)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[str]:
        for b in self._blocks:
            yield from b

    def add(self, key: str) -> None:
        """Insert ``key`` (not present)."""
        self._len += 1
        if not self._blocks:
            self._blocks.append([key])
            self._maxes.append(key)
            return
        i = bisect.bisect_left(self._maxes, key)
        if i == len(self._maxes):  # past the last key: append to the last block
            i -= 1
            self._blocks[i].append(key)
            self._maxes[i] = key
        else:
            bisect.insort(self._blocks[i], key)
        b = self._blocks[i]
        if len(b) > 2 * self._block:
            self._blocks[i : i + 1] = [b[: self._block], b[self._block :]]
            self._maxes[i : i + 1] = [b[self._block - 1], b[-1]]

    def remove(self, key: str) -> None:
        """Delete ``key`` (present)."""
        i = bisect.bisect_left(self._maxes, key)
        b = self._blocks[i]
        del b[bisect.bisect_left(b, key)]
        self._len -= 1
        if b:
            self._maxes[i] = b[-1]
        else:
            del self._blocks[i], self._maxes[i]

    def from_key(self, lo: str, inclusive: bool) -> Iterator[str]:
        """The keys >= ``lo`` (``inclusive``) or > ``lo``, in order."""
        find = bisect.bisect_left if inclusive else bisect.bisect_right
        i = find(self._maxes, lo)
        if i == len(self._blocks):
            return
        b = self._blocks[i]
        yield from b[find(b, lo) :]
        for b in self._blocks[i + 1 :]:
            yield from b


# ------------------------------------------------------------------ state


@dataclass(frozen=True)
class StorageStateConfig:
    """Must be identical on every replica (it changes what ``apply`` does)."""

    objects_max: int = 1_000_000  # keys in the log; a put of a new key past it is rejected
    list_max: int = 10_000  # objects one ``list`` returns
    deletes_per_command_max: int = 1_000  # objects one bulk-delete command removes
    scan_per_command_max: int = 100_000  # keys one PrefixDeleted examines
    replicas_max: int = 16  # replica nodes per object (and the largest ``want``)
    keep_jobs_max: int = 10_000  # PrefixDeleted.keep_jobs (the job machine's jobs_max)


class _Snapshot(msgspec.Struct, array_like=True):
    objects: list[ObjectMeta]  # sorted by key: independent of the order of history


_snap_encoder = msgspec.msgpack.Encoder()
_snap_decoder = msgspec.msgpack.Decoder(_Snapshot)

_OK = StorageResult(True)


def _reject(reason: str) -> StorageResult:
    return StorageResult(False, reason)


class StorageStateMachine:
    """The deterministic object-metadata machine (``consensus.log_host.StateMachine``).

    ``objects`` (key -> meta) is the state; the rest are indexes derived from it
    and rebuilt on restore. Returned metas are shared with the state: do not mutate
    their ``replicas`` lists.
    """

    def __init__(self, config: StorageStateConfig | None = None) -> None:
        self.config = config or StorageStateConfig()
        self._clear()

    def _clear(self) -> None:
        self.objects: dict[str, ObjectMeta] = {}
        self._keys = SortedKeys()  # for list() and prefix scans
        self._by_oid: dict[str, str] = {}  # oid -> key
        self._by_job: dict[str, set[str]] = {}  # job -> keys (JobObjectsDeleted)
        self._on_node: dict[str, set[str]] = {}  # node -> oids (objects_on)
        self._node_bytes: dict[str, int] = {}  # node -> bytes of its replicas

    # StateMachine protocol --------------------------------------------------

    def apply(self, command: bytes) -> bytes:
        try:
            cmd = decode_storage_command(command)
        except ValueError as exc:
            return encode_storage_result(StorageResult(False, str(exc)))
        return encode_storage_result(self.apply_command(cmd))

    def snapshot(self) -> bytes:
        return _snap_encoder.encode(_Snapshot([self.objects[k] for k in self._keys]))

    def restore(self, data: bytes) -> None:
        snap = _snap_decoder.decode(data)
        self._clear()
        previous = ""
        for meta in snap.objects:
            if meta.key <= previous or meta.oid in self._by_oid:
                raise ValueError("storage snapshot: keys unsorted or an oid repeated")
            previous = meta.key
            self.objects[meta.key] = meta
            self._index(meta)
        self._keys = SortedKeys(self.objects)  # insertion order = key order, checked above

    # commands -----------------------------------------------------------------

    def apply_command(self, cmd: StorageCommand) -> StorageResult:
        """Apply one command; a rejected command changes nothing and says why."""
        if isinstance(cmd, ObjectPut):
            return self._put(cmd)
        if isinstance(cmd, ObjectDeleted):
            return self._deleted(cmd)
        if isinstance(cmd, ReplicaAdded | ReplicaDropped):
            return self._replica(cmd)
        if isinstance(cmd, JobObjectsDeleted):
            return self._job_deleted(cmd)
        return self._prefix_deleted(cmd)

    def _check_meta(self, meta: ObjectMeta) -> str:
        why = check_key(meta.key)
        if why:
            return why
        if not _is_oid(meta.oid):
            return f"not an object id: {meta.oid!r}"
        if meta.size < 0:
            return "negative size"
        if not 0 < meta.chunk_bytes <= CHUNK_BYTES_MAX:
            return f"chunk_bytes {meta.chunk_bytes} not in 1..{CHUNK_BYTES_MAX}"
        if not 0 <= meta.crc < CRC_LIMIT:
            return "crc is not a 32-bit value"
        why = _check_replicas(meta.replicas, self.config.replicas_max)
        if why:
            return why
        if not 1 <= meta.want <= self.config.replicas_max:
            return f"want {meta.want} not in 1..{self.config.replicas_max}"
        if not math.isfinite(meta.created_at):
            return "created_at is not finite"
        return ""

    def _put(self, cmd: ObjectPut) -> StorageResult:
        meta = cmd.meta
        why = self._check_meta(meta)
        if why:
            return _reject(why)
        holder = self._by_oid.get(meta.oid)
        if holder is not None:
            if holder == meta.key:
                return _reject("duplicate put: the key already holds this oid")
            return _reject("oid already used by another key")
        old = self.objects.get(meta.key)
        if old is not None and cmd.if_absent:
            return _reject("key exists")
        if old is None and len(self.objects) >= self.config.objects_max:
            return _reject(f"too many objects (objects_max={self.config.objects_max})")
        # Own copy of the list: the command's list belongs to the caller.
        meta = msgspec.structs.replace(meta, replicas=builtins.list(meta.replicas))
        if old is None:
            self._keys.add(meta.key)
        else:
            self._unindex(old)
        self.objects[meta.key] = meta
        self._index(meta)
        return _OK if old is None else StorageResult(True, removed=[old])

    def _deleted(self, cmd: ObjectDeleted) -> StorageResult:
        meta = self.objects.get(cmd.key)
        if meta is None:
            return _reject("no such key")
        if cmd.oid and meta.oid != cmd.oid:
            return _reject("stale delete: the key holds another object")
        self._remove([cmd.key])
        return StorageResult(True, removed=[meta])

    def _replica(self, cmd: ReplicaAdded | ReplicaDropped) -> StorageResult:
        key = self._by_oid.get(cmd.oid)
        if key is None:
            return _reject("no such object (replaced or deleted)")
        meta = self.objects[key]
        if isinstance(cmd, ReplicaAdded):
            if not cmd.node:
                return _reject("empty node id")
            if cmd.node in meta.replicas:
                return _reject("already a replica")
            if len(meta.replicas) >= self.config.replicas_max:
                return _reject(f"replicas_max={self.config.replicas_max} reached")
            replicas = [*meta.replicas, cmd.node]
        else:
            if cmd.node not in meta.replicas:
                return _reject("not a replica")
            replicas = [n for n in meta.replicas if n != cmd.node]
        new = msgspec.structs.replace(meta, replicas=replicas)
        self._unindex(meta)
        self.objects[key] = new
        self._index(new)
        return _OK

    def _job_deleted(self, cmd: JobObjectsDeleted) -> StorageResult:
        if not cmd.job_id:
            return _reject("empty job id (would match every job-less object)")
        keys = self._by_job.get(cmd.job_id, set())
        limit = self.config.deletes_per_command_max
        # nsmallest: key order (deterministic) without sorting all of a huge job.
        batch = heapq.nsmallest(limit, keys)
        more = len(keys) > len(batch)
        removed = self._remove(batch)
        return StorageResult(True, removed=removed, more=more, cursor=batch[-1] if batch else "")

    def _prefix_deleted(self, cmd: PrefixDeleted) -> StorageResult:
        if not cmd.prefix:
            return _reject("empty prefix (would match every key)")
        if len(cmd.keep_jobs) > self.config.keep_jobs_max:
            return _reject(f"{len(cmd.keep_jobs)} keep_jobs (keep_jobs_max)")
        keep = set(cmd.keep_jobs)
        victims: builtins.list[str] = []
        more, cursor = False, ""
        for scanned, key in enumerate(self._under(cmd.prefix, cmd.start_after)):
            if scanned >= self.config.scan_per_command_max or (
                len(victims) >= self.config.deletes_per_command_max
            ):
                more = True  # ``key`` is left: the next command starts after ``cursor``
                break
            meta = self.objects[key]
            if meta.created_at < cmd.older_than and meta.job not in keep:
                victims.append(key)
            cursor = key
        return StorageResult(True, removed=self._remove(victims), more=more, cursor=cursor)

    # indexes ------------------------------------------------------------------

    def _index(self, meta: ObjectMeta) -> None:
        self._by_oid[meta.oid] = meta.key
        if meta.job:
            self._by_job.setdefault(meta.job, set()).add(meta.key)
        for node in meta.replicas:
            self._on_node.setdefault(node, set()).add(meta.oid)
            self._node_bytes[node] = self._node_bytes.get(node, 0) + meta.size

    def _unindex(self, meta: ObjectMeta) -> None:
        del self._by_oid[meta.oid]
        if meta.job:
            keys = self._by_job[meta.job]
            keys.discard(meta.key)
            if not keys:
                del self._by_job[meta.job]
        for node in meta.replicas:
            oids = self._on_node[node]
            oids.discard(meta.oid)
            self._node_bytes[node] -= meta.size
            if not oids:  # a node with no replicas leaves the indexes (bounded by nodes)
                del self._on_node[node], self._node_bytes[node]

    def _remove(self, keys: builtins.list[str]) -> builtins.list[ObjectMeta]:
        """Remove existing ``keys``; returns their metas in the given order."""
        removed = [self.objects.pop(k) for k in keys]
        for meta in removed:
            self._unindex(meta)
            self._keys.remove(meta.key)
        return removed

    def _under(self, prefix: str, start_after: str) -> Iterator[str]:
        """The keys under ``prefix`` and after ``start_after``, in order."""
        # Keys >= prefix and > start_after: whichever bound is higher decides.
        if start_after and start_after >= prefix:
            keys = self._keys.from_key(start_after, inclusive=False)
        else:
            keys = self._keys.from_key(prefix, inclusive=True)
        for key in keys:
            if not key.startswith(prefix):
                return  # past the prefix's keys: they are contiguous
            yield key

    # queries ------------------------------------------------------------------

    def get(self, key: str) -> ObjectMeta | None:
        return self.objects.get(key)

    def by_oid(self, oid: str) -> ObjectMeta | None:
        key = self._by_oid.get(oid)
        return None if key is None else self.objects[key]

    def list(
        self, prefix: str = "", start_after: str = "", limit: int = 1000
    ) -> builtins.list[ObjectMeta]:
        """Objects under ``prefix`` after ``start_after``, by key, at most min(limit, list_max)."""
        limit = max(0, min(limit, self.config.list_max))
        out: builtins.list[ObjectMeta] = []
        if limit:
            for key in self._under(prefix, start_after):
                out.append(self.objects[key])
                if len(out) >= limit:
                    break
        return out

    @property
    def total_objects(self) -> int:
        return len(self.objects)

    def bytes_by_node(self) -> dict[str, int]:
        """Bytes of the replicas each node holds (by the log), by node id."""
        return dict(sorted(self._node_bytes.items()))

    def objects_on(self, node: str) -> builtins.list[ObjectMeta]:
        """Objects with a replica on ``node``, by key."""
        keys = sorted(self._by_oid[oid] for oid in self._on_node.get(node, ()))
        return [self.objects[k] for k in keys]

    def copies_down(self, live_nodes: Iterable[str]) -> tuple[int, int]:
        """(objects with a copy on a node that is not live but one live copy left,
        objects with no live copy): through the per-node index, so it costs what the
        down nodes hold, not a scan of every object (for metrics at each scrape)."""
        live = set(live_nodes)
        metas = [self.objects[self._by_oid[oid]] for oid in self._on_down(live)]
        lost = sum(1 for m in metas if not any(n in live for n in m.replicas))
        return len(metas) - lost, lost

    def on_down_nodes(
        self, live_nodes: Iterable[str], limit: int
    ) -> tuple[builtins.list[ObjectMeta], builtins.list[ObjectMeta]]:
        """At most ``limit`` each (the first by key) of the objects with a copy on a
        node that is not live, with a live copy left and with none; by the index."""
        live = set(live_nodes)
        metas = [self.objects[self._by_oid[oid]] for oid in self._on_down(live)]
        under = [m for m in metas if any(n in live for n in m.replicas)]
        lost = [m for m in metas if not any(n in live for n in m.replicas)]
        by_key = operator.attrgetter("key")
        return heapq.nsmallest(limit, under, by_key), heapq.nsmallest(limit, lost, by_key)

    def _on_down(self, live: set[str]) -> set[str]:
        touched: set[str] = set()
        for node, oids in self._on_node.items():
            if node not in live:
                touched.update(oids)
        return touched

    def under_replicated(
        self, live_nodes: Iterable[str], limit: int | None = None
    ) -> builtins.list[ObjectMeta]:
        """Objects with fewer live replicas than min(want, live nodes), by key.

        Zero live replicas (lost) included. A full scan: for fsck, not a hot path.
        At most ``limit`` (default ``list_max``).
        """
        live = set(live_nodes)
        limit = self.config.list_max if limit is None else limit
        out: builtins.list[ObjectMeta] = []
        for key in self._keys:
            if len(out) >= limit:
                break
            meta = self.objects[key]
            have = sum(1 for n in meta.replicas if n in live)
            # max(1, ...): with no live node at all every object is lost, and reported.
            if have < max(1, min(meta.want, len(live))):
                out.append(meta)
        return out
