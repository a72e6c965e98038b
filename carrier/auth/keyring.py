"""Carrier's GnuPG home, through python-gnupg: key inspection, careful import, and the private temp dir.

Every gpg call carries options that keep it local and deterministic: no key fetching of any kind
(``--no-auto-key-retrieve``, ``--no-auto-key-locate``, ``--no-auto-key-import``: a signature may
embed a key, and importing it silently would let a mail add keys), no dirmngr, and the ``always``
trust model: Carrier trusts a key because its fingerprint is configured or enrolled, never because
of web-of-trust signatures, so gpg's trust database plays no part.

Files gpg must read by name (a detached signature) are written to ``<state_dir>/tmp/pgp`` (mode
0700) under unique names and removed after use; nothing goes to a shared /tmp.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gnupg

from carrier.auth.errors import AuthError, KeyDiscoveryError

FINGERPRINT_RE = re.compile(r"[0-9A-F]{40}")
#: Options on every gpg call (see the module docstring).
GPG_OPTIONS = (
    "--no-auto-key-retrieve",
    "--no-auto-key-locate",
    "--no-auto-key-import",
    "--disable-dirmngr",
    "--trust-model",
    "always",
)
_UID_ADDRESS_RE = re.compile(r"<([^<>\s]+@[^<>\s]+)>\s*$")
_BARE_ADDRESS_RE = re.compile(r"[^<>\s@]+@[^<>\s@]+")


def normalize_fingerprint(value: str) -> str:
    """40 upper-case hex digits (spaces removed), or AuthError."""
    text = "".join(str(value).split()).upper()
    if not FINGERPRINT_RE.fullmatch(text):
        raise AuthError(f"{value!r} is not a key fingerprint: expected 40 hex digits", reason="malformed")
    return text


def normalize_address(address: str) -> str:
    """A mail address compared case-insensitively (what every mail system does in practice)."""
    return address.strip().casefold()


# --------------------------------------------------------------------------- key listings (pure)


@dataclass(frozen=True, slots=True)
class UserId:
    text: str
    email: str | None  # lower-cased address in the uid, if it has one
    validity: str  # gpg's validity letter: r = revoked, e = expired, others usable here


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """One primary key as gpg lists it (``--with-colons``)."""

    fingerprint: str
    validity: str
    created: float
    expires: float | None
    capabilities: str  # upper case letters: what the key as a whole can do now (S sign, E encrypt)
    uids: tuple[UserId, ...]
    subkeys: tuple[str, ...]  # subkey fingerprints

    @property
    def revoked(self) -> bool:
        return self.validity == "r"

    def expired(self, now: float) -> bool:
        return self.validity == "e" or (self.expires is not None and self.expires <= now)

    @property
    def can_sign(self) -> bool:
        return "S" in self.capabilities

    @property
    def can_encrypt(self) -> bool:
        return "E" in self.capabilities

    def has_address(self, address: str) -> bool:
        """True when a uid that is neither revoked nor expired carries exactly ``address``."""
        wanted = normalize_address(address)
        return any(u.email == wanted and u.validity not in ("r", "e") for u in self.uids)


def _unescape(field: str) -> str:
    """gpg's C-style escapes in colon listings (``\\x3a`` for a colon) back to text."""
    raw = re.sub(rb"\\x([0-9a-fA-F]{2})", lambda m: bytes([int(m.group(1), 16)]), field.encode("latin-1"))
    return raw.decode("utf-8", "replace")


def uid_address(uid: str) -> str | None:
    """The address of a user id: the ``<...>`` at its end, or the whole uid if it is an address."""
    match = _UID_ADDRESS_RE.search(uid)
    if match:
        return normalize_address(match.group(1))
    if _BARE_ADDRESS_RE.fullmatch(uid.strip()):
        return normalize_address(uid)
    return None


def _timestamp(field: str) -> float | None:
    if not field:
        return None
    if field.isdigit():
        return float(field)
    return None  # ISO 8601 form: not produced without --fixed-list-mode off; treat as unknown


@dataclass
class _KeyBuilder:
    validity: str
    created: float | None
    expires: float | None
    caps: str
    fingerprint: str = ""
    uids: list[UserId] = field(default_factory=list)
    subkeys: list[str] = field(default_factory=list)

    def build(self) -> KeyInfo:
        return KeyInfo(
            fingerprint=self.fingerprint,
            validity=self.validity,
            created=self.created or 0.0,
            expires=self.expires,
            capabilities=self.caps,
            uids=tuple(self.uids),
            subkeys=tuple(self.subkeys),
        )


