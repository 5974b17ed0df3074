"""``lepton certs create``: file modes from creation, subjectAltNames, no overwrite,
and the files load as the contexts the programs use."""

from __future__ import annotations

import ipaddress
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509

from lepton_ai.cli import main
from lepton_ai.wire.certs import create
from lepton_ai.wire.tls import load_tls


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_create_makes_private_keys_and_the_sans(tmp_path: Path) -> None:
    d = tmp_path / "tls"
    old = os.umask(0o022)  # a usual umask: the keys must be 0600 regardless
    try:
        assert (
            main(["certs", "create", "--dir", str(d), "--hosts", "10.1.2.3,node-a", "--days", "30"])
            == 0
        )
    finally:
        os.umask(old)
    assert _mode(d) == 0o700
    assert _mode(d / "node.key") == 0o600 and _mode(d / "ca.key") == 0o600
    assert _mode(d / "node.pem") == 0o644 and _mode(d / "ca.pem") == 0o644
    cert = x509.load_pem_x509_certificate((d / "node.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "node-a"}
    ips = set(san.get_values_for_type(x509.IPAddress))
    assert ips == {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("10.1.2.3")}
    ca = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert 29 <= days <= 30
    tls = load_tls(str(d))
    assert tls.server.verify_mode.name == "CERT_REQUIRED"


def test_create_never_overwrites_and_signs_with_an_existing_ca(tmp_path: Path) -> None:
    create(str(tmp_path / "a"))
    with pytest.raises(FileExistsError):
        create(str(tmp_path / "a"))
    written = create(str(tmp_path / "b"), ["h2"], ca_dir=str(tmp_path / "a"))
    assert not (tmp_path / "b" / "ca.key").exists()  # the CA's key stays where it was
    assert {Path(p).name for p in written} == {"node.pem", "node.key", "ca.pem"}
    ca = x509.load_pem_x509_certificate((tmp_path / "a" / "ca.pem").read_bytes())
    node = x509.load_pem_x509_certificate((tmp_path / "b" / "node.pem").read_bytes())
    node.verify_directly_issued_by(ca)


def test_create_checks_its_bounds(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="days"):
        create(str(tmp_path / "x"), days=0)
    with pytest.raises(ValueError, match="hosts"):
        create(str(tmp_path / "y"), [f"h{i}" for i in range(300)])
