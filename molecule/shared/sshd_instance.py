"""A Molecule "instance": one root-login sshd on a loopback address, started and stopped by pid.

Every instance is this same machine, reached over its own loopback address and port, so the roles
go through real SSH (host key checked, key login only) as they would against a remote host. Root
logs in with a key made here; other users listed with ``--user`` log in with their own
``~/.ssh/authorized_keys`` (the file a role under test writes), checked by sshd's StrictModes.

    python sshd_instance.py up   --dir /run/carrier-molecule/sshd-X --address 127.0.0.21 --port 2222
    python sshd_instance.py down --dir /run/carrier-molecule/sshd-X

``up`` prints one JSON object (address, port, user, identity_file, known_hosts). The process
helpers are Carrier's own (``carrier.sandbox.procs``), the same the sandbox's sshd hosts use.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import re
import shutil
import sys
from pathlib import Path

from carrier.errors import SandboxError
from carrier.sandbox import procs
from carrier.sandbox.sshd import PRIVSEP_DIR, known_hosts_pattern

#: Instance directories live here only: ``down`` deletes the directory it is given.
BASE = Path("/run/carrier-molecule")
_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")


class Instance:
    """The files of one instance under ``root`` (all root-owned, none writable by others)."""

    def __init__(self, root: Path) -> None:
        root = root.resolve()
        if root.parent != BASE or not root.name.replace("-", "").replace("_", "").isalnum():
            raise SandboxError(f"{root}: an instance directory must be {BASE}/<name>")
        self.root = root
        self.host_key = root / "ssh_host_ed25519_key"
        self.client_key = root / "id_ed25519"
        self.keys_dir = root / "authorized_keys"
        self.config = root / "sshd_config"
        self.pid_file = root / "sshd.pid"
        self.log_file = root / "sshd.log"
        self.known_hosts = root / "known_hosts"

    def write(self, address: str, port: int, users: list[str]) -> None:
        keygen = procs.find_binary("ssh-keygen")
        BASE.mkdir(mode=0o755, exist_ok=True)
        self.root.mkdir(mode=0o755, exist_ok=True)
        self.keys_dir.mkdir(mode=0o755, exist_ok=True)
        for key, comment in ((self.host_key, "molecule-host"), (self.client_key, "molecule-root")):
            if not key.exists():
                procs.run_checked([keygen, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(key)],
                                  what=f"ssh-keygen {key}")
        root_keys = self.keys_dir / "root"
        root_keys.write_text(self.client_key.with_suffix(".pub").read_text())
        root_keys.chmod(0o644)
        host_pub = " ".join(self.host_key.with_suffix(".pub").read_text().split()[:2])
        self.known_hosts.write_text(f"{known_hosts_pattern(address, port)} {host_pub}\n")
        self.config.write_text(f"""\
# Written by molecule/shared/sshd_instance.py; /etc/ssh is not read.
ListenAddress {address}:{port}
HostKey {self.host_key}
PidFile {self.pid_file}
AllowUsers {" ".join(["root", *users])}
PermitRootLogin prohibit-password
AuthenticationMethods publickey
PasswordAuthentication no
KbdInteractiveAuthentication no
# No PAM: a locked account ("!" in /etc/shadow) cannot log in, as on hardened hosts.
UsePAM no
AuthorizedKeysFile {self.keys_dir}/%u .ssh/authorized_keys
StrictModes yes
MaxSessions 10
# Allowed here so that a scenario can check that a key's own "restrict" option refuses it.
AllowTcpForwarding yes
X11Forwarding no
PrintMotd no
PrintLastLog no
UseDNS no
Subsystem sftp internal-sftp
""")

    def start(self, address: str, port: int) -> None:
        if procs.read_pid(self.pid_file) is not None:
            return
        sshd = procs.find_binary("sshd")
        procs.ensure_ports_free([(address, port, "molecule sshd")])
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        procs.run_checked([sshd, "-t", "-f", str(self.config)], what=f"checking {self.config}")
        proc = procs.spawn([sshd, "-D", "-f", str(self.config), "-E", str(self.log_file)],
                           log_file=self.log_file, pid_file=self.pid_file)
        procs.wait_for_port(address, port, alive=lambda: proc.poll() is None,
                            what="molecule sshd", log_file=self.log_file)

    def stop(self) -> bool:
        # Each login is a child sshd in its own session (and may hold a ControlMaster): stop those too.
        pid = procs.read_pid(self.pid_file)
        sessions = procs.child_pids(pid) if pid is not None else []
        was_running = procs.stop_pid_file(self.pid_file)
        for child in sessions:
            procs.stop_pid(child)
        return was_running


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("action", choices=("up", "down"))
    parser.add_argument("--dir", required=True, type=Path)
    parser.add_argument("--address", default="127.0.0.21")
    parser.add_argument("--port", type=int, default=2222)
    parser.add_argument("--user", action="append", default=[], help="another login user (repeatable)")
    args = parser.parse_args(argv)
    try:
        instance = Instance(args.dir)
        if args.action == "down":
            stopped = instance.stop()
            shutil.rmtree(instance.root, ignore_errors=True)
            print(json.dumps({"stopped": stopped}))
            return 0
        if not ipaddress.ip_address(args.address).is_loopback or not 1024 <= args.port <= 65535:
            raise SandboxError(f"{args.address}:{args.port}: use a loopback address and a port over 1023")
        bad = [u for u in args.user if not _USER.match(u)]
        if bad:
            raise SandboxError(f"not a user name: {', '.join(bad)}")
        instance.write(args.address, args.port, args.user)
        instance.start(args.address, args.port)
    except (SandboxError, ValueError) as exc:
        print(f"sshd_instance: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({
        "address": args.address, "port": args.port, "user": "root",
        "identity_file": str(instance.client_key), "known_hosts": str(instance.known_hosts),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