def parse_colons(listing: str) -> list[KeyInfo]:
    """Primary keys from ``gpg --with-colons`` output (``pub``/``sec``, ``fpr``, ``uid``, ``sub``)."""
    builders: list[_KeyBuilder] = []
    current: _KeyBuilder | None = None
    expect_fpr = ""  # which record the next fpr line belongs to: "pub" or "sub"
    for line in listing.splitlines():
        fields = line.split(":")
        kind = fields[0]
        if kind in ("pub", "sec"):
            fields += [""] * (12 - len(fields))
            current = _KeyBuilder(
                validity=fields[1],
                created=_timestamp(fields[5]),
                expires=_timestamp(fields[6]),
                caps="".join(c for c in fields[11] if c.isupper()),
            )
            builders.append(current)
            expect_fpr = "pub"
        elif kind in ("sub", "ssb"):
            expect_fpr = "sub"
        elif kind == "fpr" and current is not None and len(fields) > 9:
            if expect_fpr == "pub":
                current.fingerprint = fields[9].upper()
            elif expect_fpr == "sub":
                current.subkeys.append(fields[9].upper())
            expect_fpr = ""
        elif kind == "uid" and current is not None and len(fields) > 9:
            text = _unescape(fields[9])
            current.uids.append(UserId(text, uid_address(text), fields[1]))
    return [b.build() for b in builders if b.fingerprint]


# --------------------------------------------------------------------------- the GnuPG home


def _private_dir(path: Path, what: str) -> Path:
    """``path`` as an existing directory with mode 0700 (created so; an existing looser one refused)."""
    try:
        path.mkdir(mode=0o700, parents=True)
        os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask
    except FileExistsError:
        pass
    except OSError as exc:
        raise AuthError(f"cannot create {what} {path}: {exc.strerror}", reason="setup") from exc
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise AuthError(f"{what} {path} is not a directory: remove it or configure another path",
                        reason="setup")
    if st.st_uid != os.geteuid():
        raise AuthError(f"{what} {path} belongs to uid {st.st_uid}, not to the user running Carrier "
                        f"({os.geteuid()}): fix its owner", reason="setup")
    if st.st_mode & 0o077:
        raise AuthError(f"{what} {path} has mode {st.st_mode & 0o777:04o}: run `chmod 700 {path}`",
                        reason="setup")
    return path


