"""`carrier sandbox up|down|status|env`: start the loopback servers, write carrier.yml and an inventory.

The sandbox is a directory (``default_root()``) holding every file and pid of its servers. ``up`` is
idempotent and restarts only what died; ``down`` stops by pid and keeps the files, so keys and
passwords stay the same from one ``up`` to the next; ``destroy`` also deletes the directory.
"""

from __future__ import annotations

import io
import os
import secrets
import shlex
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ruamel.yaml import YAML

from carrier.ansible.zygote import stop_zygotes
from carrier.errors import SandboxError
from carrier.sandbox import procs
from carrier.sandbox.dovecot import Dovecot
from carrier.sandbox.gpg import GpgHomes
from carrier.sandbox.keyserver import Keyserver
from carrier.sandbox.layout import (
    EXEC_NODE_GROUP,
    GROUPS,
    IDENTITIES,
    LOGIN_USER,
    LOOPBACK,
    Layout,
    Ports,
    address,
    check_exec_nodes,
)
from carrier.sandbox.postgres import Postgres
from carrier.sandbox.smtpd import SmtpRelay
from carrier.sandbox.sshd import NODE_RUNNER, ExecNodes, SshHosts
from carrier.sandbox.tokenserver import TokenServer
from carrier.tls import make_self_signed

# Under /var/tmp, not /root or /tmp/<private>: the dovecot and carrier-sbx users must traverse it.
DEFAULT_ROOT = Path("/var/tmp/carrier-sandbox")  # noqa: S108
#: Binaries checked before anything is written, so a missing package fails fast and alone.
REQUIRED_BINARIES = ("dovecot", "sshd", "ssh-keygen", "gpg", "gpgconf")
#: Identities exported as CARRIER_SANDBOX_<NAME>_* by `carrier sandbox env`.
ENV_IDENTITIES = ("ops", "admin", "newbie", "carrier")
#: Identities whose public key the keyserver serves.
KEYSERVER_IDENTITIES = ("ops", "admin", "newbie", "carrier")
MCP_PORT = 18443
TLS_HOSTS = ("localhost", LOOPBACK)
SYSTEM_PYTHON = Path("/usr/bin/python3")
ROOT_REQUIRED = (
    "carrier sandbox must run as root: it starts sshd and dovecot and creates the carrier-sbx login user"
)


def default_root() -> Path:
    """``$CARRIER_SANDBOX_DIR`` or /var/tmp/carrier-sandbox (the service users must traverse it)."""
    explicit = os.environ.get("CARRIER_SANDBOX_DIR")
    return Path(explicit) if explicit else DEFAULT_ROOT


def repo_playbooks() -> Path | None:
    """The bundled ``playbooks/`` next to the ``carrier`` package (a checkout), if there is one."""
    candidate = Path(__file__).resolve().parents[2] / "playbooks"
    return candidate if candidate.is_dir() else None


class Component(Protocol):
    """What the manager needs from each server of the sandbox."""

    name: str

    def ports(self) -> list[tuple[str, int, str]]: ...
    def prepare(self) -> None: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def running(self) -> bool: ...
    def pids(self) -> dict[str, int | None]: ...


@dataclass(frozen=True)
class ComponentStatus:
    name: str
    running: bool
    pids: dict[str, int | None]
    ports: list[tuple[str, int, str]]


@dataclass(frozen=True)
class SandboxReport:
    """What runs in a sandbox; ``started`` names the components this call started."""

    root: Path
    components: list[ComponentStatus]
    started: list[str] = field(default_factory=list)

    @property
    def all_running(self) -> bool:
        return all(c.running for c in self.components)

    def render(self) -> str:
        lines = [f"sandbox {self.root}: {'running' if self.all_running else 'NOT all running'}"]
        for c in self.components:
            state = "running" if c.running else "stopped"
            if c.name in self.started:
                state = "started"
            pids = " ".join(f"{k}={v if v is not None else '-'}" for k, v in c.pids.items())
            ports = " ".join(sorted({f"{h}:{p}" for h, p, _ in c.ports}))
            lines.append(f"  {c.name:<10} {state:<8} {pids}  [{ports}]")
        return "\n".join(lines)


# --- pure builders (no I/O) ---


def port_offset_of(ports: Ports) -> int:
    return ports.ssh - Ports().ssh


