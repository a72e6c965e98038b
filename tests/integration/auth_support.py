"""Real GnuPG identities for the trust-layer tests: made with the gpg CLI, independent of Carrier's code.

``KeyFactory`` makes throw-away GnuPG homes (ed25519 + cv25519, fast) for extra people: another
address, an expired key, a revoked key, an attacker with a victim's address, a signing subkey.
``GpgUser`` signs like a mail client would (clear-signed text, detached PGP/MIME signatures) so the
tests check Carrier against what real clients send. Every gpg-agent started is stopped by homedir.
"""

from __future__ import annotations

import dataclasses
import os
import quopri
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any

from carrier.auth.service import Trust
from carrier.config import Config, User, load_config
from carrier.sandbox.manager import Sandbox
from carrier.store import Store

NO_PASSPHRASE = ("--pinentry-mode", "loopback", "--passphrase", "")


def gpg(home: Path, *args: str, data: bytes | None = None, check: bool = True) -> bytes:
    done = subprocess.run(
        ["gpg", "--homedir", str(home), "--batch", "--no-tty", "--quiet", *args],
        input=data if data is not None else b"", capture_output=True, timeout=60, check=False,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"gpg {' '.join(args)} failed: {done.stderr.decode(errors='replace')}")
    return done.stdout


def primary_fingerprint(home: Path, address: str) -> str:
    out = gpg(home, "--with-colons", "--list-keys", f"<{address}>").decode()
    seen_pub = False
    for line in out.splitlines():
        fields = line.split(":")
        if fields[0] == "pub":
            seen_pub = True
        elif fields[0] == "fpr" and seen_pub:
            return fields[9]
    raise AssertionError(f"no key for {address} in {home}")


@dataclass
class GpgUser:
    """One person with a GnuPG home: signs, exports, decrypts."""

    home: Path
    address: str
    fingerprint: str
    name: str = "user"

    def public_key(self) -> bytes:
        return gpg(self.home, "--armor", "--export", self.fingerprint)

    def clearsign(self, text: str, *, at: float | None = None, key: str | None = None) -> bytes:
        args = [*NO_PASSPHRASE, "--local-user", key or self.fingerprint, "--clearsign"]
        if at is not None:
            args = ["--faked-system-time", f"{int(at)}!", *args]
        return gpg(self.home, *args, data=text.encode())

    def detach_sign(self, data: bytes, *, at: float | None = None) -> bytes:
        args = [*NO_PASSPHRASE, "--local-user", self.fingerprint, "--armor", "--detach-sign"]
        if at is not None:
            args = ["--faked-system-time", f"{int(at)}!", *args]
        return gpg(self.home, *args, data=data)

    def decrypt(self, data: bytes) -> bytes:
        return gpg(self.home, *NO_PASSPHRASE, "--decrypt", data=data)

    def verify_detached(self, data: bytes, signature: bytes) -> str:
        """gpg's status lines for a detached signature (Carrier's replies, checked by the user)."""
        with tempfile.NamedTemporaryFile(dir=self.home, suffix=".sig") as sig:
            sig.write(signature)
            sig.flush()
            done = subprocess.run(
                ["gpg", "--homedir", str(self.home), "--batch", "--status-fd", "1", "--verify",
                 sig.name, "-"],
                input=data, capture_output=True, timeout=60, check=False,
            )
        return done.stdout.decode()

    def import_key(self, armored: bytes) -> None:
        gpg(self.home, "--import", data=armored)

    def stop_agent(self) -> None:
        subprocess.run(["gpgconf", "--homedir", str(self.home), "--kill", "all"],
                       capture_output=True, check=False, timeout=30)


def headers_block(sender: str, to: str, subject: str, extra: Sequence[tuple[str, str]] = ()) -> list[str]:
    lines = [
        f"From: {sender}",
        f"To: {to}",
        f"Subject: {subject}",
        f"Date: {format_datetime(datetime.now(UTC))}",
        f"Message-ID: {make_msgid(domain='example.test')}",
        "MIME-Version: 1.0",
    ]
    lines += [f"{k}: {v}" for k, v in extra]
    return lines


