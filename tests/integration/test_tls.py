"""Mutual TLS on every wire connection and HTTPS + bearer token on the HTTP ports,
with real processes: a ``LocalCluster(workers=2, tls=True)`` (3 coordinators)."""

from __future__ import annotations

import asyncio
import collections
import operator
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import lepton_ai as lep
from lepton_ai.errors import LeptonError, TlsError
from lepton_ai.node.messages import ClientReply, GetStatus
from lepton_ai.node.node_net import parse_address
from lepton_ai.wire import Codec, ConnectionClosed, WireConfig, connect
from lepton_ai.wire.certs import create
from lepton_ai.wire.tls import TlsConfig, load_tls

HTTP_TOKEN = "metrics-and-serving-secret"
MODEL = "def predict(instances):\n    return [sum(x) for x in instances]\n"
_CODEC = Codec[ClientReply](ClientReply)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    with lep.LocalCluster(workers=2, tls=True, http_token=HTTP_TOKEN) as c:
        c.wait_ready(2)
        yield c


def _ports(cluster: Any) -> dict[str, tuple[str, int]]:
    """One port of each kind: a coordinator's client port, a Paxos port, an agent's data port."""
    members = cluster.status()["members"]
    worker = next(m for m in members if m["role"] == "worker")
    return {
        "client": parse_address(cluster.coordinator_addresses[0]),
        "paxos": parse_address(cluster.paxos_addresses[0]),
        "data": parse_address(worker["address"]),
    }


def _try(host: str, port: int, token: str, tls: TlsConfig | None) -> BaseException | None:
    async def go() -> None:
        conn = await connect(host, port, token=token, codec=_CODEC, config=WireConfig(tls=tls))
        await conn.close()

    try:
        asyncio.run(go())
    except Exception as exc:
        return exc
    return None


@pytest.mark.timeout(120)
def test_jobs_kv_storage_and_serving_over_tls(cluster: Any, tmp_path: Path) -> None:
    lines = [f"w{i % 17} w{i % 5} w{i % 3}" for i in range(3000)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    task = lep.DistributedTask(cluster, progress=False)
    counts = (
        task.read_text(str(path), partitions=4)
        .flat_map(str.split)
        .map(lambda w: (w, 1))
        .reduce_by_key(operator.add, partitions=3)  # a shuffle between the agents
        .collect()
    )
    assert dict(counts) == dict(collections.Counter(w for ln in lines for w in ln.split()))
    cluster.kv.put("tls-key", {"v": 1})
    assert cluster.kv.get("tls-key") == {"v": 1}
    blob = b"x" * 300_000
    cluster.storage.put("tls/blob", blob)
    assert cluster.storage.get("tls/blob") == blob
    # A separate handle, as a user's script makes it.
    with lep.connect(cluster.address, cluster.token, tls_dir=cluster.tls_dir) as other:
        assert other.kv.get("tls-key") == {"v": 1}

    (tmp_path / "m.py").write_text(MODEL)
    dep = lep.Deployment(f"{tmp_path / 'm.py'}:predict", replicas=1, cluster=cluster, name="tlsdep")
    dep.wait_ready(60)
    assert all(url.startswith("https://") for url in dep.urls)
    with lep.ServeClient(dep.urls, tls_dir=cluster.tls_dir, token=HTTP_TOKEN) as client:
        assert client.predict([[1, 2], [3, 4]]) == [3, 7]
    ca = ssl.create_default_context(cafile=str(Path(cluster.tls_dir) / "ca.pem"))
    bare = httpx.post(dep.urls[0] + "/predict", json={"instances": [[1]]}, verify=ca)
    assert bare.status_code == 401
    with pytest.raises(httpx.TransportError):  # plain HTTP to the HTTPS port: closed
        httpx.post(dep.urls[0].replace("https", "http") + "/predict", json={}, timeout=5)
    dep.delete()


def test_metrics_want_the_bearer_token_over_https(cluster: Any) -> None:
    urls = cluster.metrics_urls
    assert urls and all(u.startswith("https://") for u in urls)
    ca = ssl.create_default_context(cafile=str(Path(cluster.tls_dir) / "ca.pem"))
    for url in urls[:2]:
        assert httpx.get(url, verify=ca).status_code == 401
        wrong = httpx.get(url, verify=ca, headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401
        ok = httpx.get(url, verify=ca, headers={"authorization": f"Bearer {HTTP_TOKEN}"})
        assert ok.status_code == 200 and "lepton_" in ok.text


@pytest.mark.parametrize("kind", ["client", "paxos", "data"])
def test_refused_without_a_certificate_from_the_cluster_ca(
    cluster: Any, kind: str, tmp_path: Path
) -> None:
    host, port = _ports(cluster)[kind]
    tls = load_tls(cluster.tls_dir)
    assert _try(host, port, cluster.token, tls) is None  # the control: ours gets in
    # No client certificate at all (the CA trusted, so only the missing cert is wrong).
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.load_verify_locations(cafile=tls.ca_file)
    no_cert = TlsConfig(tls.directory, tls.server, bare, tls.http_server)
    assert isinstance(_try(host, port, cluster.token, no_cert), TlsError)
    # A certificate from another CA (ours trusted: the server's refusal is what counts).
    create(str(tmp_path / "other"))
    foreign = load_tls(str(tmp_path / "other"))
    mixed = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    mixed.load_cert_chain(foreign.cert_file, foreign.key_file)
    mixed.load_verify_locations(cafile=tls.ca_file)
    other_ca = TlsConfig(tls.directory, tls.server, mixed, tls.http_server)
    assert isinstance(_try(host, port, cluster.token, other_ca), TlsError)
    # And a client that trusts only the other CA refuses the cluster's server.
    assert isinstance(_try(host, port, cluster.token, foreign), TlsError)


@pytest.mark.parametrize("kind", ["client", "paxos", "data"])
def test_plain_tcp_to_a_tls_port_fails_fast_and_clearly(cluster: Any, kind: str) -> None:
    host, port = _ports(cluster)[kind]
    start = time.monotonic()
    exc = _try(host, port, cluster.token, None)
    assert time.monotonic() - start < 2.0  # not the 5 s handshake timeout
    assert isinstance(exc, ConnectionClosed) and "--tls-dir" in str(exc), exc


def test_a_cluster_client_without_tls_gets_a_clear_error(cluster: Any) -> None:
    plain = lep.Cluster(cluster.address, cluster.token)  # no tls_dir, none in the env
    start = time.monotonic()
    try:
        with pytest.raises(LeptonError, match="tls-dir"):
            plain.client.request(GetStatus(), 5.0)
    finally:
        plain.close()
    assert time.monotonic() - start < 6.0


def test_raw_socket_gets_nothing_readable(cluster: Any) -> None:
    """A TLS port answers a plain byte stream with nothing but TLS (no Hello frame)."""
    host, port = _ports(cluster)["client"]
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(b"LEPTON2\n")
        data = s.recv(64)
    assert not data.startswith(b"\x00\x00")  # no lepton frame header