def build_inventory(layout: Layout, python: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``hosts.yml`` and ``group_vars/all.yml`` contents for the sandbox hosts.

    The execution nodes, when there are any, are hosts of their own group (``nodes``): Carrier
    reaches a node named by an inventory host with that host's key and known_hosts.
    """
    addresses = layout.ssh_hosts
    groups = {**GROUPS, **({EXEC_NODE_GROUP: tuple(layout.node_hosts)} if layout.exec_nodes else {})}

    def host_vars(name: str) -> dict[str, Any]:
        return {
            "ansible_host": addresses[name],
            "ansible_port": layout.ports.ssh,
            "ansible_user": LOGIN_USER,
            "ansible_ssh_private_key_file": str(layout.ssh_client_key),
        }

    hosts = {
        "all": {
            "children": {
                group: {"hosts": {name: host_vars(name) for name in members}}
                for group, members in groups.items()
            }
        }
    }
    group_vars = {
        "ansible_python_interpreter": python,
        "ansible_pipelining": True,
        # Host keys are checked in the sandbox too, against the keys `up` generated.
        "ansible_ssh_extra_args": (
            f"-o UserKnownHostsFile={shlex.quote(str(layout.known_hosts))} -o StrictHostKeyChecking=yes"
        ),
    }
    return hosts, group_vars


def build_config(
    layout: Layout, *, fingerprints: Mapping[str, str], playbook_dirs: Sequence[Path],
    postgres: Postgres | None = None,
) -> dict[str, Any]:
    """carrier.yml for the sandbox, with exactly the keys of docs/configuration.md."""
    ports = layout.ports
    carrier = address("carrier")
    store = {} if postgres is None else {
        "store": {"url": postgres.url(with_password=False), "password_file": str(postgres.password_file)}
    }
    nodes = {"execution_nodes": build_nodes(layout)} if layout.exec_nodes else {}
    return {
        **store,
        **nodes,
        "state_dir": str(layout.carrier_state_dir),
        "inventory": str(layout.inventory_dir),
        "playbook_dirs": [str(p) for p in playbook_dirs],
        "gnupg_home": str(layout.gnupg_home("carrier")),
        "accounts": [
            {
                "name": "carrier",
                "address": carrier,
                "username": carrier,  # Dovecot's passwd-file logs in by full address
                "password_file": str(layout.password_file("carrier")),
                "imap": {"host": LOOPBACK, "port": ports.imaps, "tls": "implicit",
                         "ca_file": str(layout.tls_cert)},
                "smtp": {"host": LOOPBACK, "port": ports.submission, "tls": "starttls",
                         "ca_file": str(layout.tls_cert), "auth": True},
                "idle": True,
            }
        ],
        "mcp": {
            "bind_host": LOOPBACK,
            # Shifted with the other ports so two sandboxes can each run `carrier serve`.
            "port": MCP_PORT + port_offset_of(ports),
            "tls_cert": str(layout.tls_cert),
            "tls_key": str(layout.tls_key),
        },
        "admins": [{"email": address("admin"), "fingerprint": fingerprints["admin"]}],
        # newbie is deliberately absent: it is the identity that goes through `enroll`.
        "users": [{"email": address("ops"), "fingerprint": fingerprints["ops"], "role": "operator"}],
        "roles": {
            "operator": {"playbooks": ["*"], "hosts": "all", "exec": True, "shell": False, "pty": True},
            "admin": {"playbooks": ["*"], "hosts": "all", "exec": True, "shell": True, "pty": True},
        },
        "keyserver": {"url": f"http://{LOOPBACK}:{ports.keyserver}"},
        # Named, not left to its default beside carrier.yml: a copy of this file elsewhere (as
        # the tests make) then keys the same chain with the same key.
        "auth": {"audit_key_file": str(layout.root / "audit.key")},
        # No `limits`: Carrier's documented defaults apply.
    }


def build_nodes(layout: Layout) -> list[dict[str, Any]]:
    """carrier.yml's ``execution_nodes``: each sandbox node serves every inventory group (web, db),
    so a playbook for those hosts runs on a node (the nodes take turns); capacity: Carrier's default."""
    return [
        {"name": name, "target": name, "groups": list(GROUPS), "ansible_runner": NODE_RUNNER}
        for name in layout.node_hosts
    ]


def env_values(layout: Layout, passwords: Mapping[str, str]) -> dict[str, str]:
    """The variables `carrier sandbox env` exports, in print order."""
    values = {
        "CARRIER_CONFIG": str(layout.config_file),
        "CARRIER_SANDBOX_DIR": str(layout.root),
    }
    for identity in ENV_IDENTITIES:
        upper = identity.upper()
        values[f"CARRIER_SANDBOX_{upper}_PASSWORD"] = passwords[identity]
        values[f"CARRIER_SANDBOX_{upper}_GNUPGHOME"] = str(layout.gnupg_home(identity))
    return values


def export_lines(values: Mapping[str, str]) -> list[str]:
    """``export NAME=value`` lines, each value shell-quoted."""
    return [f"export {name}={shlex.quote(value)}" for name, value in values.items()]


def dump_yaml(data: Any, header: str = "") -> str:
    yaml = YAML()
    yaml.default_flow_style = False
    yaml.width = 4096  # long paths stay on one line
    out = io.StringIO()
    yaml.dump(data, out)
    return header + out.getvalue()


# --- file helpers ---


def _write_file(path: Path, text: str, mode: int) -> None:
    """Replace ``path`` atomically; the file never exists with a wider mode than ``mode``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, mode)  # O_CREAT does not narrow an existing file
    os.replace(tmp, path)


def read_password(layout: Layout, identity: str) -> str:
    path = layout.password_file(identity)
    try:
        return path.read_text().splitlines()[0]
    except (OSError, IndexError) as exc:
        raise SandboxError(f"cannot read the password in {path}: run `carrier sandbox up`") from exc


class Sandbox:
    """One sandbox directory and the servers it runs.

    ``port_offset=None`` means "the ports this sandbox already uses" (or offset 0 for a new one);
    an explicit offset that differs from a stopped sandbox's switches it to the new ports.
    """

    def __init__(self, root: Path, port_offset: int | None = None, *, with_postgres: bool = False,
                 exec_nodes: int | None = None) -> None:
        self._requested_offset = port_offset
        self._with_postgres = with_postgres
        #: None: the nodes this sandbox already has (none for a new one).
        self._requested_nodes = None if exec_nodes is None else check_exec_nodes(exec_nodes)
        self.layout = Layout.load(root, port_offset or 0)

    def postgres(self) -> Postgres | None:
        """The PostgreSQL component when asked for now or brought up before (its cluster exists)."""
        pg = Postgres(self.layout)
        return pg if self._with_postgres or pg.enabled else None

    def components(self) -> list[Component]:
        """In start order: the token server before Dovecot and SMTP (both check OAuth2 tokens with
        it), Dovecot before SMTP (SMTP delivers into Dovecot's LMTP)."""
        layout = self.layout
        pg = self.postgres()
        nodes: list[Component] = [ExecNodes(layout)] if layout.exec_nodes else []
        return [TokenServer(layout), Dovecot(layout), SmtpRelay(layout), Keyserver(layout), SshHosts(layout),
                *nodes, *([pg] if pg is not None else [])]

    def gpg(self) -> GpgHomes:
        return GpgHomes(self.layout)

    # --- up ---

    def up(self) -> SandboxReport:
        """Start whatever is not running (idempotent) and (re)write carrier.yml and the inventory."""
        if os.geteuid() != 0:
            raise SandboxError(ROOT_REQUIRED)
        for binary in REQUIRED_BINARIES:
            procs.find_binary(binary)
        self._apply_requested_offset()
        self._apply_requested_nodes()
        root = self.layout.root
        if root.exists() and not root.is_dir():
            raise SandboxError(f"{root} is not a directory: choose another sandbox dir")
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o755)
        # dovecot and carrier-sbx are neither owner nor group of the dirs above the sandbox.
        procs.check_traversable(root.parent, uid=-1, gid=-1, user="dovecot and carrier-sbx")

        components = self.components()
        wanted = [
            port
            for component in components
            if all(pid is None for pid in component.pids().values())
            for port in component.ports()
        ]
        procs.ensure_ports_free(wanted)
        self.layout.save_meta()

        self._write_passwords()
        gpg = self.gpg()
        fingerprints = gpg.setup()
        gpg.export_to_keyserver(KEYSERVER_IDENTITIES)
        if not (self.layout.tls_cert.exists() and self.layout.tls_key.exists()):
            make_self_signed(self.layout.tls_cert, self.layout.tls_key, hosts=TLS_HOSTS)
        self.layout.carrier_state_dir.mkdir(mode=0o700, exist_ok=True)
        self._write_inventory()
        self._write_config(fingerprints)

        for component in components:
            component.prepare()
        started: list[Component] = []
        try:
            for component in components:
                if not component.running():
                    component.start()
                    started.append(component)
        except BaseException:
            for component in reversed(started):
                component.stop()
            raise
        return self._report(components, started=[c.name for c in started])

    def _apply_requested_offset(self) -> None:
        if self._requested_offset is None:
            return
        wanted = Ports.with_offset(self._requested_offset)
        if wanted == self.layout.ports:
            return
        current = port_offset_of(self.layout.ports)
        if any(pid is not None for c in self.components() for pid in c.pids().values()):
            raise SandboxError(
                f"the sandbox in {self.layout.root} runs with port offset {current}: "
                f"run `carrier sandbox down` first, or use --port-offset {current}"
            )
        self.layout = Layout(self.layout.root, wanted, self.layout.exec_nodes)

    def _apply_requested_nodes(self) -> None:
        """Switch to the requested number of nodes; nodes dropped from a running sandbox are stopped."""
        wanted = self._requested_nodes
        if wanted is None or wanted == self.layout.exec_nodes:
            return
        old = ExecNodes(self.layout)
        old.stop_only([name for name in old.hosts if name not in Layout(self.layout.root, exec_nodes=wanted)
                       .node_hosts])
        self.layout = Layout(self.layout.root, self.layout.ports, wanted)

    def _write_passwords(self) -> None:
        secrets_dir = self.layout.secrets_dir
        secrets_dir.mkdir(mode=0o700, exist_ok=True)
        secrets_dir.chmod(0o700)
        for identity in IDENTITIES:
            path = self.layout.password_file(identity)
            if path.exists() and path.read_text().strip():
                path.chmod(0o600)
                continue  # kept: mailboxes and scripts keep working across ups
            _write_file(path, secrets.token_urlsafe(18) + "\n", 0o600)

    def _write_inventory(self) -> None:
        python = str(SYSTEM_PYTHON) if SYSTEM_PYTHON.exists() else "auto_silent"
        hosts, group_vars = build_inventory(self.layout, python)
        header = "# Written by `carrier sandbox up`; rewritten on every up.\n"
        inventory = self.layout.inventory_dir
        _write_file(inventory / "hosts.yml", dump_yaml(hosts, header), 0o644)
        _write_file(inventory / "group_vars" / "all.yml", dump_yaml(group_vars, header), 0o644)

    def _write_config(self, fingerprints: Mapping[str, str]) -> None:
        playbooks = repo_playbooks()
        data = build_config(self.layout, fingerprints=fingerprints,
                            playbook_dirs=[playbooks] if playbooks else [], postgres=self.postgres())
        header = "# carrier.yml for the sandbox in this directory; rewritten by every `carrier sandbox up`.\n"
        _write_file(self.layout.config_file, dump_yaml(data, header), 0o600)

    # --- down / destroy ---

    def down(self) -> list[str]:
        """Stop every server by pid (reverse start order) and the gpg-agents; keep the files.

        Returns the names of the components that were running.
        """
        if not self.layout.root.is_dir():
            return []
        stopped = []
        for component in reversed(self.components()):
            if any(pid is not None for pid in component.pids().values()):
                stopped.append(component.name)
            component.stop()
        if (self.layout.root / "gnupg").is_dir():
            self.gpg().kill_agents()
        # Carrier's warm Ansible workers outlive `carrier serve` on purpose; not the sandbox.
        if stop_zygotes(self.layout.carrier_state_dir):
            stopped.append("warm workers")
        return stopped

    def destroy(self) -> list[str]:
        """``down`` and delete the sandbox directory (only one that looks like a sandbox)."""
        root = self.layout.root
        stopped = self.down()
        if not root.exists():
            return stopped
        ours = self.layout.meta_file.exists() or not any(root.iterdir())
        if root == Path(root.anchor) or not ours:
            raise SandboxError(
                f"{root} has no sandbox.json: not deleting a directory the sandbox did not make"
            )
        shutil.rmtree(root)
        return stopped

    # --- status / env ---

    def status(self) -> SandboxReport:
        return self._report(self.components())

    def _report(self, components: Sequence[Component], started: list[str] | None = None) -> SandboxReport:
        return SandboxReport(
            root=self.layout.root,
            components=[
                ComponentStatus(name=c.name, running=c.running(), pids=c.pids(), ports=c.ports())
                for c in components
            ],
            started=started or [],
        )

    def env_lines(self) -> list[str]:
        """Shell ``export`` lines for CARRIER_CONFIG, the sandbox dir, passwords and GNUPGHOMEs."""
        if not self.layout.meta_file.exists():
            raise SandboxError(
                f"no sandbox in {self.layout.root}: run `carrier sandbox up` (or pass its --dir)"
            )
        passwords = {identity: read_password(self.layout, identity) for identity in ENV_IDENTITIES}
        return export_lines(env_values(self.layout, passwords))
