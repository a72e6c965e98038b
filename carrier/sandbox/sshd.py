"""OpenSSH hosts for the sandbox: one ``sshd`` per host, each on its own loopback address.

Two components run them: ``SshHosts`` the inventory hosts (web1, web2, db1), ``ExecNodes`` the
execution nodes of ``carrier sandbox up --exec-nodes N`` (exec1.. on 127.0.0.21..). Each host has
its own config and ed25519 host key under ``layout.ssh_dir/<host>/``; all of them let
``LOGIN_USER`` in with the sandbox client key only. The system ``/etc/ssh`` is never read, and
clients need no ``~/.ssh``: ``layout.ssh_config`` and ``layout.known_hosts`` carry every host.

A node is this same machine, so it has what a node needs (docs/nodes.md) when Debian's
``ansible-runner`` is installed: the login user owns the client key and may read known_hosts,
so the node's Ansible reaches the inventory hosts exactly as Carrier does.
"""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from carrier.errors import SandboxError
from carrier.sandbox import procs
from carrier.sandbox.layout import HOSTS, LOGIN_USER, Layout
from carrier.sandbox.sudo import ensure_sudo_password

#: sshd refuses to start without its privilege-separation directory.
PRIVSEP_DIR = Path("/run/sshd")
#: What the nodes run: the system's (Debian's python3-ansible-runner), not Carrier's venv.
NODE_RUNNER = "/usr/bin/ansible-runner"
LOGIN_SHELL = "/bin/sh"  # dash on Debian: a non-interactive command reads no rc file, prints nothing


def known_hosts_pattern(host: str, port: int) -> str:
    """The known_hosts name of ``host`` on ``port`` (``[host]:port`` unless the port is 22)."""
    return host if port == 22 else f"[{host}]:{port}"


def config_value(value: str | Path) -> str:
    """A value for sshd_config/ssh_config, double-quoted when it holds whitespace."""
    text = str(value)
    if '"' in text:
        raise SandboxError(f"path {text!r} contains a double quote: use a sandbox dir without quotes")
    return f'"{text}"' if any(c.isspace() for c in text) else text


def check_strict_path(path: Path, uid: int, gid: int, user: str) -> None:
    """What sshd's StrictModes checks on an AuthorizedKeysFile, with the sticky-bit exception.

    Every component must be reachable by ``user`` and owned by root or ``user``; none may be
    writable by group or others, except a sticky directory above it (``/var/tmp``, ``/tmp``),
    where nobody else can rename our root-owned entries. sshd itself rejects the sticky case,
    which is why the configs say ``StrictModes no`` and this check runs instead.
    """
    current = path.resolve()
    for item in [current, *current.parents]:
        try:
            st = item.stat()
        except OSError as exc:
            raise SandboxError(f"cannot stat {item} ({exc.strerror}): re-run `carrier sandbox up`") from exc
        mode = stat.S_IMODE(st.st_mode)
        if item != current:
            reachable = procs.searchable_by(st, uid, gid)
            if not reachable:
                raise SandboxError(
                    f"{item} is mode {mode:04o}: the {user} user cannot reach {path}; "
                    f"use a sandbox dir under /var/tmp or `chmod o+x {item}`"
                )
        if st.st_uid not in (0, uid):
            raise SandboxError(
                f"{item} is owned by uid {st.st_uid}: sshd would not trust {path} under it; "
                "use a sandbox dir whose parents are owned by root"
            )
        sticky_dir = item != current and bool(mode & stat.S_ISVTX)
        if mode & 0o022 and not sticky_dir:
            raise SandboxError(
                f"{item} is mode {mode:04o} (writable by others): sshd would not trust {path}; "
                f"run `chmod go-w {item}` or use another sandbox dir"
            )


def login_account() -> pwd.struct_passwd:
    """``LOGIN_USER``, created when missing, with a home and an unlocked (but password-less) entry."""
    try:
        account = pwd.getpwnam(LOGIN_USER)
    except KeyError:
        useradd = procs.find_binary("useradd")
        procs.run_checked(
            [useradd, "--system", "--create-home", "--shell", LOGIN_SHELL,
             "--comment", "carrier sandbox login", LOGIN_USER],
            what=f"creating the {LOGIN_USER} user",
        )
        account = pwd.getpwnam(LOGIN_USER)
    # useradd leaves the password as "!" (locked); with UsePAM no, sshd then refuses even a key
    # login ("account is locked"). "*" matches no password but is not a lock.
    if _shadow_password(LOGIN_USER).startswith("!"):
        usermod = procs.find_binary("usermod")
        procs.run_checked([usermod, "-p", "*", LOGIN_USER], what=f"unlocking the {LOGIN_USER} user")
    home = Path(account.pw_dir)
    if not home.is_dir():
        # sshd prints "Could not chdir to home directory" into every session without one.
        home.mkdir(parents=True, mode=0o755)
        os.chown(home, account.pw_uid, account.pw_gid)
    return account


def _shadow_password(user: str) -> str:
    try:
        lines = Path("/etc/shadow").read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        fields = line.split(":")
        if fields[0] == user and len(fields) > 1:
            return fields[1]
    return ""


