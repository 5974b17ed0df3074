"""A cluster CA and a node certificate signed by it (``lepton certs create``).

    lepton certs create --dir DIR [--hosts h1,h2,10.0.0.5] [--days 825]

The layout is the one ``wire.tls`` reads (``ca.pem``, ``node.pem``, ``node.key``,
plus ``ca.key`` for signing more). One node key pair for the whole cluster keeps
the setup to one copy of one directory to each machine; its subjectAltNames list
every host given (127.0.0.1 and localhost always), which is what clients check
the server's address against. With ``--ca CA_DIR`` a new node pair is signed by an
existing CA instead (a machine added later, or a key per machine).

Keys are ECDSA P-256: the fastest common choice for handshakes, on both sides.
Private keys are created 0600 with ``O_EXCL`` (never readable by others, not even
between ``open`` and a ``chmod``), and nothing existing is overwritten.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lepton_ai.wire.tls import CA_CERT, CA_KEY, NODE_CERT, NODE_KEY

ALWAYS_HOSTS = ("127.0.0.1", "localhost")
HOSTS_MAX = 256  # subjectAltNames in one certificate
DAYS_MAX = 3650
CA_DAYS = 3650
PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644
_BACKDATE = datetime.timedelta(minutes=5)  # tolerate clocks a little behind ours


def create(
    directory: str, hosts: Iterable[str] = (), days: int = 825, ca_dir: str | None = None
) -> list[str]:
    """Write a CA (unless ``ca_dir`` has one) and a node pair into ``directory``;
    the paths written. ``FileExistsError`` if any target file exists."""
    names = _hosts(hosts)
    if not 1 <= days <= DAYS_MAX:
        raise ValueError(f"--days must be in 1..{DAYS_MAX}, got {days}")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    targets = [NODE_CERT, NODE_KEY] + ([] if ca_dir else [CA_CERT, CA_KEY])
    for name in targets:
        if os.path.exists(os.path.join(directory, name)):
            raise FileExistsError(f"{os.path.join(directory, name)} exists; not overwritten")
    if ca_dir is None:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _ca_certificate(ca_key)
        _write(directory, CA_KEY, _key_pem(ca_key), PRIVATE_MODE)
        _write(directory, CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE)
    else:
        ca_key, ca_cert = _load_ca(ca_dir)
        with open(os.path.join(ca_dir, CA_CERT), "rb") as f:
            _write(directory, CA_CERT, f.read(), PUBLIC_MODE)
    node_key = ec.generate_private_key(ec.SECP256R1())
    node_cert = _node_certificate(node_key, ca_key, ca_cert, names, days)
    _write(directory, NODE_KEY, _key_pem(node_key), PRIVATE_MODE)
    _write(directory, NODE_CERT, node_cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE)
    return [os.path.join(directory, n) for n in (*targets, *([CA_CERT] if ca_dir else []))]


def _hosts(hosts: Iterable[str]) -> list[str]:
    names: list[str] = []
    for given in [*ALWAYS_HOSTS, *hosts]:
        name = given.strip()
        if name and name not in names:
            names.append(name)
    if len(names) > HOSTS_MAX:
        raise ValueError(f"at most {HOSTS_MAX} hosts in one certificate, got {len(names)}")
    return names


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(datetime.UTC)
    return now - _BACKDATE, now + datetime.timedelta(days=days)


def _ca_certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lepton cluster CA")])
    start, end = _validity(CA_DAYS)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )


def _node_certificate(
    key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    names: list[str],
    days: int,
) -> x509.Certificate:
    start, end = _validity(days)
    usage = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lepton node")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(min(end, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        .add_extension(_san(names), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), False
        )
        .sign(ca_key, hashes.SHA256())
    )


def _load_ca(ca_dir: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    with open(os.path.join(ca_dir, CA_KEY), "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    with open(os.path.join(ca_dir, CA_CERT), "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{ca_dir}/{CA_KEY} is not an EC key made by lepton certs create")
    return key, cert


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(directory: str, name: str, data: bytes, mode: int) -> None:
    """Create ``name`` with ``mode`` from the first byte (O_EXCL: never overwrite).
    The umask can only remove bits, which for keys is what we want."""
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