def text_entity(text: str, *, qp: bool = True) -> bytes:
    """A text/plain MIME entity as a client sends it inside multipart/signed (CRLF)."""
    if qp:
        body = quopri.encodestring(text.encode(), quotetabs=False).replace(b"\n", b"\r\n")
        head = b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n"
    else:
        body = text.encode().replace(b"\n", b"\r\n")
        head = b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 7bit\r\n"
    return head + b"\r\n" + body


def pgp_mime(
    user: GpgUser,
    text: str,
    *,
    sender: str | None = None,
    to: str = "carrier@example.test",
    subject: str = "command",
    entity: bytes | None = None,
    signed_entity: bytes | None = None,
    signature: bytes | None = None,
    at: float | None = None,
    boundary: str = "sig-boundary-4711",
) -> bytes:
    """A PGP/MIME (RFC 3156) mail. ``entity`` is what is sent as the first part; ``signed_entity``
    what the signature is made over (default: the same), so tests can send a different body."""
    entity = entity if entity is not None else text_entity(text)
    sig = signature if signature is not None else user.detach_sign(
        signed_entity if signed_entity is not None else entity, at=at)
    head = headers_block(sender or user.address, to, subject)
    head.append(f'Content-Type: multipart/signed; micalg=pgp-sha256; protocol="application/pgp-signature"; '
                f'boundary="{boundary}"')
    b = boundary.encode()
    body = (
        b"This is an OpenPGP/MIME signed message\r\n--" + b + b"\r\n" + entity + b"\r\n--" + b + b"\r\n"
        b'Content-Type: application/pgp-signature; name="signature.asc"\r\n\r\n'
        + sig.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + b"\r\n--" + b + b"--\r\n"
    )
    return "\r\n".join(head).encode() + b"\r\n\r\n" + body


def inline_mail(
    user: GpgUser | None,
    text: str,
    *,
    sender: str | None = None,
    to: str = "carrier@example.test",
    subject: str = "command",
    body: bytes | None = None,
    at: float | None = None,
) -> bytes:
    """A text/plain mail whose body is ``text`` clear-signed by ``user`` (or ``body`` as given)."""
    if body is None:
        assert user is not None
        body = user.clearsign(text, at=at)
    address = sender or (user.address if user else "nobody@example.test")
    head = headers_block(address, to, subject)
    head += ["Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: 8bit"]
    return "\r\n".join(head).encode() + b"\r\n\r\n" + body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