@dataclass(frozen=True)
class HostFiles:
    """Where one sandbox host keeps its sshd files."""

    name: str
    address: str
    dir: Path
    host_key: Path
    config: Path
    pid_file: Path
    log_file: Path


def host_files(layout: Layout, name: str, addr: str) -> HostFiles:
    return HostFiles(
        name=name,
        address=addr,
        dir=layout.ssh_dir / name,
        host_key=layout.ssh_dir / name / "ssh_host_ed25519_key",
        config=layout.ssh_dir / name / "sshd_config",
        pid_file=layout.pid_file(f"sshd-{name}"),
        log_file=layout.log_file(f"sshd-{name}"),
    )


class SshHosts:
    """One foreground ``sshd -D`` per inventory host (``HOSTS``); the pid we record is sshd's own.

    ``prepare`` writes the files of every sshd host of the layout (nodes too), so known_hosts and
    ssh_config always list them all; ``start``/``stop`` touch only this component's hosts.
    """

    name = "sshd"

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.authorized_keys = layout.ssh_dir / "authorized_keys"
        self.every = {name: host_files(layout, name, addr) for name, addr in layout.ssh_hosts.items()}
        self.hosts = {name: self.every[name] for name in self._names()}
        # Popen objects of sshds this process started, so they are reaped when they exit.
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    def _names(self) -> list[str]:
        return list(HOSTS)

    def ports(self) -> list[tuple[str, int, str]]:
        return [(h.address, self.layout.ports.ssh, f"sshd {h.name}") for h in self.hosts.values()]

    # --- files ---

    def prepare(self) -> None:
        """Login user, client key, host keys, sshd configs, known_hosts and ssh_config. Starts nothing."""
        keygen = procs.find_binary("ssh-keygen")
        procs.find_binary("sshd")
        account = login_account()
        ensure_sudo_password(self.layout)  # become passwords and sudo prompts are tested on it

        ssh_dir = self.layout.ssh_dir
        ssh_dir.mkdir(parents=True, exist_ok=True)
        ssh_dir.chmod(0o755)
        self.layout.run_dir.mkdir(parents=True, exist_ok=True)
        self.layout.log_dir.mkdir(parents=True, exist_ok=True)

        key = self.layout.ssh_client_key
        _ensure_key(keygen, key, comment="carrier-sandbox-client")
        key.chmod(0o600)
        # Owned by the login user: a sandbox host acting as an execution node (docs/nodes.md) logs
        # in to the others with it too. Carrier (root) still may use it: ssh checks only its own keys' modes.
        os.chown(key, account.pw_uid, account.pw_gid)
        public = key.with_name(key.name + ".pub").read_text().strip()
        # restrict: no forwarding of any kind, no ~/.ssh/rc; pty back on for PTY jobs.
        _write_text(self.authorized_keys, f"restrict,pty {public}\n", 0o644)
        check_strict_path(self.authorized_keys, account.pw_uid, account.pw_gid, LOGIN_USER)

        for host in self.every.values():
            host.dir.mkdir(parents=True, exist_ok=True)
            host.dir.chmod(0o755)
            _ensure_key(keygen, host.host_key, comment=f"carrier-sandbox-{host.name}")
            host.host_key.chmod(0o600)
            _write_text(host.config, self._sshd_config(host), 0o644)

        _write_text(self.layout.known_hosts, self.known_hosts_text(), 0o644)
        _write_text(self.layout.ssh_config, self.ssh_config_text(), 0o644)

    def host_public_key(self, name: str) -> str:
        """``<type> <base64>`` of a host's public host key."""
        host = self.every[name]
        fields = host.host_key.with_name(host.host_key.name + ".pub").read_text().split()
        return f"{fields[0]} {fields[1]}"

    def known_hosts_text(self) -> str:
        port = self.layout.ports.ssh
        lines = [
            f"{known_hosts_pattern(h.address, port)},{known_hosts_pattern(h.name, port)} "
            f"{self.host_public_key(h.name)}\n"
            for h in self.every.values()
        ]
        return "".join(lines)

    def ssh_config_text(self) -> str:
        blocks = ["# Written by `carrier sandbox up`. Use: ssh -F <this file> web1\n"]
        for host in self.every.values():
            blocks.append(
                f"\nHost {host.name}\n"
                f"    HostName {host.address}\n"
                f"    Port {self.layout.ports.ssh}\n"
                f"    User {LOGIN_USER}\n"
                f"    IdentityFile {config_value(self.layout.ssh_client_key)}\n"
                "    IdentitiesOnly yes\n"
                f"    UserKnownHostsFile {config_value(self.layout.known_hosts)}\n"
                "    GlobalKnownHostsFile /dev/null\n"
                "    StrictHostKeyChecking yes\n"
                "    BatchMode yes\n"
            )
        return "".join(blocks)

    def _sshd_config(self, host: HostFiles) -> str:
        return f"""\
# Written by `carrier sandbox up` for {host.name}; rewritten on every prepare. /etc/ssh is not read.
ListenAddress {host.address}:{self.layout.ports.ssh}
HostKey {config_value(host.host_key)}
PidFile {config_value(host.pid_file)}
LogLevel VERBOSE

AllowUsers {LOGIN_USER}
PermitRootLogin no
AuthenticationMethods publickey
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
AuthorizedKeysFile {config_value(self.authorized_keys)}
# sshd's StrictModes rejects any world-writable ancestor, sticky or not, so a sandbox under
# /var/tmp could never log in; `carrier sandbox up` runs the same check with the sticky exception.
StrictModes no

# One ControlMaster connection carries many sessions (exec and PTY jobs); 10 is sshd's default.
MaxSessions 10
AllowTcpForwarding no
AllowAgentForwarding no
AllowStreamLocalForwarding no
PermitTunnel no
X11Forwarding no
PermitUserEnvironment no
PermitUserRC no
# No AcceptEnv line: no client environment is accepted (TERM still comes with a PTY request).

# Sessions print only what the command prints.
PrintMotd no
PrintLastLog no
Banner none
UseDNS no

Subsystem sftp internal-sftp
"""

    # --- processes ---

    def start(self) -> None:
        """Start every host that is not running (only those); wait until each accepts connections."""
        sshd = procs.find_binary("sshd")
        missing = [h for h in self.hosts.values() if procs.read_pid(h.pid_file) is None]
        if not missing:
            return
        for host in missing:
            if not host.config.exists():
                raise SandboxError(f"{host.config} is missing: run `carrier sandbox up` to write it")
        procs.ensure_ports_free([(h.address, self.layout.ports.ssh, f"sshd {h.name}") for h in missing])
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        started: list[HostFiles] = []
        try:
            for host in missing:
                # -t first: a config error becomes a one-line message instead of a silent exit.
                procs.run_checked([sshd, "-t", "-f", str(host.config)], what=f"checking {host.config}")
                self._start_host(sshd, host)
                started.append(host)
        except BaseException:
            for host in reversed(started):
                self._stop_host(host)
            raise

    def _start_host(self, sshd: str, host: HostFiles) -> None:
        old = self._procs.pop(host.name, None)
        if old is not None:
            old.poll()  # reap a dead predecessor
        # -D: stay in the foreground, so the spawn pid is sshd's; -E: log to a file, not syslog.
        proc = procs.spawn(
            [sshd, "-D", "-f", str(host.config), "-E", str(host.log_file)],
            log_file=host.log_file,
            pid_file=host.pid_file,
        )
        self._procs[host.name] = proc
        procs.wait_for_port(
            host.address, self.layout.ports.ssh,
            alive=lambda: proc.poll() is None, what=f"sshd {host.name}", log_file=host.log_file,
        )

    def _stop_host(self, host: HostFiles) -> None:
        # Each connection has its own sshd child in its own session: stopping the listener leaves
        # them (and a client's ControlMaster) alive, so they are stopped too, by pid.
        pid = procs.read_pid(host.pid_file)
        sessions = procs.child_pids(pid) if pid is not None else []
        procs.stop_pid_file(host.pid_file)
        for child in sessions:
            procs.stop_pid(child)
        proc = self._procs.pop(host.name, None)
        if proc is not None:
            proc.poll()

    def stop(self) -> None:
        """Stop every host by pid; fine when none runs."""
        self.stop_only(list(self.hosts))

    def stop_only(self, names: list[str]) -> None:
        """Stop these hosts of this component by pid (reverse order)."""
        for name in reversed(names):
            self._stop_host(self.hosts[name])

    def running(self) -> bool:
        return all(pid is not None for pid in self.pids().values())

    def pids(self) -> dict[str, int | None]:
        return {f"sshd-{h.name}": procs.read_pid(h.pid_file) for h in self.hosts.values()}