class Keyring:
    """Carrier's GnuPG home. Thread-safe: every call is its own gpg process; imports are serialised."""

    def __init__(self, home: Path, tmp_dir: Path, *, gpg_binary: str = "gpg") -> None:
        self.home = _private_dir(Path(home), "the GnuPG home")
        self.tmp_dir = _private_dir(Path(tmp_dir), "the private temp directory")
        self.gpg_binary = gpg_binary
        try:
            self.gpg = gnupg.GPG(gpgbinary=gpg_binary, gnupghome=str(self.home), options=list(GPG_OPTIONS))
        except (OSError, ValueError) as exc:
            raise AuthError(f"cannot run gpg ({exc}): install the gnupg package", reason="setup") from exc
        self._import_lock = threading.Lock()

    @classmethod
    def for_state_dir(cls, gnupg_home: Path, state_dir: Path) -> Keyring:
        """The keyring at ``gnupg_home`` with its temp files in ``<state_dir>/tmp/pgp``."""
        tmp_parent = Path(state_dir) / "tmp"
        try:
            tmp_parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise AuthError(f"cannot create {tmp_parent}: {exc.strerror}", reason="setup") from exc
        return cls(gnupg_home, tmp_parent / "pgp")

    # ----------------------------------------------------------------- temp files

    @contextlib.contextmanager
    def temp_file(self, data: bytes, suffix: str = "") -> Iterator[Path]:
        """``data`` in a new file (mode 0600, unique name) in the private temp dir, removed afterwards."""
        fd, name = tempfile.mkstemp(prefix="c-", suffix=suffix, dir=self.tmp_dir)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            yield Path(name)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)

    @contextlib.contextmanager
    def scratch_home(self) -> Iterator[gnupg.GPG]:
        """A throw-away GnuPG home in the private temp dir (to look at keys before trusting them)."""
        path = Path(tempfile.mkdtemp(prefix="h-", dir=self.tmp_dir))
        try:
            yield gnupg.GPG(gpgbinary=self.gpg_binary, gnupghome=str(path),
                            options=[*GPG_OPTIONS, "--no-autostart"])
        finally:
            shutil.rmtree(path, ignore_errors=True)

    # ----------------------------------------------------------------- keys

    def inspect(self, key_data: bytes) -> list[KeyInfo]:
        """The keys in ``key_data`` (armored or binary) without importing anything."""
        # Imported into a scratch home and listed there: gpg's --dry-run listing of an expired key
        # fails without a trust database, and the scratch home is thrown away anyway.
        with self.scratch_home() as scratch:
            scratch.import_keys(key_data)
            result = scratch.list_keys()
        return parse_colons(bytes(result.data).decode("latin-1"))

    def key(self, fingerprint: str) -> KeyInfo | None:
        """The public key with this primary fingerprint in Carrier's keyring, or None."""
        fpr = normalize_fingerprint(fingerprint)
        result = self.gpg.list_keys(keys=[fpr])
        for info in parse_colons(bytes(result.data).decode("latin-1")):
            if info.fingerprint == fpr:
                return info
        return None

    def secret_fingerprint(self, address: str) -> str | None:
        """The primary fingerprint of a usable secret key with a uid of exactly ``address``."""
        result = self.gpg.list_keys(secret=True)
        for info in parse_colons(bytes(result.data).decode("latin-1")):
            if info.has_address(address) and info.can_sign and not info.revoked:
                return info.fingerprint
        return None

    def export(self, fingerprint: str) -> str:
        """The armored public key ``fingerprint`` (for a key attachment)."""
        fpr = normalize_fingerprint(fingerprint)
        armored = self.gpg.export_keys([fpr], armor=True)
        text = armored if isinstance(armored, str) else bytes(armored).decode("ascii", "replace")
        if "BEGIN PGP PUBLIC KEY BLOCK" not in text:
            raise AuthError(f"no public key {fpr} in {self.home}", reason="unknown_key")
        return text

    def import_key(self, key_data: bytes, fingerprint: str, address: str) -> KeyInfo:
        """Import exactly the key ``fingerprint`` from ``key_data``, keeping only uids of ``address``.

        The data goes to a scratch home first; only that one key (minimal: self-signatures only) is
        exported from there into Carrier's keyring, so other keys or third-party signatures in the
        data never arrive. The caller has already checked uid, expiry and revocation
        (``keyserver.choose_key``); they are checked again on what was imported.
        """
        fpr = normalize_fingerprint(fingerprint)
        with self.scratch_home() as scratch:
            scratch.import_keys(key_data)
            minimal = scratch.export_keys([fpr], armor=False, minimal=True)
        if not minimal:
            raise KeyDiscoveryError(f"key {fpr} is not in the key data", reason="bad_key_data")
        mbox = normalize_address(address)
        with self._import_lock:
            result = self.gpg.import_keys(minimal, extra_args=["--import-filter", f"keep-uid=mbox = {mbox}"])
        if not any(str(r.get("fingerprint", "")).upper() == fpr for r in result.results):
            raise KeyDiscoveryError(f"gpg did not import key {fpr}: {_last_line(result.stderr)}",
                                    reason="bad_key_data")
        info = self.key(fpr)
        if info is None or not info.has_address(address):
            raise KeyDiscoveryError(f"key {fpr} has no uid with {address} after import",
                                    reason="no_matching_uid")
        return info

    def stop_agent(self) -> None:
        """Stop the gpg-agent of this home (signing starts one); addressed by homedir, never by name."""
        gpgconf = shutil.which("gpgconf")
        if gpgconf:
            subprocess.run([gpgconf, "--homedir", str(self.home), "--kill", "all"],
                           capture_output=True, check=False, timeout=30)


def _last_line(text: str | None) -> str:
    lines = [ln for ln in (text or "").splitlines() if ln and not ln.startswith("[GNUPG:]")]
    return lines[-1] if lines else "no reason given"


def status_lines(stderr: str | None) -> list[tuple[str, str]]:
    """``(keyword, rest)`` of every ``[GNUPG:]`` status line gpg wrote."""
    out: list[tuple[str, str]] = []
    for line in (stderr or "").splitlines():
        if line.startswith("[GNUPG:] "):
            keyword, _, rest = line[9:].partition(" ")
            out.append((keyword, rest.strip()))
    return out


def fingerprints_in(keys: Sequence[KeyInfo]) -> list[str]:
    return [k.fingerprint for k in keys]