class KeyFactory:
    """Throw-away GnuPG homes under a private directory in /var/tmp (short paths: agent sockets)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="ck-", dir="/var/tmp"))
        self.root.chmod(0o700)
        self.users: list[GpgUser] = []
        self._count = 0

    def _home(self) -> Path:
        self._count += 1
        home = self.root / str(self._count)
        home.mkdir(mode=0o700)
        return home

    def make(
        self,
        address: str,
        *,
        name: str = "Someone",
        expired: bool = False,
        revoked: bool = False,
        signing_subkey: bool = False,
        encryption: bool = True,
        extra_uids: Sequence[str] = (),
        born: float = 0.0,
    ) -> GpgUser:
        """A new key for ``address``.

        ``expired``: made two days ago, valid for one day (so it expired yesterday).
        ``revoked``: revoked after creation with gpg's own revocation certificate.
        ``born``: made that many seconds ago (to sign with an old signature time).
        """
        home = self._home()
        uid = f"{name} <{address}>"
        timing: list[str] = []
        if born:
            timing = ["--faked-system-time", f"{int(time.time() - born)}!"]
        if expired:
            timing = ["--faked-system-time", f"{int(time.time()) - 2 * 86400}!"]
        expiry = "1d" if expired else "never"
        gpg(home, *timing, *NO_PASSPHRASE, "--quick-generate-key", uid, "ed25519", "sign", expiry)
        fpr = primary_fingerprint(home, address)
        if encryption:
            gpg(home, *timing, *NO_PASSPHRASE, "--quick-add-key", fpr, "cv25519", "encr", expiry)
        if signing_subkey:
            gpg(home, *timing, *NO_PASSPHRASE, "--quick-add-key", fpr, "ed25519", "sign", expiry)
        for extra in extra_uids:
            gpg(home, *timing, *NO_PASSPHRASE, "--quick-add-uid", fpr, extra)
        user = GpgUser(home, address, fpr, name)
        if revoked:
            self.revoke(user)
        self.users.append(user)
        return user

    def revoke(self, user: GpgUser) -> None:
        cert = (user.home / "openpgp-revocs.d" / f"{user.fingerprint}.rev").read_text()
        # gpg writes the certificate with a leading ':' so that it is not imported by accident.
        gpg(user.home, "--import", data=cert.replace(":-----BEGIN", "-----BEGIN").encode())

    def adopt(self, home: Path, address: str, name: str = "user") -> GpgUser:
        """A user for an existing home (a sandbox identity); its agent is stopped at close()."""
        user = GpgUser(home, address, primary_fingerprint(home, address), name)
        self.users.append(user)
        return user

    def close(self) -> None:
        for user in self.users:
            user.stop_agent()
        shutil.rmtree(self.root, ignore_errors=True)


def copy_home(source: Path, dest_parent: Path, name: str = "carrier") -> Path:
    """A private copy of a GnuPG home (without agent sockets): a keyring a test may change."""
    dest = dest_parent / name
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("S.*", "*.lock", ".#*"))
    dest.chmod(0o700)
    return dest


# --------------------------------------------------------------------------- a Carrier over the sandbox


@dataclass
class World:
    """Carrier's trust layer over the sandbox: a private copy of Carrier's GnuPG home and store."""

    config: Config
    store: Store
    trust: Trust
    state: Path

    def close(self) -> None:
        if "keyring" in self.trust.__dict__:  # built: signing may have started its agent
            self.trust.keyring.stop_agent()
        self.store.close()
        shutil.rmtree(self.state, ignore_errors=True)


def make_world(
    sandbox: Sandbox,
    *,
    users: Sequence[User] = (),
    wkd: bool = False,
    wkd_url: str | None = None,
    keyserver_url: str | None = None,
    clock: Callable[[], float] | None = None,
    **auth: Any,
) -> World:
    layout = sandbox.layout
    state = Path(tempfile.mkdtemp(prefix="cs-", dir="/var/tmp"))
    state.chmod(0o700)
    home = copy_home(layout.gnupg_home("carrier"), state, "gnupg")
    base = load_config(layout.config_file, os.environ)
    keyserver = dataclasses.replace(base.keyserver, wkd=wkd, wkd_url=wkd_url, timeout=3.0,
                                    url=keyserver_url or base.keyserver.url)
    config = dataclasses.replace(
        base, state_dir=state, gnupg_home=home, users=(*base.users, *users), keyserver=keyserver,
        auth=dataclasses.replace(base.auth, **auth),
    )
    store = Store.open(state, clock=clock or time.time)
    return World(config, store, Trust(config, store), state)


def expire_encryption_subkey(user: GpgUser, scratch: Path) -> bytes:
    """The user's public key with its encryption subkey expired (made in a copy of the
    user's home, as the user would do it with their own gpg)."""
    home = copy_home(user.home, scratch, "expired")
    listing = gpg(home, "--with-colons", "--list-keys", user.fingerprint).decode().splitlines()
    sub = next(listing[i + 1].split(":")[9] for i, line in enumerate(listing)
               if line.startswith("sub:") and "e" in line.split(":")[11])
    # A new binding signature (newer than the one it replaces) that lets the subkey expire in 1 s.
    gpg(home, *NO_PASSPHRASE, "--quick-set-expire", user.fingerprint, "seconds=1", sub)
    time.sleep(2)
    try:
        return gpg(home, "--armor", "--export", user.fingerprint)
    finally:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True,
                       check=False, timeout=30)