class ExecNodes(SshHosts):
    """The execution nodes' sshds (``layout.node_hosts``); a node runs Debian's ansible-runner."""

    name = "nodes"

    def _names(self) -> list[str]:
        return list(self.layout.node_hosts)

    def prepare(self) -> None:
        if self.hosts:
            find_node_runner()
        super().prepare()


def find_node_runner() -> str:
    """The ansible-runner the sandbox's nodes run (``NODE_RUNNER``); SandboxError naming the package."""
    if not os.access(NODE_RUNNER, os.X_OK):
        raise SandboxError(
            f"{NODE_RUNNER} is missing: the sandbox's execution nodes run Debian's ansible-runner; "
            "apt-get install python3-ansible-runner (or run `make deps`)"
        )
    return NODE_RUNNER


def _ensure_key(keygen: str, path: Path, *, comment: str) -> None:
    """An ed25519 key without passphrase at ``path`` (and ``path.pub``); kept when both exist."""
    public = path.with_name(path.name + ".pub")
    if path.exists() and public.exists():
        return
    for stale in (path, public):
        stale.unlink(missing_ok=True)
    procs.run_checked(
        [keygen, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        what=f"ssh-keygen for {path}",
    )


def _write_text(path: Path, text: str, mode: int) -> None:
    """Replace ``path`` atomically with ``text`` at ``mode`` (readers never see half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
