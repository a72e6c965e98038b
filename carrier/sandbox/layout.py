"""Where every sandbox file lives and which loopback ports it uses: the one place for these facts."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

DOMAIN = "example.test"
#: Identities with a mailbox and a GnuPG home. ``carrier`` is Carrier's own account.
IDENTITIES: tuple[str, ...] = ("carrier", "ops", "admin", "newbie")
#: Inventory hosts: name -> loopback address (each gets its own sshd and host key).
HOSTS: dict[str, str] = {"web1": "127.0.0.11", "web2": "127.0.0.12", "db1": "127.0.0.13"}
GROUPS: dict[str, tuple[str, ...]] = {"web": ("web1", "web2"), "db": ("db1",)}
#: Unix account the sandbox sshd hosts log in as (created when missing; shell /bin/sh).
LOGIN_USER = "carrier-sbx"
LOOPBACK = "127.0.0.1"


def address(identity: str) -> str:
    """The mail address of a sandbox identity, e.g. ``ops@example.test``."""
    return f"{identity}@{DOMAIN}"


@dataclass(frozen=True)
class Ports:
    """TCP ports of the sandbox services; ``offset`` shifts all of them (two sandboxes side by side)."""

    imap: int = 10143
    imaps: int = 10993
    lmtp: int = 10024
    smtp: int = 10025
    submission: int = 10587
    keyserver: int = 10080
    oauth: int = 10081
    ssh: int = 2222
    postgres: int = 15432

    @classmethod
    def with_offset(cls, offset: int) -> Ports:
        base = cls()
        return cls(**{k: v + offset for k, v in asdict(base).items()})


@dataclass(frozen=True)
class Layout:
    """Paths inside one sandbox directory. Nothing here touches the disk."""

    root: Path
    ports: Ports = field(default_factory=Ports)

    # --- persisted choice of ports, so status/down/env agree with up ---
    @property
    def meta_file(self) -> Path:
        return self.root / "sandbox.json"

    def save_meta(self) -> None:
        self.meta_file.write_text(json.dumps({"ports": asdict(self.ports)}, indent=2) + "\n")

    @classmethod
    def load(cls, root: Path, default_offset: int = 0) -> Layout:
        """The layout of ``root``, with the ports recorded by a previous ``up`` if any."""
        root = root.resolve()
        meta = root / "sandbox.json"
        if meta.exists():
            saved = json.loads(meta.read_text())["ports"]
            offset = saved["ssh"] - Ports().ssh  # a port added since that `up` gets the same offset
            ports = Ports(**{**asdict(Ports.with_offset(offset)), **saved})
            return cls(root, ports)
        return cls(root, Ports.with_offset(default_offset))

    # --- directories ---
    @property
    def run_dir(self) -> Path:
        """Pid files of every process the sandbox started."""
        return self.root / "run"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    @property
    def secrets_dir(self) -> Path:
        """Passwords (mode 0600 files, directory 0700)."""
        return self.root / "secrets"

    @property
    def tls_dir(self) -> Path:
        return self.root / "tls"

    @property
    def tls_cert(self) -> Path:
        return self.tls_dir / "cert.pem"

    @property
    def tls_key(self) -> Path:
        return self.tls_dir / "key.pem"

    @property
    def dovecot_dir(self) -> Path:
        return self.root / "dovecot"

    @property
    def mail_dir(self) -> Path:
        """Maildirs, owned by the dovecot user."""
        return self.root / "mail"

    @property
    def ssh_dir(self) -> Path:
        """sshd configs, host keys, the client key, known_hosts and an ssh_config."""
        return self.root / "ssh"

    @property
    def ssh_client_key(self) -> Path:
        return self.ssh_dir / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.ssh_dir / "known_hosts"

    @property
    def ssh_config(self) -> Path:
        return self.ssh_dir / "ssh_config"

    @property
    def keyserver_dir(self) -> Path:
        """Armored public keys served by the VKS keyserver, one ``<address>.asc`` each."""
        return self.root / "keyserver"

    @property
    def inventory_dir(self) -> Path:
        return self.root / "inventory"

    @property
    def config_file(self) -> Path:
        """The ready carrier.yml (mode 0600)."""
        return self.root / "carrier.yml"

    @property
    def carrier_state_dir(self) -> Path:
        """Carrier's own state_dir when run against this sandbox."""
        return self.root / "state"

    @property
    def oauth_client_secret_file(self) -> Path:
        """The client secret of the token server's confidential client (mode 0600)."""
        return self.secrets_dir / "oauth-client.secret"

    def gnupg_home(self, identity: str) -> Path:
        return self.root / "gnupg" / identity

    def password_file(self, identity: str) -> Path:
        return self.secrets_dir / f"{identity}.pass"

    def pid_file(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"
