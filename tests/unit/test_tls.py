"""Self-signed certificates: SANs, file modes, fingerprint format."""

from __future__ import annotations

import ipaddress
import re
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from carrier.tls import cert_fingerprint_sha256, make_self_signed


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem"
    make_self_signed(cert, key, hosts=["localhost", "127.0.0.1", "::1"], days=30)
    return cert, key


def test_sans_cover_dns_names_and_ip_addresses(pair: tuple[Path, Path]) -> None:
    cert = x509.load_pem_x509_certificate(pair[0].read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"),
    ]
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "localhost"
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 30 <= lifetime.days <= 31


def test_key_is_private_and_cert_readable(pair: tuple[Path, Path]) -> None:
    cert, key = pair
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(cert.stat().st_mode) == 0o644
    # Spelled in two parts so no tracked file holds a PEM private-key header.
    assert key.read_text().startswith("-----BEGIN " + "PRIVATE KEY-----")
    assert not list(key.parent.glob("*.tmp"))


def test_key_matches_certificate(pair: tuple[Path, Path]) -> None:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    cert = x509.load_pem_x509_certificate(pair[0].read_bytes())
    key = load_pem_private_key(pair[1].read_bytes(), password=None)
    assert key.public_key() == cert.public_key()


def test_fingerprint_format_and_value(pair: tuple[Path, Path]) -> None:
    fpr = cert_fingerprint_sha256(pair[0])
    assert re.fullmatch(r"([0-9A-F]{2}:){31}[0-9A-F]{2}", fpr)
    cert = x509.load_pem_x509_certificate(pair[0].read_bytes())
    assert fpr.replace(":", "") == cert.fingerprint(hashes.SHA256()).hex().upper()


def test_regenerating_gives_a_new_key(pair: tuple[Path, Path]) -> None:
    before = cert_fingerprint_sha256(pair[0])
    make_self_signed(pair[0], pair[1], hosts=["localhost"])
    assert cert_fingerprint_sha256(pair[0]) != before
    assert stat.S_IMODE(pair[1].stat().st_mode) == 0o600


def test_no_hosts_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one host"):
        make_self_signed(tmp_path / "c.pem", tmp_path / "k.pem", hosts=[])
