"""Where every sandbox file lives and which loopback ports it uses: the one place for these facts."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from carrier.errors import SandboxError

DOMAIN = "example.test"
#: Identities with a mailbox and a GnuPG home. ``carrier`` is Carrier's own account.
IDENTITIES: tuple[str, ...] = ("carrier", "ops", "admin", "newbie")
#: Inventory hosts: name -> loopback address (each gets its own sshd and host key).
HOSTS: dict[str, str] = {"web1": "127.0.0.11", "web2": "127.0.0.12", "db1": "127.0.0.13"}
GROUPS: dict[str, tuple[str, ...]] = {"web": ("web1", "web2"), "db": ("db1",)}
#: Execution nodes (``carrier sandbox up --exec-nodes N``): ``exec1`` on 127.0.0.21, ``exec2`` on .22...
#: They are inventory hosts of their own group, not members of ``GROUPS``.
EXEC_NODE_PREFIX = "exec"
EXEC_NODE_FIRST = 21
MAX_EXEC_NODES = 9  # 127.0.0.21-.29
EXEC_NODE_GROUP = "nodes"
#: Unix account the sandbox sshd hosts log in as (created when missing; shell /bin/sh).
LOGIN_USER = "carrier-sbx"
LOOPBACK = "127.0.0.1"


def check_exec_nodes(count: int) -> int:
    """``count`` when it is a number of execution nodes the sandbox can run; SandboxError otherwise."""
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_EXEC_NODES:
        raise SandboxError(
            f"the number of execution nodes (--exec-nodes) must be a whole number from 0 to "
            f"{MAX_EXEC_NODES} (the nodes live on 127.0.0.{EXEC_NODE_FIRST}-"
            f"127.0.0.{EXEC_NODE_FIRST + MAX_EXEC_NODES - 1}), not {count!r}"
        )
    return count


def exec_node_hosts(count: int) -> dict[str, str]:
    """Node name -> loopback address for ``count`` execution nodes: ``{"exec1": "127.0.0.21", ...}``."""
    check_exec_nodes(count)
    return {f"{EXEC_NODE_PREFIX}{i}": f"127.0.0.{EXEC_NODE_FIRST + i - 1}" for i in range(1, count + 1)}


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
    #: How many execution nodes (``exec1``..) run beside the inventory hosts.
    exec_nodes: int = 0

    def __post_init__(self) -> None:
        check_exec_nodes(self.exec_nodes)

    # --- persisted choice of ports and nodes, so status/down/env agree with up ---
    @property
    def meta_file(self) -> Path:
        return self.root / "sandbox.json"

    def meta(self) -> dict[str, Any]:
        """What ``sandbox.json`` records."""
        return {"ports": asdict(self.ports), "exec_nodes": self.exec_nodes}

    def save_meta(self) -> None:
        self.meta_file.write_text(json.dumps(self.meta(), indent=2) + "\n")

    @classmethod
    def from_meta(cls, root: Path, data: Any) -> Layout:
        """The layout ``sandbox.json``'s ``data`` describes (one written before a key existed gets that
        key's default: the ports' offset, no execution nodes); SandboxError when it is not one."""
        where = root / "sandbox.json"
        saved = data.get("ports") if isinstance(data, dict) else None
        if not isinstance(saved, dict) or not isinstance(saved.get("ssh"), int):
            raise SandboxError(f"{where} is not a sandbox record: run `carrier sandbox down --destroy` "
                               "and `carrier sandbox up` again")
        known = set(asdict(Ports()))
        if not set(saved) <= known or not all(isinstance(v, int) for v in saved.values()):
            raise SandboxError(f"{where}: unknown or non-numeric ports {sorted(set(saved) - known)}: "
                               "was it written by a newer Carrier?")
        offset = saved["ssh"] - Ports().ssh  # a port added since that `up` gets the same offset
        ports = Ports(**{**asdict(Ports.with_offset(offset)), **saved})
        nodes = data.get("exec_nodes", 0)
        try:
            check_exec_nodes(nodes)
        except SandboxError as exc:
            raise SandboxError(f"{where}: exec_nodes: {exc}") from None
        return cls(root, ports, nodes)

    @classmethod
    def load(cls, root: Path, default_offset: int = 0) -> Layout:
        """The layout of ``root``, with the ports and nodes recorded by a previous ``up`` if any."""
        root = root.resolve()
        meta = root / "sandbox.json"
        if meta.exists():
            try:
                data = json.loads(meta.read_text())
            except (OSError, ValueError) as exc:
                raise SandboxError(f"cannot read {meta} ({exc}): fix or delete it") from None
            return cls.from_meta(root, data)
        return cls(root, Ports.with_offset(default_offset))

    # --- hosts ---
    @property
    def node_hosts(self) -> dict[str, str]:
        """The execution nodes this sandbox runs: name -> loopback address."""
        return exec_node_hosts(self.exec_nodes)

    @property
    def ssh_hosts(self) -> dict[str, str]:
        """Every sshd host: the inventory hosts (``HOSTS``) and then the execution nodes."""
        return {**HOSTS, **self.node_hosts}

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
