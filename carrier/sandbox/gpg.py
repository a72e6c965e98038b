"""GnuPG homes of the sandbox identities: an ed25519 signing key and a cv25519 encryption subkey each.

Keys are made once and kept, so fingerprints stay stable across ``up``/``down``. Carrier's public
key is imported into the other homes (they verify Carrier's replies); the others' keys are NOT
imported into Carrier's home: Carrier must find them itself (keyserver, attachment) when they enroll.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from carrier.errors import SandboxError
from carrier.sandbox import procs
from carrier.sandbox.layout import IDENTITIES, Layout, address

#: The unix socket path limit (sun_path) minus the NUL; gpg-agent's longest socket name is this one.
SOCKET_PATH_MAX = 107
LONGEST_SOCKET = "S.gpg-agent.browser"


def user_id(identity: str) -> str:
    """The OpenPGP user id of a sandbox identity, e.g. ``Ops <ops@example.test>``."""
    return f"{identity.capitalize()} <{address(identity)}>"


class GpgHomes:
    """Creates and reads the sandbox GnuPG homes (``layout.gnupg_home(identity)``)."""

    def __init__(self, layout: Layout, identities: tuple[str, ...] = IDENTITIES) -> None:
        self.layout = layout
        self.identities = identities

    def _gpg(self, identity: str, *args: str, what: str) -> str:
        gpg = procs.find_binary("gpg")
        home = self.layout.gnupg_home(identity)
        return procs.run_checked(
            [gpg, "--homedir", str(home), "--batch", "--no-tty", "--quiet", *args], what=what,
        )

    # --- setup ---

    def setup(self) -> dict[str, str]:
        """Make every home and key (kept when present), import Carrier's key into the others.

        Returns the fingerprint of each identity. The gpg-agents this started are stopped again:
        nothing keeps running after ``up`` that ``down`` does not know about.
        """
        parent = self.layout.root / "gnupg"
        parent.mkdir(parents=True, exist_ok=True)
        parent.chmod(0o700)
        try:
            fingerprints = {identity: self.ensure_key(identity) for identity in self.identities}
            if "carrier" in self.identities:
                carrier_key = self.public_key("carrier")
                for identity in self.identities:
                    if identity != "carrier":
                        self._import(identity, carrier_key)
        finally:
            self.kill_agents()
        return fingerprints

    def ensure_key(self, identity: str) -> str:
        """The fingerprint of ``identity``'s secret key, generating the key on first use."""
        home = self.layout.gnupg_home(identity)
        home.mkdir(parents=True, exist_ok=True)
        home.chmod(0o700)  # gpg warns about unsafe permissions otherwise
        self._check_socket_path(identity)
        existing = self._secret_fingerprint(identity)
        if existing is not None:
            return existing
        no_passphrase = ("--pinentry-mode", "loopback", "--passphrase", "")
        self._gpg(identity, *no_passphrase, "--quick-generate-key", user_id(identity),
                  "ed25519", "sign", "never", what=f"generating the {identity} GnuPG key")
        fingerprint = self._secret_fingerprint(identity)
        if fingerprint is None:
            raise SandboxError(
                f"gpg made no key in {home}: remove that directory and run `carrier sandbox up`"
            )
        self._gpg(identity, *no_passphrase, "--quick-add-key", fingerprint, "cv25519", "encr", "never",
                  what=f"adding the {identity} encryption subkey")
        return fingerprint

    def _check_socket_path(self, identity: str) -> None:
        gpgconf = procs.find_binary("gpgconf")
        home = self.layout.gnupg_home(identity)
        out = procs.run_checked([gpgconf, "--homedir", str(home), "--list-dirs", "socketdir"],
                                what="gpgconf --list-dirs")
        socket_dir = out.strip() or str(home)
        longest = os.path.join(socket_dir, LONGEST_SOCKET)
        if len(longest.encode()) > SOCKET_PATH_MAX:
            raise SandboxError(
                f"gpg-agent socket path {longest} is longer than {SOCKET_PATH_MAX} bytes: "
                "use a shorter sandbox dir (CARRIER_SANDBOX_DIR)"
            )

    def _secret_fingerprint(self, identity: str) -> str | None:
        """The primary fingerprint of the secret key whose user id is ``identity``'s address."""
        gpg = procs.find_binary("gpg")
        home = self.layout.gnupg_home(identity)
        # A missing key is exit status 2 with "No secret key": not an error here.
        done = subprocess.run(
            [gpg, "--homedir", str(home), "--batch", "--no-tty", "--with-colons",
             "--list-secret-keys", f"<{address(identity)}>"],
            capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL, timeout=60,
        )
        return _primary_fingerprint(done.stdout) if done.returncode == 0 else None

    def _import(self, identity: str, armored: str) -> None:
        # run_checked takes no stdin: import from a file (gpg re-imports an unchanged key as a no-op).
        tmp = self.layout.gnupg_home(identity) / "import.asc.tmp"
        tmp.write_text(armored)
        try:
            self._gpg(identity, "--import", str(tmp), what=f"importing a key into the {identity} home")
        finally:
            tmp.unlink(missing_ok=True)

    # --- reading ---

    def fingerprint(self, identity: str) -> str:
        """The fingerprint of ``identity`` (40 upper-case hex digits); SandboxError if it has no key."""
        found = self._secret_fingerprint(identity)
        if found is None:
            raise SandboxError(
                f"no GnuPG key for {identity} in {self.layout.gnupg_home(identity)}: run `carrier sandbox up`"
            )
        return found

    def public_key(self, identity: str) -> str:
        """``identity``'s armored public key (primary key, user id and subkey)."""
        armored = self._gpg(identity, "--armor", "--export", self.fingerprint(identity),
                            what=f"exporting the {identity} public key")
        if "BEGIN PGP PUBLIC KEY BLOCK" not in armored:
            raise SandboxError(f"gpg exported no public key for {identity}: run `carrier sandbox up` again")
        return armored

    def export_to_keyserver(self, identities: tuple[str, ...] | None = None) -> list[Path]:
        """Write ``<address>.asc`` into ``layout.keyserver_dir`` for each identity (default: all)."""
        out_dir = self.layout.keyserver_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        out_dir.chmod(0o755)
        written = []
        for identity in identities or self.identities:
            path = out_dir / f"{address(identity)}.asc"
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(self.public_key(identity))
            tmp.chmod(0o644)
            os.replace(tmp, path)
            written.append(path)
        self.kill_agents()
        return written

    # --- processes ---

    def kill_agents(self) -> None:
        """Stop the gpg-agent (and dirmngr) of every home, addressed by homedir, never by name."""
        gpgconf = procs.find_binary("gpgconf")
        for identity in self.identities:
            home = self.layout.gnupg_home(identity)
            if home.is_dir():
                procs.run_checked([gpgconf, "--homedir", str(home), "--kill", "all"],
                                  what=f"stopping the gpg-agent of {home}")


def _primary_fingerprint(colons: str) -> str | None:
    """The first ``fpr`` after the first ``sec``/``pub`` record of ``gpg --with-colons`` output."""
    seen_primary = False
    for line in colons.splitlines():
        fields = line.split(":")
        if fields[0] in ("sec", "pub"):
            seen_primary = True
        elif fields[0] == "fpr" and seen_primary and len(fields) > 9:
            return fields[9]
    return None
