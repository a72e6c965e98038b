"""Self-signed TLS certificates (for the sandbox and `carrier cert`), made without an openssl subprocess."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _san_entry(host: str) -> x509.GeneralName:
    """An IP address SAN for literal addresses, a DNS name SAN otherwise."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` so that the file never exists with a wider mode than ``mode``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)  # umask may have narrowed it; O_CREAT does not widen an existing file
    os.replace(tmp, path)


def make_self_signed(cert: Path, key: Path, *, hosts: Sequence[str], days: int = 825) -> None:
    """Write an EC P-256 key (mode 0600) and a self-signed certificate (0644) valid for ``hosts``.

    ``hosts`` are DNS names or IP addresses; the first one is also the subject CN. Existing
    files are overwritten: whether to keep an existing pair is the caller's choice.
    """
    if not hosts:
        raise ValueError("make_self_signed needs at least one host name or address")
    private_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, hosts[0]),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Carrier self-signed"),
    ])
    # Backdate a little so a slightly slow clock on the client does not reject a fresh cert.
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san_entry(h) for h in hosts]), critical=False)
        # CA:TRUE lets clients trust this one certificate directly as its own anchor.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(private_key.public_key()), critical=False)
        # Strict verifiers (Python 3.13+ VERIFY_X509_STRICT) want an AKI even on a self-signed cert.
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(private_key.public_key()), critical=False
        )
    )
    certificate = builder.sign(private_key, hashes.SHA256())
    key_pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write(key, key_pem, 0o600)
    _write(cert, certificate.public_bytes(serialization.Encoding.PEM), 0o644)


def cert_fingerprint_sha256(cert: Path) -> str:
    """SHA-256 fingerprint of a PEM certificate as colon-separated upper-case hex (``AB:CD:...``)."""
    certificate = x509.load_pem_x509_certificate(cert.read_bytes())
    return certificate.fingerprint(hashes.SHA256()).hex(":").upper()


def client_context(*, ca_file: Path | None = None, allow_self_signed: bool = False) -> ssl.SSLContext:
    """The TLS context every Carrier client connection uses (IMAP, SMTP, keyserver, MCP client).

    Verification is on: system CAs plus ``ca_file`` when given (how a self-signed server is
    trusted properly). ``allow_self_signed`` turns verification off for a server the operator
    explicitly opted in for; it is never the default.
    """
    context = ssl.create_default_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    if allow_self_signed:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
