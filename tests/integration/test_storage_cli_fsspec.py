"""``lep://`` URLs (fsspec) and ``lepton storage ...`` against a real LocalCluster:
listing and globbing synthesised directories, ranged reads, writes visible only on
close, executors reading ``lep://`` inputs, Parquet through pyarrow, and the CLI."""

from __future__ import annotations

import collections
import json
import operator
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import fsspec
import pytest

import lepton_ai as lep
import lepton_ai.storage.fsspec as lepfs
from helpers import lepton
from lepton_ai.node.local_cluster import LocalCluster
from lepton_ai.storage.checksum import crc32c
from lepton_ai.storage.fsspec import LeptonFileSystem

cloudpickle.register_pickle_by_value(sys.modules[__name__])

MB = 1 << 20
pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    # Small stores: a put over 16 MiB is StorageFull (the CLI's failure case).
    with LocalCluster(workers=2, storage_bytes_max=16 * MB) as c:
        yield c
    lepfs.close_handles()


@pytest.fixture
def fs(cluster: LocalCluster) -> LeptonFileSystem:
    out = fsspec.filesystem("lep", address=cluster.address, token=cluster.token)
    assert isinstance(out, LeptonFileSystem)
    return out


@pytest.fixture
def env(cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This process finds the cluster from the environment (as executors do)."""
    monkeypatch.setenv("LEPTON_ADDRESS", cluster.address)
    monkeypatch.setenv("LEPTON_TOKEN", cluster.token)
    return dict(os.environ)


def test_listing_glob_and_find_synthesise_directories(
    fs: LeptonFileSystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in ["d/a.log", "d/b.txt", "d/sub/c.log", "d/sub/deep/e.log", "d/z.log", "dz"]:
        fs.pipe_file(f"lep://{key}", key.encode())
    assert fs.ls("lep://d", detail=False) == ["d/a.log", "d/b.txt", "d/sub", "d/z.log"]
    # The same through pages of two keys: a directory spanning pages is listed once.
    monkeypatch.setattr(lepfs, "LIST_PAGE", 2)
    assert fs.ls("d/", detail=False) == ["d/a.log", "d/b.txt", "d/sub", "d/z.log"]
    assert fs.find("d") == ["d/a.log", "d/b.txt", "d/sub/c.log", "d/sub/deep/e.log", "d/z.log"]
    assert fs.find("d/sub", withdirs=True) == [
        "d/sub",
        "d/sub/c.log",
        "d/sub/deep",
        "d/sub/deep/e.log",
    ]
    assert fs.glob("lep://d/*.log") == ["d/a.log", "d/z.log"]
    assert fs.glob("d/**/*.log") == ["d/a.log", "d/sub/c.log", "d/sub/deep/e.log", "d/z.log"]
    info = fs.info("d/a.log")
    assert info["type"] == "file" and info["size"] == len(b"d/a.log")
    assert len(info["replicas"]) == 2 and len(info["checksum"]) == 8
    assert fs.info("d/sub") == {"name": "d/sub", "size": 0, "type": "directory"}
    assert fs.isdir("d/sub/deep") and not fs.isfile("d/sub") and fs.isfile("dz")
    assert not fs.exists("d/nope") and not fs.exists("d/su")
    with pytest.raises(FileNotFoundError):
        fs.info("d/nope")
    with pytest.raises(FileNotFoundError):
        fs.ls("d/nope")
    fs.rm("d", recursive=True)
    assert fs.find("d") == [] and fs.exists("dz")
    fs.rm("dz")
    with pytest.raises(FileNotFoundError):
        fs.rm("dz")


def test_ranged_reads_and_writes_visible_on_close(fs: LeptonFileSystem) -> None:
    data = random.Random(3).randbytes(3 * MB + 17)  # four 1 MiB chunks
    with fs.open("lep://io/blob", "wb", block_size=MB // 2) as f:
        for i in range(0, len(data), 300_001):
            f.write(data[i : i + 300_001])
        assert not fs.exists("io/blob")  # nothing visible before close
    assert fs.cat_file("io/blob") == data
    assert fs.info("io/blob")["size"] == len(data)
    rng = random.Random(4)
    with fs.open("io/blob", "rb", block_size=256 * 1024) as f:
        for _ in range(20):
            start, n = rng.randrange(len(data)), rng.randrange(1, 2 * MB)
            f.seek(start)
            assert f.read(n) == data[start : start + n]
    assert fs.cat_file("io/blob", start=MB - 5, end=MB + 5) == data[MB - 5 : MB + 5]
    assert fs.cat_file("io/blob", start=-10) == data[-10:]
    with pytest.raises(RuntimeError), fs.open("io/aborted", "wb") as f:
        f.write(b"half")
        raise RuntimeError("writer fails")
    assert not fs.exists("io/aborted")  # an aborted write stores nothing
    with pytest.raises(FileExistsError), fs.open("io/blob", "xb") as f:
        f.write(b"x")
    fs.pipe_file("io/small", b"abc")
    fs.cp_file("io/small", "io/copy")
    assert fs.cat_file("io/copy") == b"abc" and fs.ukey("io/copy") != fs.ukey("io/small")
    with fsspec.open("lep://io/small", "rt", address=fs._address, token=fs._token) as t:
        assert t.read() == "abc"
    with pytest.raises(FileNotFoundError):
        fs.open("io/missing", "rb")
    with pytest.raises(NotImplementedError):
        fs.open("io/small", "ab")
    fs.rm("io", recursive=True)


def test_executors_read_lep_urls(cluster: LocalCluster, env: dict[str, str]) -> None:
    rng = random.Random(7)
    vocab = [f"w{i}" for i in range(50)]
    lines = [" ".join(rng.choices(vocab, k=rng.randint(0, 9))) for _ in range(3000)]
    for i in range(3):
        body = "\n".join(lines[i * 1000 : (i + 1) * 1000]) + "\n"
        cluster.storage.put(f"logs/part-{i}.log", body.encode())
    cluster.storage.put("logs/ignored.txt", b"not a log\n")
    task = lep.DistributedTask(cluster, progress=False)
    # The driver resolves the glob here; the executors (other processes, which find
    # the cluster through $LEPTON_ADDRESS from their agent) read their byte ranges.
    counts = (
        task.read_text("lep://logs/*.log", partitions=8)
        .flat_map(str.split)
        .map(lambda w: (w, 1))
        .reduce_by_key(operator.add, partitions=3)
        .collect(timeout=30)
    )
    assert dict(counts) == collections.Counter(w for line in lines for w in line.split())
    for key in ["logs/part-0.log", "logs/part-1.log", "logs/part-2.log", "logs/ignored.txt"]:
        cluster.storage.delete(key)


def test_parquet_through_pyarrow(cluster: LocalCluster, env: dict[str, str]) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"id": list(range(500)), "word": [f"w{i % 7}" for i in range(500)]})
    options = {"address": cluster.address, "token": cluster.token}
    with fsspec.open("lep://t/x.parquet", "wb", **options) as f:
        pq.write_table(table, f, row_group_size=100)
    fs = fsspec.filesystem("lep", **options)
    assert pq.read_table("lep://t/x.parquet", filesystem=fs).equals(table)
    # Executors read just their row groups through lep:// too.
    rows = lep.DistributedTask(cluster, progress=False).read_parquet("lep://t/x.parquet", 3)
    assert [r["id"] for r in rows.collect(timeout=30)] == list(range(500))
    fs.rm_file("t/x.parquet")


def test_pandas_read_parquet(cluster: LocalCluster) -> None:
    pd = pytest.importorskip("pandas")
    options = {"address": cluster.address, "token": cluster.token}
    pd.DataFrame({"id": range(100)}).to_parquet("lep://t/p.parquet", storage_options=options)
    frame = pd.read_parquet("lep://t/p.parquet", storage_options=options)
    assert list(frame["id"]) == list(range(100))
    cluster.storage.delete("t/p.parquet")


def test_no_cluster_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LEPTON_ADDRESS", raising=False)
    fs = LeptonFileSystem(state_file=str(tmp_path / "none.json"), skip_instance_cache=True)
    with pytest.raises(ValueError, match="lep:// has no cluster"):
        fs.ls("")


# ---------------------------------------------------------------- lepton storage


def test_storage_cli(cluster: LocalCluster, tmp_path: Path) -> None:
    conn = ["--address", cluster.address, "--token", cluster.token]
    src = tmp_path / "model.bin"
    src.write_bytes(os.urandom(MB + 3))

    put = lepton("storage", "put", "cli/model.bin", str(src), "--replicas", "1", "--json", *conn)
    assert put.returncode == 0, put.stderr
    st = json.loads(put.stdout)
    assert st["key"] == "cli/model.bin" and st["size"] == MB + 3 and len(st["replicas"]) == 1
    piped = _lepton_stdin(b"from stdin\n", "storage", "put", "cli/notes.txt", "-", *conn)
    assert piped.returncode == 0 and "cli/notes.txt" in piped.stdout.decode()

    out = tmp_path / "copy.bin"
    got = lepton("storage", "get", "cli/model.bin", str(out), *conn)
    assert got.returncode == 0, got.stderr
    assert out.read_bytes() == src.read_bytes()
    cat = _lepton_stdin(b"", "storage", "get", "cli/notes.txt", *conn)
    assert cat.returncode == 0 and cat.stdout == b"from stdin\n"

    ls = lepton("storage", "ls", "cli/", "--json", *conn)
    assert ls.returncode == 0, ls.stderr
    listed = json.loads(ls.stdout)
    assert [o["key"] for o in listed] == ["cli/model.bin", "cli/notes.txt"]
    assert listed[1]["size"] == len(b"from stdin\n") and len(listed[1]["replicas"]) == 2
    text = lepton("storage", "ls", "cli/", *conn).stdout.splitlines()
    assert len(text) == 2 and text[0].split()[0] == str(MB + 3) and text[0].endswith("model.bin")

    stat = lepton("storage", "stat", "cli/notes.txt", "--json", *conn)
    assert json.loads(stat.stdout)["checksum"] == st_checksum(b"from stdin\n")
    assert "crc32c" in lepton("storage", "stat", "cli/notes.txt", *conn).stdout

    fsck = lepton("storage", "fsck", "--json", *conn)
    assert fsck.returncode == 0, fsck.stderr
    report = json.loads(fsck.stdout)
    assert report["ok"] and report["lost"] == [] and len(report["nodes"]) == 2
    assert lepton("storage", "fsck", *conn).stdout.count("\n") >= 3

    rm = lepton("storage", "rm", "cli/model.bin", "cli/notes.txt", *conn)
    assert rm.returncode == 0, rm.stderr
    assert lepton("storage", "ls", "cli/", *conn).stdout == ""


def test_storage_cli_failures(cluster: LocalCluster, tmp_path: Path) -> None:
    conn = ["--address", cluster.address, "--token", cluster.token]
    for args in (["get", "cli/missing"], ["stat", "cli/missing"], ["rm", "cli/missing"]):
        r = lepton("storage", *args, *conn)
        assert r.returncode != 0 and r.stderr.strip().splitlines() == [
            "lepton storage: error: no object 'cli/missing'"
        ], r.stderr
    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * (17 * MB))  # over each node's 16 MiB
    full = lepton("storage", "put", "cli/big", str(big), *conn)
    assert full.returncode != 0 and len(full.stderr.strip().splitlines()) == 1
    assert "no room" in full.stderr  # StorageFull
    nofile = lepton("storage", "put", "cli/x", str(tmp_path / "absent"), *conn)
    assert nofile.returncode != 0 and "no such file" in nofile.stderr
    env = dict(os.environ, LEPTON_STATE_FILE=str(tmp_path / "none.json"))
    nocluster = lepton("storage", "ls", env=env)
    assert nocluster.returncode != 0 and "no running cluster" in nocluster.stderr
    assert len(nocluster.stderr.strip().splitlines()) == 1
    helped = lepton("storage", "put", "--help")
    assert helped.returncode == 0 and "--replicas" in helped.stdout


def st_checksum(data: bytes) -> str:
    return f"{crc32c(memoryview(data)):08x}"


def _lepton_stdin(stdin: bytes, *args: str) -> subprocess.CompletedProcess[bytes]:
    """``lepton ARGS`` with ``stdin`` fed in and bytes captured (``helpers.lepton`` is text)."""
    return subprocess.run(
        [sys.executable, "-m", "lepton_ai.cli", *args],
        input=stdin,
        capture_output=True,
        timeout=60,
        check=False,
    )
