"""The storage layer on real processes (3 coordinators, the default): objects put,
read, listed and deleted; jobs carrying hundreds of MB through the data plane;
replicas surviving a node SIGKILL, a bit flipped on disk and a full disk."""

from __future__ import annotations

import os
import pathlib
import sys
import time
from collections.abc import Iterator

import cloudpickle
import numpy as np
import pytest

import lepton_ai as lep
from helpers import wait_until
from lepton_ai.errors import StorageFull
from lepton_ai.node.local_cluster import LocalCluster

cloudpickle.register_pickle_by_value(sys.modules[__name__])

MB = 1 << 20


def node_ids(cluster: LocalCluster) -> dict[str, str]:
    """worker id ("0", "1", ...) -> its node id."""
    return {m["id"]: m["node"] for m in cluster.status()["members"] if m["role"] == "worker"}


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(workers=3) as c:
        yield c


def test_put_get_stat_list_delete(cluster: LocalCluster) -> None:
    st = cluster.storage
    payloads = {"a/empty": b"", "a/one": b"x", "a/five": os.urandom(5 * MB + 3)}
    for key, data in payloads.items():
        info = st.put(key, data)
        assert info.size == len(data) and len(set(info.replicas)) == 2
        assert set(info.replicas) <= set(node_ids(cluster).values())
    for key, data in payloads.items():
        assert st.get(key) == data
        with st.open(key) as f:
            assert f.read() == data
    with st.open("a/five") as f:
        f.seek(MB + 7)
        assert f.read(10) == payloads["a/five"][MB + 7 : MB + 17]
    assert [s.key for s in st.list("a/")] == sorted(payloads)
    st.put("a/one", b"yy", replicas=3)
    assert st.get("a/one") == b"yy" and len(st.stat("a/one").replicas) == 3
    st.delete("a/one")
    with pytest.raises(KeyError):
        st.get("a/one")
    with pytest.raises(KeyError):
        st.delete("a/one")
    with pytest.raises(ValueError, match="replicas=4"):
        st.put("a/x", b"1", replicas=4)
    with pytest.raises(TypeError):
        st.put("a/x", "text is not bytes")  # type: ignore[arg-type]


def test_path_and_file_objects(cluster: LocalCluster, tmp_path: pathlib.Path) -> None:
    src = tmp_path / "model.bin"
    src.write_bytes(os.urandom(3 * MB))
    cluster.storage.put("models/m1", src)
    with open(src, "rb") as f:
        cluster.storage.put("models/m2", f)
    assert cluster.storage.get("models/m1") == cluster.storage.get("models/m2") == src.read_bytes()


def test_a_big_file_is_streamed_in_and_out(cluster: LocalCluster, tmp_path: pathlib.Path) -> None:
    src = tmp_path / "big.bin"
    block = os.urandom(MB)
    with open(src, "wb") as f:
        for i in range(150):  # 150 MB, written by blocks
            f.write(bytes([i % 256]) + block[1:])
    info = cluster.storage.put("big/file", src)
    assert info.size == 150 * MB and len(info.replicas) == 2
    with cluster.storage.open("big/file") as obj, open(src, "rb") as local:
        for _ in range(150):
            assert obj.read(MB) == local.read(MB)
        assert obj.read(1) == b""
    cluster.storage.delete("big/file")


def test_200mb_of_parallelized_strings_and_an_array(cluster: LocalCluster) -> None:
    task = lep.DistributedTask(cluster)
    lines = [f"{i:09d}-" + "y" * 90 for i in range(2_000_000)]  # ~200 MB of str
    assert task.parallelize(lines, partitions=16).map(len).reduce() == sum(map(len, lines))
    arr = np.arange(25_000_000, dtype=np.int64)  # 200 MB
    total = task.parallelize(arr, partitions=16).map_partitions(lambda c: [int(c.sum())]).reduce()
    assert total == int(arr.sum())


def test_100mb_collect_comes_back_exact(cluster: LocalCluster) -> None:
    task = lep.DistributedTask(cluster)
    out = task.parallelize(range(1_000_000), partitions=16).map(lambda x: f"{x:012d}" * 8).collect()
    assert len(out) == 1_000_000 and out[123_456] == f"{123_456:012d}" * 8
    assert out == [f"{x:012d}" * 8 for x in range(1_000_000)]


def test_reads_survive_a_node_kill_and_replicas_are_restored() -> None:
    # restart=False: the node is lost for good (its disk with it), so the copies
    # must come from the survivors; a restarted node would bring its own back.
    with LocalCluster(workers=3, restart=False) as c:
        data = {f"k{i}": os.urandom(2 * MB) for i in range(6)}
        for k, v in data.items():
            c.storage.put(k, v)
        nodes = node_ids(c)
        victim = c.storage.stat("k0").replicas[0]
        victim_id = next(w for w, n in nodes.items() if n == victim)
        c.kill("worker", victim_id)
        for _ in range(3):
            for k, v in data.items():
                assert c.storage.get(k) == v
        live = {n for w, n in nodes.items() if w != victim_id}

        def restored() -> bool:
            return all(len(set(c.storage.stat(k).replicas) & live) == 2 for k in data)

        wait_until(restored, 30.0, "every object back to 2 live replicas")
        report = c.storage.fsck()
        assert not report.lost


