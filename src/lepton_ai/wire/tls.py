"""Optional mutual TLS for every wire connection, and HTTPS for the HTTP endpoints.

A cluster's TLS directory (``lepton certs create --dir DIR``) holds the cluster
CA's certificate and one node key pair signed by it::

    ca.pem     the CA certificate: the only issuer a peer's certificate may have
    node.pem   this node's certificate (subjectAltNames: its host names and IPs)
    node.key   its private key (0600)
    ca.key     the CA's key: needed to sign more node certificates, not to run

A program finds the directory in ``$LEPTON_TLS_DIR`` (``--tls-dir`` on every
``lepton`` command sets it, and the children inherit it), so TLS is switched on
in one place: ``WireConfig.tls`` defaults to ``tls_from_env()``, and every
``connect`` and ``serve`` of the process then speaks TLS. A client in a process
that talks to several clusters (tests, ``lep.connect(tls_dir=...)``) passes its
``TlsConfig`` explicitly instead.

On the wire both sides present their certificate and verify the peer's against
the cluster CA (the client also checks the server's address against the
certificate's subjectAltNames), then the HMAC token handshake runs inside the
encrypted channel: a stolen certificate alone does not let anyone in, nor does a
stolen token from a host without the key.
"""

from __future__ import annotations

import functools
import os
import ssl
from dataclasses import dataclass
from typing import Any

TLS_DIR_ENV = "LEPTON_TLS_DIR"
CA_CERT = "ca.pem"
CA_KEY = "ca.key"
NODE_CERT = "node.pem"
NODE_KEY = "node.key"
# Contexts loaded per process: one cluster normally, a few in a test process.
_LOADED_MAX = 8


@dataclass(frozen=True, eq=False)
class TlsConfig:
    """The SSL contexts of one TLS directory (load with ``load_tls``)."""

    directory: str
    server: ssl.SSLContext  # wire servers: a client certificate from the CA is required
    client: ssl.SSLContext  # wire clients and HTTPS clients: present ours, verify theirs
    http_server: ssl.SSLContext  # HTTPS for browsers and Prometheus: no client certificate

    @property
    def ca_file(self) -> str:
        return os.path.join(self.directory, CA_CERT)

    @property
    def cert_file(self) -> str:
        return os.path.join(self.directory, NODE_CERT)

    @property
    def key_file(self) -> str:
        return os.path.join(self.directory, NODE_KEY)


def load_tls(directory: str) -> TlsConfig:
    """The contexts of ``directory`` (cached per path: a context is costly to build
    and reused for every connection). ``FileNotFoundError`` names a missing file."""
    return _load(os.path.realpath(directory))


def tls_from_env() -> TlsConfig | None:
    """``load_tls($LEPTON_TLS_DIR)``, or None (plain TCP) when it is unset."""
    directory = os.environ.get(TLS_DIR_ENV)
    return load_tls(directory) if directory else None


def http_scheme(tls: TlsConfig | None) -> str:
    return "http" if tls is None else "https"


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def replica_tls(host: str) -> TlsConfig | None:
    """The TLS of a model replica bound to ``host``: the process's, unless it is a
    loopback address. A replica on loopback is reached only by its own node's
    balancer (the agent's child, like the executors on their socketpair): TLS there
    would cost a second encryption per request and keep out no one who cannot
    already read the node's key. Off-host reachable, it wants a client certificate:
    only the cluster's balancers may call it, the bearer token is checked there."""
    return None if host in LOOPBACK_HOSTS else tls_from_env()


def replica_ssl() -> ssl.SSLContext | None:
    """The client context a balancer dials an ``https`` replica with."""
    tls = tls_from_env()
    return None if tls is None else tls.client


@functools.lru_cache(maxsize=_LOADED_MAX)
def _load(directory: str) -> TlsConfig:
    for name in (CA_CERT, NODE_CERT, NODE_KEY):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"TLS directory {directory} has no {name} (make one with `lepton certs create`)"
            )
    ca, cert, key = (os.path.join(directory, n) for n in (CA_CERT, NODE_CERT, NODE_KEY))
    return TlsConfig(
        directory=directory,
        server=_wire_server(ca, cert, key),
        client=_client(ca, cert, key),
        http_server=_http_server(cert, key),
    )


def _wire_server(ca: str, cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # Both ends are lepton programs: TLS 1.3 only (one round trip less, no legacy suites).
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(cafile=ca)
    ctx.verify_mode = ssl.CERT_REQUIRED  # mutual: a peer without a CA-signed cert is refused
    return ctx


def _client(ca: str, cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED
    # 1.2 as the floor, not 1.3: the same context dials HTTPS replicas under uvicorn.
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(cafile=ca)
    return ctx


def _http_server(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # Browsers, curl and Prometheus: TLS 1.2 still common; they authenticate with
    # the bearer token (or the dashboard's login), not a client certificate.
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


def uvicorn_tls_options(tls: TlsConfig | None, client_cert: bool = False) -> dict[str, Any]:
    """``uvicorn.Config`` arguments for HTTPS with the node certificate (none: HTTP).
    ``client_cert``: require a certificate from the cluster CA (replicas, which
    only the cluster's balancers call)."""
    if tls is None:
        return {}
    options: dict[str, Any] = {"ssl_certfile": tls.cert_file, "ssl_keyfile": tls.key_file}
    if client_cert:
        options |= {"ssl_ca_certs": tls.ca_file, "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return options


def describe_ssl_error(exc: ssl.SSLError) -> str:
    """A one-line reason with a hint at the usual cause."""
    reason = str(exc.reason or exc)
    hints = {
        "WRONG_VERSION_NUMBER": "the peer does not speak TLS (started without --tls-dir?)",
        "CERTIFICATE_VERIFY_FAILED": "its certificate is not from this cluster's CA, "
        "or does not name this address (lepton certs create --hosts)",
        "TLSV13_ALERT_CERTIFICATE_REQUIRED": "it wants a client certificate (--tls-dir)",
        "SSLV3_ALERT_BAD_CERTIFICATE": "it refused our certificate (another cluster's CA?)",
        "TLSV1_ALERT_UNKNOWN_CA": "it refused our certificate (another cluster's CA?)",
    }
    verify = getattr(exc, "verify_message", None)
    detail = f"{reason}: {verify}" if verify else reason
    return f"{detail} ({hints[reason]})" if reason in hints else detail