def test_a_flipped_bit_is_never_read_and_is_repaired(tmp_path: pathlib.Path) -> None:
    with LocalCluster(workers=2, data_dir=str(tmp_path)) as c:
        data = os.urandom(3 * MB)
        info = c.storage.put("flip", data)
        path = next(tmp_path.rglob(f"{info.oid}.obj"))
        raw = bytearray(path.read_bytes())
        raw[len(raw) - MB] ^= 0x10
        path.write_bytes(bytes(raw))
        for _ in range(4):
            assert c.storage.get("flip") == data

        def healed() -> bool:
            copies = list(tmp_path.rglob(f"{info.oid}.obj"))
            st = c.storage.stat("flip")
            return len(copies) == 2 and len(st.replicas) == 2 and path.exists()

        wait_until(healed, 30.0, "the corrupt replica replaced from the good one")
        assert c.storage.get("flip") == data


def test_a_full_node_says_so_and_keeps_what_it_has() -> None:
    with LocalCluster(workers=2, storage_bytes_max=12 * MB) as c:
        first = os.urandom(8 * MB)
        c.storage.put("first", first)
        with pytest.raises(StorageFull):
            c.storage.put("second", os.urandom(8 * MB))
        with pytest.raises(KeyError):
            c.storage.stat("second")
        assert c.storage.get("first") == first
        c.storage.put("small", b"z" * MB)  # what fits still goes in


def test_objects_survive_a_whole_cluster_restart(tmp_path: pathlib.Path) -> None:
    data = os.urandom(2 * MB)
    with LocalCluster(workers=2, data_dir=str(tmp_path), fsync=True) as c:
        c.storage.put("durable", data)
    with LocalCluster(workers=2, data_dir=str(tmp_path), fsync=True) as c:
        assert c.storage.get("durable") == data
        assert [s.key for s in c.storage.list()] == ["durable"]


def test_the_scrubber_finds_a_flipped_bit_no_reader_touched(tmp_path: pathlib.Path) -> None:
    with LocalCluster(workers=2, data_dir=str(tmp_path), scrub_interval_s=0.5) as c:
        data = os.urandom(2 * MB)
        info = c.storage.put("quiet", data)
        copies = sorted(tmp_path.rglob(f"{info.oid}.obj"))
        assert len(copies) == 2
        raw = bytearray(copies[0].read_bytes())
        raw[-100] ^= 0x01
        copies[0].write_bytes(bytes(raw))
        before = copies[0].stat().st_mtime_ns

        def repaired() -> bool:
            kinds = [e["kind"] for e in c.events()]
            fresh = copies[0].exists() and copies[0].stat().st_mtime_ns != before
            return (
                "replica_corrupt" in kinds and fresh and len(c.storage.stat("quiet").replicas) == 2
            )

        wait_until(repaired, 30.0, "the scrubber reported the bad copy and it was re-made")
        assert copies[0].read_bytes()[-2 * MB :] == copies[1].read_bytes()[-2 * MB :]
        assert c.storage.get("quiet") == data


def test_bytes_of_a_put_never_committed_are_swept(tmp_path: pathlib.Path) -> None:
    import asyncio

    from lepton_ai.storage.dataclient import DataClient

    with LocalCluster(workers=2, data_dir=str(tmp_path), orphan_grace_s=1.0) as c:
        kept = c.storage.put("kept", b"k" * MB)
        node = next(m for m in c.status()["members"] if m["role"] == "worker")
        orphan = "ab" * 16

        async def write_without_commit() -> None:
            client = DataClient(c.token)
            try:
                ok, errors = await client.put(orphan, os.urandom(MB), [node["address"]])
                assert ok == [node["address"]], errors
            finally:
                await client.close()

        asyncio.run(write_without_commit())  # a writer that died before CommitObject
        assert list(tmp_path.rglob(f"{orphan}.obj"))
        wait_until(lambda: not list(tmp_path.rglob(f"{orphan}.obj")), 30.0, "the orphan swept")
        assert len(list(tmp_path.rglob(f"{kept.oid}.obj"))) == 2
        assert c.storage.get("kept") == b"k" * MB


def test_a_closure_capturing_80_mb_runs(cluster: LocalCluster) -> None:
    table = np.arange(10_000_000, dtype=np.int64)  # 80 MB captured: 100x PLAN_BYTES_MAX
    task = lep.DistributedTask(cluster)
    out = (
        task.parallelize(range(8), partitions=4).map(lambda i: int(table[i * 1_000_000])).collect()
    )
    assert out == [i * 1_000_000 for i in range(8)]


def test_limits_fail_at_once_and_leave_the_cluster_healthy(cluster: LocalCluster) -> None:

    task = lep.DistributedTask(cluster)
    started = time.monotonic()
    with pytest.raises(ValueError, match="KEY_BYTES_MAX"):
        cluster.storage.put("k" * 10_240, b"x")
    assert time.monotonic() - started < 5.0
    assert task.parallelize(range(10)).map(lambda x: x + 1).collect() == list(range(1, 11))


def test_a_shuffle_10x_past_its_partition_bound_fails_at_once(cluster: LocalCluster) -> None:
    from lepton_ai.compute.plan import SHUFFLE_PARTITIONS_MAX
    from lepton_ai.errors import LimitExceeded

    pairs = lep.DistributedTask(cluster).parallelize(range(100), 4).map(lambda x: (x % 7, x))
    with pytest.raises(LimitExceeded, match="SHUFFLE_PARTITIONS_MAX"):
        pairs.reduce_by_key(lambda a, b: a + b, partitions=10 * SHUFFLE_PARTITIONS_MAX)
    # At the bound itself, the map tasks' reports (one bucket per reducer) fit the log.
    out = pairs.reduce_by_key(lambda a, b: a + b, partitions=SHUFFLE_PARTITIONS_MAX).collect()
    assert dict(out) == {k: sum(x for x in range(100) if x % 7 == k) for k in range(7)}
